"""Which dtype a run computes in: ``--dtype auto`` picks the fastest dtype the hardware does natively.

bfloat16 halves the bytes every decode step reads and, where the hardware has bf16 instructions, raises
the arithmetic rate: on a 2-core CPU with ``avx512_bf16`` the quickstart's iterations took 21-22 s in
bf16 against 48 s in float32 (docs/experiments.md). Where the hardware only emulates bf16 (a CPU
without those instructions, a CUDA device before compute capability 8.0), it is slower than float32
(docs/benchmarks.md, the AVX2 machine). So ``auto`` is:

- CUDA: bfloat16 on compute capability 8.0 or newer (Ampere, Hopper, ...), else float32 (fp16 would be
  native there, but its 5-bit exponent overflows in LLM activations without loss scaling);
- CPU: bfloat16 when /proc/cpuinfo lists ``avx512_bf16`` or ``amx_bf16``, else float32.

The choice and its reason are printed and recorded in ``environment.json``; ES keeps its small steps
in bf16 with float32 masters or stochastic rounding (``es/precision.py``).
``ESFT_CPU_FLAGS`` (space-separated) replaces the CPU's flags, for tests and for forcing a choice.
"""

from __future__ import annotations

import os
import platform
from functools import lru_cache

import torch

from esft.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {
    "fp32": "float32",
    "bf16": "bfloat16",
    "fp16": "float16",
    "float": "float32",
    "half": "float16",
}
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@lru_cache(maxsize=1)
def _proc_cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (``ESFT_CPU_FLAGS`` overrides them; empty where unknown)."""
    forced = os.environ.get("ESFT_CPU_FLAGS")
    if forced is not None:
        return frozenset(forced.split())
    return _proc_cpu_flags()


# the flags that decide a CPU's speed in ES's arithmetic, named beside every speed figure
SPEED_FLAGS = ("avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")


@lru_cache(maxsize=1)
def _proc_cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_summary() -> str:
    """The CPU's model and its speed-relevant flags, for benchmark headers and environment.json:
    "Intel(R) Xeon(R) Processor [avx512f avx512_bf16 amx_bf16]"."""
    flags = [f for f in SPEED_FLAGS if f in cpu_flags()]
    return f"{_proc_cpu_model()} [{' '.join(flags) or 'none of ' + ' '.join(SPEED_FLAGS)}]"


def choose(dtype: str, device: str) -> tuple[torch.dtype, str]:
    """(torch dtype, why) for the setting ``dtype`` on ``device`` (cpu, cuda, cuda:N)."""
    if dtype != "auto":
        name = DTYPE_ALIASES.get(dtype, dtype)
        if name not in DTYPES:
            raise ConfigError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
        return DTYPES[name], "--dtype " + name
    if device.startswith("cuda"):
        major, minor = torch.cuda.get_device_capability(torch.device(device))
        if major >= 8:
            return torch.bfloat16, f"auto: CUDA compute capability {major}.{minor} computes bfloat16 natively"
        return torch.float32, f"auto: CUDA compute capability {major}.{minor} (< 8.0) has no native bfloat16"
    flags = cpu_flags()
    native = [f for f in CPU_BF16_FLAGS if f in flags]
    if native:
        return torch.bfloat16, f"auto: the CPU computes bfloat16 natively ({' and '.join(native)})"
    return torch.float32, "auto: the CPU has no native bfloat16 (no avx512_bf16 or amx_bf16)"
