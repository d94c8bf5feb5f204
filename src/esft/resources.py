"""What a run costs besides time: peak memory of this process (and of the GPU), logged by both trainers.

Both trainers call ``reset_peak()`` once the policy model is loaded, so ``perf/peak_rss_mb`` is the
resident high-water mark of training itself (model weights included; the transient copies of loading
excluded). On Linux the mark is VmHWM of /proc/self/status, reset by writing 5 to /proc/self/clear_refs;
elsewhere it is getrusage's lifetime maximum and cannot be reset.
"""

from __future__ import annotations

import contextlib
import resource
import sys


def reset_peak() -> None:
    """Start a new resident-memory high-water mark (Linux) and a new CUDA peak."""
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


def peak_rss_mb() -> float:
    """Peak resident memory of this process since the last reset_peak (Linux) or ever, in MiB."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10  # kB
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
