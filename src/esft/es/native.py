"""Small C kernels for the CPU (``native_update.c``): the update with stochastic rounding into bfloat16
(``stochastic_bf16``), and the population hooks' rank-1 decode correction into bf16 outputs
(``outer_add_bf16``, torch's ``addcmul_`` bit for bit with its cold operands prefetched).

Why not inductor, as for the other kernels (fused.py): stochastic rounding works on the bit pattern of
the float32 sum (``x.view(torch.int32)``), and inductor's CPU code generator has no vector form of that
reinterpretation; it copies each vector through a scalar loop, twice per value. Its kernel took
1.31-1.56 ms per million values where the same arithmetic in plain C, vectorised by the compiler, takes
0.76-0.77 ms (2026-12-05, 2-core AMD EPYC with avx512_bf16; ``benchmarks/update_kernels.py``). On CUDA
inductor's Triton kernel does the reinterpretation natively and is kept.

The source ships with the package and is compiled on first use with the system's C compiler (``$CC``,
else ``cc``, ``gcc`` or ``clang``) for this CPU (``-march=native``, falling back to a generic build),
into ``<esft cache>/kernels/``, under a name keyed by the source, the compiler and the CPU's flags, so
machines that share a home folder do not load each other's builds. The library is loaded with ctypes,
which releases the GIL during the call; the kernel splits rows over ``torch.get_num_threads()``
threads: OpenMP's where the compiler has it, and the process's libgomp is then torch's, whose threads
are still spinning from the low-rank product just before; else POSIX threads, which compete with those
spinning threads for the cores (on a 2-core Xeon with amx_bf16 and avx512_bf16, 2026-12-05: 1.56-1.64
ms per million values with POSIX threads, 0.83 with OpenMP's, ``benchmarks/update_kernels.py``; the
update of 630M values 1.86 s against 1.08, ``benchmarks/update_breakdown.py [--pthreads]``; with the
weights prefetched and the lane sums added as a tree, 2026-12-06: 0.46 ms and 0.84 s). Where no
compiler works, ``kernel()`` returns None with the reason and the update falls back to inductor, then
to the eager path (fused.py).
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.resources
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

SOURCE = "native_update.c"
FLAGS = ["-O3", "-ffp-contract=off", "-fPIC", "-shared", "-pthread"]
TUNED = ["-march=native"]
OPENMP = ["-fopenmp"]  # rows on torch's own OpenMP threads (native_update.c); POSIX threads without it
BLOCK = 128  # rows of the weights the kernel takes; the C source's BLOCK

_loaded: tuple[ctypes.CDLL | None, str] | None = None


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_identity() -> str:
    """What a build for this CPU depends on: the flags line of /proc/cpuinfo, else the platform."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def _cache_folder() -> Path:
    from esft.models import cache_dir

    return cache_dir() / "kernels"


def _build(source: str, cc: str) -> Path:
    """The shared library for ``source``, compiled once per (source, compiler, CPU) into the cache."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256("\0".join([source, version, _cpu_identity(), *FLAGS, *OPENMP]).encode()).hexdigest()
    folder = _cache_folder()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        folder = Path(tempfile.gettempdir()) / "esft-kernels"
        folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"update-{key[:20]}.so"
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        src = Path(tmp) / SOURCE
        src.write_text(source)
        out = Path(tmp) / target.name
        errors = ""
        # a compiler without OpenMP (clang without libomp) builds the POSIX-threads variant; one
        # without -march=native a generic library
        for extra in ([*TUNED, *OPENMP], OPENMP, TUNED, []):
            done = subprocess.run(
                [cc, *FLAGS, *extra, str(src), "-o", str(out)], capture_output=True, text=True, timeout=300
            )
            if done.returncode == 0:
                os.replace(out, target)  # atomic: processes building at once each load a whole file
                return target
            errors = (done.stderr or done.stdout).strip()
        raise RuntimeError(errors.splitlines()[0] if errors else f"{cc} failed")


def library() -> tuple[ctypes.CDLL | None, str]:
    """(the loaded kernel library, "") or (None, why it is unavailable); built once per process."""
    global _loaded
    if _loaded is None:
        cc = _compiler()
        if cc is None:
            _loaded = None, "no C compiler (cc, gcc or clang)"
        else:
            try:
                source = importlib.resources.files("esft.es").joinpath(SOURCE).read_text()
                lib = ctypes.CDLL(str(_build(source, cc)))
                fn = lib.esft_stochastic_bf16
                fn.restype = None
                fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint32,
                               ctypes.c_uint32, ctypes.c_uint32, ctypes.c_void_p, ctypes.c_int]  # fmt: skip
                lib.esft_uses_openmp.restype = ctypes.c_int
                fn = lib.esft_outer_add_bf16
                fn.restype = None
                fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                               ctypes.c_int64, ctypes.c_int64, ctypes.c_int]  # fmt: skip
                _loaded = lib, ""
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                _loaded = None, f"the C kernel did not build: {e}"
    return _loaded


def threading() -> str | None:
    """How the loaded kernel splits rows: "openmp" (on torch's OpenMP threads) or "pthreads"; None
    where the library is unavailable."""
    lib, _ = library()
    if lib is None:
        return None
    return "openmp" if lib.esft_uses_openmp() else "pthreads"


def stochastic_bf16() -> Callable | None:
    """The kernel with the compiled stochastic kernel's signature (fused.py): ``kernel(o, intended, key)``
    updates bf16 ``o`` (rows, BLOCK) in place by float32 ``intended`` (rows, BLOCK) with the hash key
    ``key`` = int32 [offset, seed lo, seed hi], and returns the (6, rows) float64 row sums; None where the
    library is unavailable (``library()`` says why)."""
    lib, _ = library()
    if lib is None:
        return None
    fn = lib.esft_stochastic_bf16

    def kernel(o: torch.Tensor, intended: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        if not (
            o.dtype == torch.bfloat16 and intended.dtype == torch.float32 and o.device.type == "cpu"
            and o.is_contiguous() and intended.is_contiguous() and o.shape == intended.shape
            and o.ndim == 2 and o.shape[1] == BLOCK
        ):  # fmt: skip
            raise ValueError("the C kernel takes contiguous (rows, 128) bf16 weights and float32 steps")
        rows = o.shape[0]
        sums = torch.empty(6, rows, dtype=torch.float64)
        offset, lo, hi = (v & 0xFFFFFFFF for v in key.tolist())
        fn(o.data_ptr(), intended.data_ptr(), rows, offset, lo, hi, sums.data_ptr(), torch.get_num_threads())
        return sums

    kernel.native = True  # fused.py: not a torch.compile'd function (no dynamic-shape marks)
    return kernel


_outer: tuple[Callable | None] | None = None


def outer_add_bf16() -> Callable | None:
    """The population hooks' rank-1 decode correction (``engines/population.py``):
    ``kernel(out, coef, a)`` does ``out.addcmul_(coef, a)`` in place, bit for bit, for contiguous CPU
    bf16 ``out`` (n, rows, cols), ``coef`` (n, rows, 1) and ``a`` (n, 1, cols) (NaNs as NaNs, their bits
    aside), prefetching the cold
    operands. None where the library is unavailable, has no OpenMP (the hooks would run it on one thread:
    torch's kernel is faster there) or disagrees with torch on a test case; checked once per process."""
    global _outer
    if _outer is None:
        _outer = (None,)
        if threading() == "openmp":
            fn = library()[0].esft_outer_add_bf16

            def kernel(out: torch.Tensor, coef: torch.Tensor, a: torch.Tensor) -> None:
                n, rows, cols = out.shape
                c = coef.float().contiguous()
                fn(out.data_ptr(), c.data_ptr(), a.data_ptr(), n, rows, cols, torch.get_num_threads())

            gen = torch.Generator().manual_seed(0)
            out = torch.randn(3, 2, 4100, generator=gen).bfloat16()  # spans and a ragged tail
            out.view(-1)[:4] = torch.tensor([float("nan"), float("inf"), -0.0, 1e-40])
            coef = torch.randn(3, 2, 1, generator=gen).bfloat16()
            a = (torch.randn(3, 1, 4100, generator=gen) * 1e-2).bfloat16()
            got = out.clone()
            kernel(got, coef, a)
            want = out.addcmul_(coef, a)
            nan = want.isnan()  # a NaN's sign and payload differ between torch's own scalar and vector paths
            if torch.equal(got.isnan(), nan) and torch.equal(
                got[~nan].view(torch.int16), want[~nan].view(torch.int16)
            ):
                _outer = (kernel,)
    return _outer[0]
