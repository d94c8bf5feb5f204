"""Perturb, restore and update a set of named tensors in place (Qiu et al. 2025, Algorithm 2).

Exactness: ``theta + sigma*eps - sigma*eps`` is not ``theta`` in bf16/fp16 (nor reliably in fp32), so
this module keeps a *pristine* copy of every trainable tensor. A perturbation writes
``cast(pristine + sigma*eps)`` into the live tensor and restore copies the pristine tensor back: bit-exact
in every dtype, and it costs a memcpy instead of a second noise draw.

``restore="subtract"`` reproduces the reference implementation instead (no pristine copy; restore
regenerates the noise and subtracts it, which is not exact). It exists so ``esft bench`` can time the
reference behaviour on the same work; training always uses the exact copy.

The update ``theta += alpha/N * sum_n z_n sign_n eps_n`` is accumulated per tensor in float32 over the
members and written once, so a small step is not lost to 30 separate bf16 roundings. How that one write
keeps steps below half an ulp in bf16/fp16 (float32 masters or stochastic rounding) is ``precision.py``;
every update measures what reached the stored weights against the intended float32 step. For large
updates that elementwise work runs as one compiled pass per chunk (``fused.py``), with the same bits.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from esft.es import precision as prec
from esft.es.fused import BLOCK, FUSED
from esft.es.lowrank import factors, lowrank_trainable, vector_noise
from esft.es.noise import Member, NoiseScheme, noise_slices, stream_seed

# The update is applied in chunks of about this many values, so its float32 temporaries stay in cache
# on the CPU; on a GPU, whose update is one kernel launch or a few per chunk, of CHUNK_DEVICE values, so
# that launching them does not outlast running them (a 7B model is 7,000 chunks of CHUNK).
CHUNK = 1 << 20
CHUNK_DEVICE = 1 << 24


def chunk_values(device: torch.device) -> int:
    """How many values the update handles at once on ``device``."""
    return CHUNK if device.type == "cpu" else CHUNK_DEVICE


MASTER_FILE = "es-state/master.safetensors"  # inside a checkpoint folder (vLLM loads *.safetensors)


@dataclass
class UpdateStats:
    """Norms of one update, over all trainable tensors."""

    update_norm: float  # ||theta_new - theta_old|| of the stored weights (the master with masters)
    param_norm: float  # ||theta_old||
    changed_fraction: float  # share of coordinates whose stored value changed
    intended_norm: float = 0.0  # ||alpha/N sum z eps||, the float32 step before it is stored
    step_cosine: float = 1.0  # cos(applied step, intended step); 1 when nothing was lost
    lost_fraction: float = 0.0  # of the coordinates the intended step changes, the share left unmoved

    @property
    def update_ratio(self) -> float:
        return self.update_norm / self.param_norm if self.param_norm > 0 else 0.0

    @property
    def norm_ratio(self) -> float:
        """||applied|| / ||intended||: 1 when the step arrives whole, below 1 when rounding ate part."""
        return self.update_norm / self.intended_norm if self.intended_norm > 0 else 1.0

    def to_dict(self) -> dict[str, float]:
        return {
            "update_norm": self.update_norm,
            "param_norm": self.param_norm,
            "changed_fraction": self.changed_fraction,
            "intended_norm": self.intended_norm,
            "step_cosine": self.step_cosine,
            "lost_fraction": self.lost_fraction,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, float]) -> UpdateStats:
        return cls(**{k: float(d[k]) for k in cls.__dataclass_fields__ if k in d})


def select_trained(
    params: Mapping[str, torch.Tensor],
    freeze: Sequence[str],
    scheme: NoiseScheme | str = NoiseScheme.INDEPENDENT,
) -> dict[str, torch.Tensor]:
    """The tensors ES trains: those whose names match none of the ``freeze`` patterns (fnmatch), and with
    low-rank noise only matrices and biases (``lowrank_trainable``). May be empty."""
    kept = {n: t for n, t in params.items() if not any(fnmatch.fnmatchcase(n, p) for p in freeze)}
    return lowrank_trainable(kept) if NoiseScheme(scheme) == NoiseScheme.LOWRANK else kept


class ParamSet:
    """The trainable tensors of a model, by name, with a pristine copy for exact restore (made when
    first needed).

    ``params`` must be the tensors the forward pass actually reads (an engine's job to provide).
    """

    def __init__(
        self,
        params: Mapping[str, torch.Tensor],
        scheme: NoiseScheme | str = NoiseScheme.INDEPENDENT,
        rank: int = 1,
        restore: str = "copy",
        precision: str = "auto",
    ) -> None:
        if not params:
            raise ValueError("no trainable parameters: every parameter is frozen")
        self.params = dict(params)
        self.scheme = NoiseScheme(scheme)
        self.rank = int(rank)
        for name, t in self.params.items():
            if not t.is_contiguous():
                raise ValueError(
                    f"parameter {name} is not contiguous; ES updates it in place through a flat view"
                )
            if self.scheme == NoiseScheme.LOWRANK and not (t.ndim == 2 or t.ndim == 1):
                raise ValueError(
                    f"low-rank noise needs matrices and vectors; {name} has shape {tuple(t.shape)}"
                )
        if self.rank < 1:
            raise ValueError("rank must be at least 1")
        if restore not in ("copy", "subtract"):
            raise ValueError(f"restore must be copy or subtract, got {restore!r}")
        self.restore_mode = restore
        # How the update reaches bf16/fp16 weights (precision.py): master, stochastic, nearest, or
        # float32 (every tensor is float32: nothing to remedy).
        self.precision, self.precision_reason = prec.resolve(
            precision, (t.dtype for t in self.params.values()), self.scheme == NoiseScheme.LOWRANK
        )
        if restore == "subtract" and self.precision == "master":
            raise ValueError("restore='subtract' works on the live weights; it cannot keep masters")
        # The pristine copy is made on the first perturb(): until then (and for good with low-rank
        # population batching, which never perturbs the live weights) the live tensors are their own
        # base, and ES keeps one copy of the model instead of two. With restore="subtract" they always
        # are; restore subtracts the regenerated noise.
        self.pristine = self.params
        if self.precision == "master":
            # float32 masters: the exact state; perturb reads them, restore and update cast them into
            # the live tensors (a float32 tensor is its own master)
            self.pristine = {
                n: t.detach().float() if t.dtype != torch.float32 else t for n, t in self.params.items()
            }
        self._buffers: dict[tuple, torch.Tensor] = {}
        # low-rank factors drawn for a population forward (engines/population.py), held until the next
        # update() uses and drops them: the same values a fresh draw gives, drawn once per iteration
        self._held: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.perturbed: Member | None = None
        self._sigma = 0.0

    @property
    def numel(self) -> int:
        return sum(t.numel() for t in self.params.values())

    @property
    def fused(self) -> bool:
        """Whether updates run through the compiled kernels (fused.py; ESFT_FUSED_UPDATE, the size)."""
        return FUSED.enabled(self.numel)

    def member_factors(self, name: str, seed: int, hold: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Member ``seed``'s float32 factors (A / sqrt(r), B) of matrix ``name`` (``lowrank.factors``).
        With ``hold`` they are kept for the next ``update()``, which would otherwise draw them again
        (callers must not modify them in place)."""
        pair = self._held.get(name, {}).get(seed)
        if pair is None:
            t = self.params[name]
            pair = factors(t.shape, seed, name, self.rank, t.device)
            if hold:
                self._held.setdefault(name, {})[seed] = pair
        return pair

    def drop_held(self) -> None:
        """Forget the held factors (a new population is about to be drawn): what is held is at most one
        population's, even where an update never follows a population forward."""
        self._held.clear()

    def _eps(self, name: str, member: Member):
        """(start, values) slices of the flattened float32 noise of ``name`` under ``member``."""
        if self.scheme == NoiseScheme.LOWRANK:
            return [(0, self._lowrank_eps(name, member.seed).view(-1))]
        t = self.params[name]
        # generated noise is drawn into a reused buffer; table noise is yielded as table views
        buf = None if self.scheme == NoiseScheme.TABLE else self._buffer(t)
        return noise_slices(t.shape, member.seed, name, t.device, self.scheme, buf)

    def _buffer(self, t: torch.Tensor) -> torch.Tensor:
        key = (tuple(t.shape), t.device)
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = torch.empty(t.shape, dtype=torch.float32, device=t.device)
        return buf

    def _lowrank_eps(self, name: str, seed: int) -> torch.Tensor:
        """The materialised low-rank noise A B^T / sqrt(r) of a matrix (full noise for a vector)."""
        t = self.params[name]
        if t.ndim == 1:
            return vector_noise(t.numel(), seed, name, t.device, out=self._buffer(t))
        a, b = factors(t.shape, seed, name, self.rank, t.device)
        return torch.mm(a, b.T, out=self._buffer(t))

    @torch.no_grad()
    def perturb(self, member: Member, sigma: float) -> None:
        """Set every live tensor to cast(pristine + sign * sigma * eps), layer by layer."""
        if self.perturbed is not None:
            raise RuntimeError("perturb() called twice without restore()")
        if self.restore_mode == "copy" and self.pristine is self.params:
            self.pristine = {name: t.detach().clone() for name, t in self.params.items()}
        self.perturbed, self._sigma = member, sigma
        for name, live in self.params.items():
            flat_live, flat_base = live.view(-1), self.pristine[name].view(-1)
            for start, eps in self._eps(name, member):
                end = start + eps.numel()
                # computed in float32 (eps is float32), rounded once into the live dtype
                torch.add(flat_base[start:end], eps, alpha=sigma * member.sign, out=flat_live[start:end])

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the pristine tensors back: bit-exact (or, with restore="subtract", subtract the noise)."""
        member = self.perturbed
        for name, live in self.params.items():
            if self.restore_mode == "copy":
                if self.pristine is not self.params:
                    live.copy_(self.pristine[name])
            elif member is not None:
                flat = live.view(-1)
                for start, eps in self._eps(name, member):
                    end = start + eps.numel()
                    torch.add(flat[start:end], eps, alpha=-self._sigma * member.sign, out=flat[start:end])
        self.perturbed = None

    @torch.no_grad()
    def update(
        self,
        members: Sequence[Member],
        weights: Sequence[float],
        alpha: float,
        on_tensor: Callable[[], None] | None = None,
    ) -> UpdateStats:
        """theta += alpha / N * sum_n weights_n * sign_n * eps_n, in float32, cast once per tensor.

        ``weights`` are the shaped rewards (z-scores). Members with weight 0 cost nothing, and an
        antithetic pair costs one noise draw.
        """
        if self.perturbed is not None:
            raise RuntimeError("update() while perturbed: call restore() first")
        if len(members) != len(weights):
            raise ValueError("one weight per member")
        n = len(members)
        # Members sharing a seed (antithetic pairs) share one noise draw: weight sum_k w_k sign_k.
        per_seed: dict[int, float] = {}
        for m, w in zip(members, weights, strict=True):
            per_seed[m.seed] = per_seed.get(m.seed, 0.0) + float(w) * m.sign
        active = [(Member(seed), w) for seed, w in per_seed.items() if w != 0.0]
        total = 0
        step = prec.StepStats()
        rounding = prec.rounding_seed((m.seed, m.sign) for m in members)
        fused = bool(active) and self.fused  # one compiled pass per chunk (fused.py)
        for name, live in self.params.items():
            old = self.pristine[name]
            total += old.numel()
            if not active:
                step.add_old(old)
                continue
            stream = stream_seed(rounding, name)  # the stochastic rounding's bits for this tensor
            for rows, intended in self._steps(name, old, active, alpha / n):
                if fused:
                    rows, intended = self._apply_fused(live, old, rows, intended, stream, step)
                if intended.numel():
                    self._apply(live, old, rows, intended, stream, step)
            self._held.pop(name, None)
            if on_tensor is not None:
                on_tensor()
        self._held.clear()
        step.settle()
        return UpdateStats(
            update_norm=math.sqrt(step.sq_applied),
            param_norm=math.sqrt(step.sq_old),
            changed_fraction=step.changed / max(total, 1),
            intended_norm=math.sqrt(step.sq_intended),
            step_cosine=step.cosine(),
            lost_fraction=step.lost_fraction(),
        )

    def _steps(
        self, name: str, old: torch.Tensor, active: list[tuple[Member, float]], scale: float
    ) -> Iterator[tuple[slice, torch.Tensor]]:
        """(slice of the flattened tensor, float32 intended step there) in chunks of about CHUNK values."""
        if self.scheme == NoiseScheme.LOWRANK and old.ndim == 2:
            # sum_n w_n A_n B_n^T as one product of the concatenated factors, a block of rows at a time
            pairs = [(self.member_factors(name, m.seed), w * m.sign) for m, w in active]
            a = torch.cat([ab[0] * (c * scale) for ab, c in pairs], dim=1)
            b_t = torch.cat([ab[1] for ab, _ in pairs], dim=1).T.contiguous()
            cols = old.shape[1]
            rows = max(1, chunk_values(old.device) // cols)
            for r in range(0, old.shape[0], rows):
                block = a[r : r + rows] @ b_t
                yield slice(r * cols, r * cols + block.numel()), block.view(-1)
            return
        acc = torch.zeros(old.shape, dtype=torch.float32, device=old.device)
        flat_acc = acc.view(-1)
        for member, w in active:
            for start, eps in self._eps(name, member):
                flat_acc[start : start + eps.numel()].add_(eps, alpha=w * member.sign)
        flat_acc.mul_(scale)
        chunk = chunk_values(old.device)
        for start in range(0, flat_acc.numel(), chunk):
            yield slice(start, start + chunk), flat_acc[start : start + chunk]

    def _apply_fused(
        self,
        live: torch.Tensor,
        old: torch.Tensor,
        rows: slice,
        intended: torch.Tensor,
        stream: int,
        step: prec.StepStats,
    ) -> tuple[slice, torch.Tensor]:
        """The whole BLOCK rows of a chunk through the compiled kernel (the same bits as ``_apply``);
        returns what is left for ``_apply``: the chunk's tail, or all of it where no kernel serves."""
        n = intended.numel()
        main = n - n % BLOCK
        if main:
            part = slice(rows.start, rows.start + main)
            o, lv = old.view(-1)[part], live.view(-1)[part]
            sums = FUSED.apply(self.precision, o, lv, intended[:main], stream, rows.start)
            if sums is not None:
                step.add_sums_tensor(sums)
                return slice(rows.start + main, rows.start + n), intended[main:]
        return rows, intended

    def _apply(
        self,
        live: torch.Tensor,
        old: torch.Tensor,
        rows: slice,
        intended: torch.Tensor,
        stream: int,
        step: prec.StepStats,
    ) -> None:
        """Write old + intended into the stored weights of one chunk (by the precision mode) and record
        the applied step against the intended one."""
        o, lv = old.view(-1)[rows], live.view(-1)[rows]
        step.add_old(o)
        step.add_intended(intended)
        if o.dtype == torch.float32:  # masters, or float32 weights
            applied = o.clone()
            o.add_(intended)
            applied.neg_().add_(o)  # new - old, exactly the stored change
            if lv.data_ptr() != o.data_ptr():
                lv.copy_(o)  # the compute copy: the masters rounded to nearest
        else:
            before = o.float()
            if self.precision == "stochastic":
                rounded = prec.stochastic_round(before + intended, o.dtype, stream, rows.start)
                o.copy_(rounded)  # exact: bf16 values (a float16 result is already float16)
                applied = (
                    rounded.float().sub_(before) if rounded.dtype != torch.float32 else rounded.sub_(before)
                )
            else:  # nearest: one kernel adds in float32 and rounds into the weights' dtype
                torch.add(before, intended, out=o)
                applied = o.float().sub_(before)
            if lv.data_ptr() != o.data_ptr():
                lv.copy_(o)
        step.add_applied(applied, intended)

    # -- masters in checkpoints ------------------------------------------------------------------

    def save_state(self, folder: str | Path) -> list[str]:
        """Write what the live weights do not hold (float32 masters) into ``folder``'s ``es-state/``;
        returns the files written (none unless precision is master)."""
        if self.precision != "master":
            return []
        from safetensors.torch import save_file

        path = Path(folder) / MASTER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({n: t.detach().contiguous().cpu() for n, t in self.pristine.items()}, str(path))
        return [str(path)]

    @torch.no_grad()
    def load_state(self, folder: str | Path) -> bool:
        """Take the float32 masters saved in checkpoint ``folder`` (False if it has none). Refuses
        masters that do not round to the live weights: they belong to another checkpoint."""
        path = Path(folder) / MASTER_FILE
        if self.precision != "master" or not path.is_file():
            return False
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
            if names != set(self.params):
                raise ValueError(f"{path} holds other tensors than the trained ones; it is not this run's")
            for name, live in self.params.items():
                master = f.get_tensor(name).to(live.device)
                if master.shape != live.shape or not torch.equal(master.to(live.dtype), live):
                    raise ValueError(f"{path}: master {name} does not round to the checkpoint's weights")
                self.pristine[name].copy_(master)
        return True

    def state_norm(self) -> float:
        return math.sqrt(sum(float(t.float().pow(2).sum()) for t in self.pristine.values()))


def require_state(params: ParamSet, folder: str | Path) -> None:
    """Load the float32 masters of ``folder`` into ``params``; a run checkpoint (``esft_checkpoint.json``)
    that should hold them and does not is refused, since its weights alone lose the masters' low bits. A
    base model folder has none: the masters start from its weights."""
    if params.load_state(folder) or params.precision != "master":
        return
    if (Path(folder) / "esft_checkpoint.json").is_file():
        raise ValueError(
            f"checkpoint {folder} has no float32 masters ({MASTER_FILE}); it was not written with "
            "--update-precision master, so it cannot continue such a run exactly"
        )
