"""Low-rank population batching inside vLLM's worker: each ES member is one LoRA adapter.

vLLM's multi-LoRA batching runs requests that name different adapters in one batch: every LoRA-wrapped
linear layer adds ``(x lora_A^T) lora_B^T`` of the adapter in the token's slot. A low-rank member's
perturbation of a matrix, sigma * sign * A B^T (``esft.es.lowrank.factors``), is exactly such an adapter:
lora_A = B^T, lora_B = sigma * sign * A, scaling 1. So N members generate in one ``LLM.generate`` call
whose requests carry N adapters, through the unperturbed weights, with nothing to restore.

What LoRA cannot carry is added by forward hooks keyed on the same slots (``punica_wrapper``):
  - linear biases (LoRA has no per-adapter bias): each token's output gets its member's bias noise;
  - the input embedding (not a LoRA layer for most decoders in vLLM): token t of member n gets
    sigma * sign * A_n[id_t] B_n^T;
  - the lm_head (or a tied embedding used as lm_head): the logits row of a request of member n gets
    sigma * sign * (h B_n) A_n^T (``punica_wrapper.sampler_indices`` gives each logits row's slot).

The adapters are built here from seeds (the driver sends only seeds, signs and sigma), registered with
vLLM's LoRA manager under fresh ids, and found there by requests that name those ids; their path is a
placeholder that is never read. Factors are drawn exactly as ``ParamSet`` draws them for the update.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from esft.es.lowrank import vector_noise
from esft.es.params import ParamSet


class LoRAPopulation:
    """The current population's adapters and hooks in one vLLM worker.

    ``views``: HF name -> the live tensor view; ``place``: HF name -> {"vllm": "<module>.<attr>",
    "rows": [lo, hi]} (rows of a fused tensor); ``lora_layers``: HF name -> the LoRA layer whose weight
    or bias it is; ``token_layers``: HF name -> [("embedding" | "logits", module)] for the embedding
    and lm_head weights the hooks perturb.
    """

    def __init__(
        self,
        model_runner: Any,
        views: Mapping[str, torch.Tensor],
        place: Mapping[str, Mapping[str, Any]],
        lora_layers: Mapping[str, torch.nn.Module],
        token_layers: Mapping[str, list[tuple[str, torch.nn.Module]]],
    ) -> None:
        self.workers = model_runner.lora_manager
        self.manager = self.workers._adapter_manager
        self.views, self.place = views, place
        self.lora_layers, self.token_layers = dict(lora_layers), dict(token_layers)
        self.punica = next(iter(self.lora_layers.values())).punica_wrapper if self.lora_layers else None
        self.ids: list[int] = []
        self._bias: dict[int, dict[str, torch.Tensor]] = {}  # lora id -> vLLM layer -> bias noise
        self._bias_rows: dict[str, int] = {}
        self._bias_cache: tuple[tuple, dict[str, torch.Tensor]] | None = None
        self._tokens: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}  # id -> name -> (sA, B)
        self._handles: list[Any] = []
        self._hooked: dict[str, list[str]] = {}  # hook key -> the HF tensors whose noise it adds
        self._fired: set[str] = set()

    @property
    def names(self) -> list[str]:
        """The HF tensors a population batch can perturb per member."""
        return sorted({*self.lora_layers, *self.token_layers})

    # -- building a population -------------------------------------------------------------------

    def build(
        self, params: ParamSet, members: Sequence[tuple[int, int]], sigma: float, first_id: int
    ) -> list[int]:
        """Replace the current population by one adapter per (seed, sign), ids ``first_id``, ..."""
        from vllm.lora.lora_model import LoRAModel
        from vllm.lora.peft_helper import PEFTHelper

        if str(params.scheme) != "lowrank":
            raise ValueError("population batching needs the lowrank noise scheme")
        outside = sorted(set(params.params) - set(self.names))
        if outside:
            raise ValueError(
                f"population batching cannot perturb {outside[0]} (no LoRA layer or hook holds it)"
            )
        if self.punica is None:
            raise ValueError("this model has no LoRA layers: vLLM cannot batch its members")
        self.drop()
        params.drop_held()
        trained = params.params
        matrices = {n: t for n, t in trained.items() if n in self.lora_layers and t.ndim == 2}
        biases = {n: t for n, t in trained.items() if n in self.lora_layers and t.ndim == 1}
        tokens = {n: t for n, t in trained.items() if n in self.token_layers}
        # with no trainable LoRA matrix, a zero adapter still gives each member its own slot
        zero = None if matrices else next(n for n in self.lora_layers if n.endswith(".weight"))
        modules = sorted({n.removesuffix(".weight").rpartition(".")[2] for n in [*matrices, zero] if n})
        helper = PEFTHelper.from_dict(
            {"r": params.rank, "lora_alpha": params.rank, "target_modules": modules}
        )
        helper.validate_legal(self.workers.lora_config)
        mapper = getattr(self.manager.model, "hf_to_vllm_mapper", None)
        mapper = mapper.get_rename_mapper() if mapper is not None else None
        self._bias_rows = {
            self.place[n]["vllm"]: int(self.lora_layers[n].base_layer.bias.shape[0]) for n in biases
        }
        for k, (seed, sign) in enumerate(members):
            scale = float(sigma) * int(sign)
            tensors: dict[str, torch.Tensor] = {}
            for name in matrices:
                # the update's draws, held by the worker's ParamSet for its next update
                a, b = params.member_factors(name, int(seed), hold=True)
                module = f"base_model.model.{name.removesuffix('.weight')}"
                tensors[f"{module}.lora_A.weight"] = b.t().contiguous().cpu()
                tensors[f"{module}.lora_B.weight"] = a.mul(scale).cpu()
            if zero is not None:
                out_f, in_f = self.views[zero].shape
                module = f"base_model.model.{zero.removesuffix('.weight')}"
                tensors[f"{module}.lora_A.weight"] = torch.zeros(params.rank, in_f)
                tensors[f"{module}.lora_B.weight"] = torch.zeros(out_f, params.rank)
            lora = LoRAModel.from_lora_tensors(
                int(first_id) + k,
                tensors,
                helper,
                device="cpu",
                dtype=self.workers.lora_config.lora_dtype,
                weights_mapper=mapper,
            )
            self.manager.add_adapter(lora)
            self.ids.append(lora.id)
            bias: dict[str, torch.Tensor] = {}  # per vLLM layer: the member's noise over its fused rows
            for name, t in biases.items():
                layer = self.place[name]["vllm"]
                full = bias.setdefault(layer, torch.zeros(self._bias_rows[layer], device=t.device))
                lo, hi = self.place[name]["rows"]
                full[lo:hi] = vector_noise(t.numel(), int(seed), name, t.device).mul_(scale)
            self._bias[lora.id] = bias
            self._tokens[lora.id] = {}
            for name in tokens:
                a, b = params.member_factors(name, int(seed), hold=True)
                self._tokens[lora.id][name] = (a.mul(scale), b)
        self._hook(biases, tokens)
        return list(self.ids)

    def drop(self) -> None:
        """Unregister the current population's adapters and hooks."""
        for lora_id in self.ids:
            self.workers.remove_adapter(lora_id)
        self.ids, self._bias, self._tokens, self._bias_cache = [], {}, {}, None
        self._hooked, self._fired = {}, set()
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # -- hooks -----------------------------------------------------------------------------------

    def _hook(self, biases: Mapping[str, torch.Tensor], tokens: Mapping[str, torch.Tensor]) -> None:
        self._hooked, self._fired = {}, set()
        for layer in dict.fromkeys(self.place[n]["vllm"] for n in biases):
            wrapper = next(self.lora_layers[n] for n in biases if self.place[n]["vllm"] == layer)
            names = [n for n in biases if self.place[n]["vllm"] == layer]
            self._register(wrapper, f"bias:{layer}", names, self._bias_hook(layer))
        by_module: dict[int, tuple[str, torch.nn.Module, list[str]]] = {}
        for name in tokens:
            for kind, module in self.token_layers[name]:
                by_module.setdefault(id(module), (kind, module, []))[2].append(name)
        for kind, module, names in by_module.values():
            hook = self._embedding_hook(names) if kind == "embedding" else self._logits_hook(names)
            self._register(module, f"{kind}:{type(module).__name__}", names, hook)

    def _register(self, module: torch.nn.Module, key: str, names: list[str], hook) -> None:
        self._hooked[key] = list(names)

        def recording(mod, inputs, output):
            self._fired.add(key)
            return hook(mod, inputs, output)

        self._handles.append(module.register_forward_hook(recording))

    def missed(self) -> list[str]:
        """HF tensors whose hook has not run since ``build``: the forward bypassed the hooked module,
        so members generated without that noise (the driver raises)."""
        return [n for key, names in self._hooked.items() if key not in self._fired for n in names]

    def _slot_ids(self) -> list[int | None]:
        return list(self.manager.lora_index_to_id)

    def _bias_hook(self, layer: str):
        def hook(module, inputs, output):
            out = output[0] if isinstance(output, tuple) else output
            slots = self.punica.token_lora_indices
            if slots.shape[0] != out.shape[0]:
                raise RuntimeError(f"{layer}: {out.shape[0]} output rows but {slots.shape[0]} token slots")
            out.add_(self._bias_by_slot(layer, out)[slots])
            return output

        return hook

    def _bias_by_slot(self, layer: str, like: torch.Tensor) -> torch.Tensor:
        """(slots + 1, rows): each slot's adapter's bias noise; the last row (slot -1, no adapter) is 0."""
        key = tuple(self._slot_ids())
        if self._bias_cache is None or self._bias_cache[0] != key:
            self._bias_cache = (key, {})
        stacks = self._bias_cache[1]
        if layer not in stacks:
            stack = torch.zeros(len(key) + 1, self._bias_rows[layer], dtype=like.dtype, device=like.device)
            for slot, lora_id in enumerate(key):
                noise = self._bias.get(lora_id, {}).get(layer) if lora_id is not None else None
                if noise is not None:
                    stack[slot] = noise.to(like.dtype)
            stacks[layer] = stack
        return stacks[layer]

    def _per_slot(self, slots: torch.Tensor, names: list[str]):
        """(row indices, [(sA, B) per name]) for each LoRA slot present in ``slots`` with an adapter."""
        ids = self._slot_ids()
        for slot in torch.unique(slots).tolist():
            lora_id = ids[slot] if 0 <= slot < len(ids) else None
            noise = self._tokens.get(lora_id) if lora_id is not None else None
            if noise:
                yield (slots == slot).nonzero().squeeze(1), [noise[n] for n in names if n in noise]

    def _embedding_hook(self, names: list[str]):
        def hook(module, inputs, output):
            token_ids, slots = inputs[0], self.punica.token_lora_indices
            if slots.shape[0] != output.shape[0]:
                raise RuntimeError(f"embedding: {output.shape[0]} rows but {slots.shape[0]} token slots")
            for rows, pairs in self._per_slot(slots, names):
                for sa, b in pairs:
                    delta = sa[token_ids[rows]] @ b.t()  # member's noise rows E[id] = sA[id] B^T
                    output.index_add_(0, rows, delta.to(output.dtype))
            return output

        return hook

    def _logits_hook(self, names: list[str]):
        def hook(module, inputs, output):
            if output is None:
                return output
            scale = float(getattr(module, "scale", 1.0))
            hidden, slots = inputs[1], self.punica.sampler_indices
            if slots.shape[0] != output.shape[0]:
                raise RuntimeError(f"logits: {output.shape[0]} rows but {slots.shape[0]} request slots")
            for rows, pairs in self._per_slot(slots, names):
                for sa, b in pairs:
                    if sa.shape[0] != output.shape[1]:
                        raise RuntimeError(
                            f"logits have {output.shape[1]} columns, lm_head noise {sa.shape[0]}"
                        )
                    delta = (hidden[rows].to(b.dtype) @ b) @ sa.t()  # h (sA B^T)^T
                    if scale != 1.0:  # the processor scales h W^T after the product (soft caps refused)
                        delta = delta * scale
                    output.index_add_(0, rows, delta.to(output.dtype))
            return output

        return hook
