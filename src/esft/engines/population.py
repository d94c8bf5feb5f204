"""Population-batched forward passes for low-rank ES (EGGROLL, Sarkar et al. 2025).

A batch holds n members' copies of the same P prompts, member-major (rows m*P .. m*P+P-1 belong to
member m). Forward hooks on the model's linear and embedding layers add each member's own rank-r
perturbation to the layer output, so n perturbed models run as one batched forward through the
*unperturbed* weights:

    linear:    y_m = x_m W^T + b + sigma (x_m B_m) A_m^T + sigma eps_m     (eps_m: bias noise)
    embedding: e_m = E[ids_m] + sigma A_m[ids_m] B_m^T

with (A_m, B_m) the factors of ``esft.es.lowrank`` (the same ones ``ParamSet`` materialises for a
member-by-member perturbation and sums in the update). A tied lm_head shares the embedding's factors.
The weights are never written during generation, so there is nothing to restore.

An embedding module whose forward scales its lookup (Gemma's ``*ScaledWordEmbedding`` multiplies by
sqrt(hidden)) applies the same scale to a perturbed weight's rows, so the hook scales the member's noise
rows by it too; a forward that is not a constant multiple of the lookup cannot be batched and is refused.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from esft.errors import ConfigError
from esft.es import native
from esft.es.lowrank import stacked_vectors
from esft.es.noise import Member, NoiseScheme
from esft.es.params import ParamSet

# Rows per member from which a linear layer's correction runs as two matmuls over all members (a
# prefill) instead of element-wise kernels (a decode step): the two cost the same at about 8 rows in
# bfloat16 and 16 in float32 (benchmarks/population_hooks.py --rows, 2-core Xeon with AMX).
# Those matmuls compute every member's factors for every row, n*r/out_features of the layer's own
# FLOPs each, so they serve populations of at most MATMUL_FACTORS factors (n members x rank r).
MATMUL_ROWS = 16
MATMUL_FACTORS = 64
# Output widths from which a bf16 decode step's outer product runs through the C kernel (native.py)
# instead of torch's addcmul_: it gains where the output is wide (gate/up +29% -> +26% of the layer, the
# lm_head +15-72% -> +6%) and loses to its call's fixed cost on narrow ones (down, k/v;
# benchmarks/population_hooks.py [--cold]).
OUTER_MIN_COLS = 4096


class PopulationHooks:
    """Context manager: while active, ``model``'s forward applies ``prepare()``-d members' noise."""

    def __init__(self, model: nn.Module, params: ParamSet) -> None:
        if params.scheme != NoiseScheme.LOWRANK:
            raise ValueError("population batching needs the lowrank noise scheme")
        self.model, self.params = model, params
        by_ptr = {t.data_ptr(): name for name, t in params.params.items()}
        self.targets: list[tuple[nn.Module, str, str | None, str | None]] = []
        covered: set[str] = set()
        for module in model.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                w = by_ptr.get(module.weight.data_ptr())
                bias = getattr(module, "bias", None)
                b = by_ptr.get(bias.data_ptr()) if bias is not None else None
                if w or b:
                    kind = "linear" if isinstance(module, nn.Linear) else "embedding"
                    self.targets.append((module, kind, w, b))
                    covered.update(x for x in (w, b) if x)
        missing = sorted(set(params.params) - covered)
        if missing:
            raise ConfigError(
                f"--noise lowrank batches linear and embedding layers only; {missing[0]} "
                f"(and {len(missing) - 1} more) belong to other layers: freeze them or use another --noise"
            )
        # embedding forwards that scale the lookup (Gemma): the scale applies to the noise rows too
        self.scales = {
            id(module): embedding_scale(module, w)
            for module, kind, w, _ in self.targets
            if kind == "embedding"
        }
        self.n = 0
        self.noise: dict[str, torch.Tensor | tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles: list = []
        self._fired: set[int] = set()  # indices into targets whose hook ran since prepare()
        self._own = torch.empty(0)  # (n, 1, n, 1): 1 where a row's member and a factor's agree
        # the C kernel for the rank-1 decode correction in bf16 on the CPU, where it builds and agrees
        # with torch (OUTER_MIN_COLS)
        bf16_cpu = all(t.device.type == "cpu" for t in params.params.values()) and any(
            t.dtype == torch.bfloat16 for t in params.params.values()
        )
        self._outer = native.outer_add_bf16() if bf16_cpu else None

    @torch.no_grad()
    def prepare(self, members: Sequence[Member], sigma: float, dtype: torch.dtype) -> None:
        """Draw the factors of ``members`` (sigma folded into A) for the next generate call; the
        ParamSet holds the drawn factors for its next update."""
        self.n = len(members)
        self.noise = {}
        self._fired = set()
        device = next((t.device for t in self.params.params.values()), torch.device("cpu"))
        self._own = torch.eye(self.n, dtype=dtype, device=device).view(self.n, 1, self.n, 1)
        for name, t in self.params.params.items():
            if t.ndim == 2:
                # held by the ParamSet for the update that follows, which would draw them again
                pairs = [self.params.member_factors(name, m.seed, hold=True) for m in members]
                a = torch.stack([p[0] * m.sign for p, m in zip(pairs, members, strict=True)])
                b = torch.stack([p[1] for p in pairs])
                # (n, r, out) and (n, r, in): rows of A^T and B^T, the layout both hook paths read
                a_t = (a * sigma).transpose(1, 2).to(dtype).contiguous()
                self.noise[name] = (a_t, b.transpose(1, 2).to(dtype).contiguous())
            else:
                self.noise[name] = (stacked_vectors(t.numel(), members, name, t.device) * sigma).to(dtype)

    def __enter__(self) -> PopulationHooks:
        self.params.drop_held()
        for i, (module, kind, w, b) in enumerate(self.targets):
            hook = (
                self._linear_hook(w, b)
                if kind == "linear"
                else self._embedding_hook(w, self.scales[id(module)])
            )
            self._handles.append(module.register_forward_hook(self._recording(i, hook)))
        return self

    def _recording(self, index: int, hook):
        def run(module, args, out):
            self._fired.add(index)
            return hook(module, args, out)

        return run

    def check_fired(self) -> None:
        """Raise if a perturbed layer's hook did not run since ``prepare()``: its forward bypassed the
        module the hook sits on, so members generated without that noise while the update applies it."""
        missed = [self.targets[i] for i in range(len(self.targets)) if i not in self._fired]
        if missed:
            module, _, w, b = missed[0]
            raise RuntimeError(
                f"population batching: the hook for {w or b} ({type(module).__name__}) did not run "
                f"(and {len(missed) - 1} more): the model's forward bypasses it, so members would "
                "generate without that noise; freeze those parameters or use another --noise"
            )

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.noise = {}

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        """(B, ..., d) -> (n, B/n * ..., d): each member's rows side by side."""
        if t.shape[0] % self.n:
            raise RuntimeError(f"batch of {t.shape[0]} rows is not a whole number of {self.n} members")
        return t.reshape(self.n, -1, t.shape[-1])

    def _linear_hook(self, w: str | None, b: str | None):
        def hook(module, args, out):
            res = self._rows(out)  # (n, rows, out): a view of the layer's fresh output, updated in place
            if w is not None:
                a_t, b_t = self.noise[w]  # (n, r, out), (n, r, in)
                x = self._rows(args[0])  # (n, rows, in)
                if x.shape[1] >= MATMUL_ROWS and a_t.shape[0] * a_t.shape[1] <= MATMUL_FACTORS:
                    # a prefill: one matmul of every row against every member's factors, the other
                    # members' products zeroed, then one matmul that adds (x B_m) A_m^T into the output
                    # in place: +7-31% on a layer's linears at 80 rows per member in bf16 against +35-70%
                    # for the element-wise form (benchmarks/population_hooks.py, docs/benchmarks.md)
                    n, r = a_t.shape[0], a_t.shape[1]
                    coef = torch.mm(x.reshape(-1, x.shape[-1]), b_t.reshape(n * r, -1).T)
                    coef.view(n, -1, n, r).mul_(self._own)
                    res.view(-1, res.shape[-1]).addmm_(coef, a_t.reshape(n * r, -1))
                elif a_t.shape[1] == 1:
                    # rank 1: x b is a row-wise dot product and (x b) a^T an outer product. Elementwise
                    # kernels beat two tiny batched matmuls on CPU, most of all in bf16 (no bmm fast path
                    # for inner dimension 1): +20% on a layer's linears instead of +34%
                    # (benchmarks/population_hooks.py, docs/benchmarks.md)
                    coef = (x * b_t).sum(-1, keepdim=True)
                    if (
                        self._outer is not None
                        and res.dtype == a_t.dtype == torch.bfloat16
                        and res.is_contiguous()
                        and res.shape[-1] >= OUTER_MIN_COLS
                    ):
                        self._outer(res, coef, a_t)  # the same bits, its cold operands prefetched (native.py)
                    else:
                        res.addcmul_(coef, a_t)
                else:
                    res.add_(torch.bmm(torch.bmm(x, b_t.transpose(1, 2)), a_t))
            if b is not None:
                res.add_(self.noise[b].unsqueeze(1))
            return res.view(out.shape)

        return hook

    def _embedding_hook(self, w: str, scale: float | None):
        def hook(module, args, out):
            a_t, b_t = self.noise[w]  # (n, r, vocab), (n, r, hidden)
            ids = args[0].reshape(self.n, 1, -1).expand(-1, a_t.shape[1], -1)
            rows = torch.gather(a_t, 2, ids).transpose(1, 2)  # (n, tokens, r): A_m[ids_m]
            if scale is not None:  # the module scales E[ids]; (E + sigma A B^T)[ids] gets the same scale
                rows = rows * torch.tensor(scale, dtype=module.weight.dtype).to(rows.dtype)
            return (self._rows(out) + torch.bmm(rows, b_t)).view(out.shape)

        return hook


@torch.no_grad()
def embedding_scale(module: nn.Embedding, name: str) -> float | None:
    """The constant by which ``module``'s forward multiplies its lookup (None: a plain lookup). A
    subclass with its own forward (Gemma's scaled embeddings) is probed; one whose output is not a
    constant multiple of the lookup is refused, since its noise rows could not be batched exactly."""
    if type(module).forward is nn.Embedding.forward:
        return None
    scale = getattr(module, "embed_scale", None)
    ids = torch.arange(min(module.num_embeddings, 16), device=module.weight.device).unsqueeze(0)
    lookup = torch.nn.functional.embedding(ids, module.weight).float()
    out = nn.Embedding.__call__(module, ids).float()  # the module's forward, no hooks registered yet
    if scale is None:
        scale = float((out * lookup).sum() / (lookup * lookup).sum().clamp_min(1e-30))
    scale = float(scale)
    expected = lookup * torch.tensor(scale, dtype=module.weight.dtype).float()
    if not torch.allclose(out, expected, rtol=1e-2, atol=1e-6):
        raise ConfigError(
            f"--noise lowrank: the embedding {name} ({type(module).__name__}) transforms its lookup in a "
            "way population batching cannot reproduce; freeze it (--freeze '*embed_tokens*') or use "
            "another --noise"
        )
    return None if scale == 1.0 else scale
