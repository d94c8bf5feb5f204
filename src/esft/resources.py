"""What a run costs besides time: peak memory of this process (and of the GPU), logged by both trainers."""

from __future__ import annotations

import resource
import sys


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (the OS high-water mark: it never goes down)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def peak_cuda_mb() -> float:
    """Peak GPU memory allocated by torch in this process, in MiB (0 without CUDA)."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return 0.0
    return torch.cuda.max_memory_allocated() / 2**20


def peak_memory() -> dict[str, float]:
    """The metrics.jsonl fields for memory: perf/peak_rss_mb, and perf/peak_cuda_mb on a GPU."""
    out = {"perf/peak_rss_mb": round(peak_rss_mb(), 1)}
    cuda = peak_cuda_mb()
    if cuda:
        out["perf/peak_cuda_mb"] = round(cuda, 1)
    return out
