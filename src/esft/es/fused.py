"""The ES update of one chunk in one pass: add the step, store it, and sum the step statistics.

``ParamSet.update`` (params.py) writes ``old + intended`` into the stored weights by the precision mode
(precision.py) and compares the applied step with the intended one. Written as eager torch operations
that is about 28 passes over every trained value (the float32 add, the rounding hash, the cast, the
parameter norm, three step norms and two counts): 3.9 s per update of the 630M values of the embedded
model in bf16 on a 2-core CPU, where generating a whole iteration takes 16 s. ``torch.compile``
(inductor) turns the same operations into one loop over each chunk: 1.2 s for the whole update, the
low-rank product included (docs/benchmarks.md).

**The weights are bit-identical** to the eager path's: the one float operation on them is the float32
addition ``old + intended`` (correctly rounded in both, and inductor does not contract it into an FMA);
the rest is integer arithmetic on the bits (the rounding hash, the truncation) or an exact cast. So a
run does not depend on which path updated it: resume, replay and Ray workers agree bit for bit.

**The statistics** (``StepStats``) are float32 sums of blocks of ``BLOCK`` values, one block per row
of a (rows, BLOCK) view, then summed in float64: the same bits for any thread count (a row is never
split between threads), and closer to the exact sums than one float32 norm over a million values (the
eager path's, which differs in the fifth digit).

**Stochastic rounding on the CPU** runs the C kernel of native.py instead of inductor's (inductor has no
vector form of the bit reinterpretation there, and its kernel took twice as long); inductor's serves CUDA,
and the CPU where no C compiler works.

**When**: ``ESFT_FUSED_UPDATE`` = ``auto`` (default: for updates of at least ``MIN_NUMEL`` values,
where compiling once pays within a few iterations), ``on`` or ``off``. The first use of each kernel
compiles it and checks it against the eager path on a small case (odd sizes, a hash offset past 2**31);
a platform where that fails (no C++ compiler, an inductor error, a different result) updates eagerly,
with a one-line note.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import torch

from esft.errors import ConfigError, first_line
from esft.es import native
from esft.es import precision as prec

BLOCK = 128  # values per statistics row: hidden sizes are multiples of it, so chunks rarely have tails
MIN_NUMEL = 1 << 24  # auto: fuse updates of at least this many trained values
ENV = "ESFT_FUSED_UPDATE"


def _stats(w: torch.Tensor, a: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    """(6, rows) float32 row sums over (rows, BLOCK) float32 values (the counts are exact: at most
    BLOCK per row)."""
    return torch.stack(
        [
            (w * w).sum(1),
            (i * i).sum(1),
            (a * a).sum(1),
            (a * i).sum(1),
            (i != 0).sum(1).float(),
            (a != 0).sum(1).float(),
        ]
    )


def _bits(shape: torch.Size, key: torch.Tensor) -> torch.Tensor:
    """precision.random_bits as int32 arithmetic on a (rows, BLOCK) grid; key = [offset, seed lo, seed hi]
    (int32, the offset wrapped like the eager path's int64 -> int32 cast). The same hash as
    precision's, written out of place: calling its in-place ``_mix32`` here makes inductor store the
    intermediate, and the stochastic kernel took 1.9 ms per 1M values instead of 1.3 (2026-12-05,
    2-core EPYC with avx512_bf16). The self-check and tests/test_fused.py hold the two to the same bits."""
    h = torch.arange(shape[0] * shape[1], dtype=torch.int32, device=key.device).view(shape)
    h = (h + key[0]) * prec.signed32(0x9E3779B9) + key[1]
    h = h ^ key[2]
    h = h ^ ((h >> 16) & 0xFFFF)
    h = h * prec.signed32(0x7FEB352D)
    h = h ^ ((h >> 15) & 0x1FFFF)
    h = h * prec.signed32(0x846CA68B)
    return h ^ ((h >> 16) & 0xFFFF)


def _hash_key(offset: int, stream: int, device: torch.device | str) -> torch.Tensor:
    """``_bits``' key: a tensor, so that a new seed or offset is new data, not a new compiled graph. It is
    filled where it lives (three fill kernels, 7 us on a CPU against 3 for ``torch.tensor``): on a GPU
    ``torch.tensor`` would copy it from host memory and wait for the device at every chunk."""
    values = [prec.signed32(offset), prec.signed32(stream), prec.signed32(stream >> 32)]
    key = torch.empty(3, dtype=torch.int32, device=device)
    for i, v in enumerate(values):
        key[i] = v
    return key


def _stochastic_bf16(o: torch.Tensor, intended: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """bf16 weights ``o`` <- stochastic_round(o + intended), in place; the row sums (each kernel takes
    them before it writes ``o``: a traced read of ``o`` after ``copy_`` sees the new values)."""
    before = o.float()
    x = before + intended
    rounded = ((x.view(torch.int32) + (_bits(o.shape, key) & 0xFFFF)) & -65536).view(torch.float32)
    sums = _stats(before, rounded - before, intended)
    o.copy_(rounded.to(o.dtype))
    return sums


def _nearest(o: torch.Tensor, intended: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 weights ``o`` <- o + intended rounded to nearest, in place; the row sums."""
    before = o.float()
    new = (before + intended).to(o.dtype)
    sums = _stats(before, new.float() - before, intended)
    o.copy_(new)
    return sums


def _float32(o: torch.Tensor, intended: torch.Tensor) -> torch.Tensor:
    """float32 weights or masters ``o`` += intended, in place; the row sums."""
    new = o + intended
    sums = _stats(o, new - o, intended)
    o.copy_(new)
    return sums


def _float32_to(o: torch.Tensor, live: torch.Tensor, intended: torch.Tensor) -> torch.Tensor:
    """float32 masters ``o`` += intended and their compute copy ``live`` cast from them, in place."""
    new = o + intended
    sums = _stats(o, new - o, intended)
    o.copy_(new)
    live.copy_(new.to(live.dtype))
    return sums


class Fused:
    """The compiled kernels of one process, each checked against the eager path on first use."""

    def __init__(self) -> None:
        self._kernels: dict[tuple, Callable | None] = {}
        self.noted = False

    def built(self) -> bool:
        """Whether a compiled kernel has been built (and passed its check) in this process."""
        return any(k is not None for k in self._kernels.values())

    def enabled(self, numel: int) -> bool:
        """Whether an update of ``numel`` trained values should use the compiled kernels."""
        setting = os.environ.get(ENV, "auto").strip().lower()
        if setting not in ("auto", "on", "off"):
            raise ConfigError(f"{ENV} must be auto, on or off, got {setting!r}")
        return setting == "on" or (setting == "auto" and numel >= MIN_NUMEL)

    def apply(
        self,
        mode: str,
        old: torch.Tensor,
        live: torch.Tensor,
        intended: torch.Tensor,
        stream: int,
        offset: int,
    ) -> torch.Tensor | None:
        """Update ``old`` (and ``live`` where it is a separate compute copy) by ``intended`` over whole
        BLOCK rows, as ``ParamSet._apply`` would; None where no compiled kernel serves this case (the
        caller updates eagerly). All three are flat, contiguous, of one length, a multiple of BLOCK.

        Returns the chunk's sums in ``StepStats.add_sums``' order, float64, on the weights' device:
        <w,w>, <i,i>, <a,a>, <a,i>, #(i != 0) and #(a != 0) for the weights w before the update, the
        intended step i and the applied step a. Nothing waits for the device here: ``StepStats.settle``
        reads them once per update."""
        key, args = self._route(mode, old, live, intended, stream, offset)
        kernel = None if key is None else self._kernel(key)
        if kernel is None:
            return None
        if not getattr(kernel, "native", False):
            for t in args:
                if t.ndim == 2 and t.shape[0] > 1:  # rows vary from call to call; BLOCK is compiled in
                    torch._dynamo.mark_dynamic(t, 0)
        try:
            rows = kernel(*args)
        except Exception as e:  # noqa: BLE001 - a later (re)compile failed before the kernel wrote anything
            self._kernels[key] = None
            self._note(_describe(e))
            return None
        return rows.double().sum(1)

    def _route(self, mode, old, live, intended, stream, offset):
        rows = (-1, BLOCK)
        separate = live.data_ptr() != old.data_ptr()
        if old.dtype == torch.float32:
            if separate:
                key = ("float32_to", live.dtype, old.device.type)
                args = (old.view(rows), live.view(rows), intended.view(rows))
            else:
                key, args = ("float32", None, old.device.type), (old.view(rows), intended.view(rows))
        elif separate:
            return None, ()
        elif mode == "stochastic" and old.dtype == torch.bfloat16:
            k = _hash_key(offset, stream, old.device)
            key, args = ("stochastic", old.dtype, old.device.type), (old.view(rows), intended.view(rows), k)
        elif mode == "nearest":
            key, args = ("nearest", old.dtype, old.device.type), (old.view(rows), intended.view(rows))
        else:
            return None, ()
        return key, args

    def _note(self, problem: str) -> None:
        if not self.noted:
            print(
                f"esft: the fused update kernel is unavailable here ({problem}); updating eagerly",
                file=sys.stderr,
            )
            self.noted = True

    def _kernel(self, key: tuple) -> Callable | None:
        if key not in self._kernels:
            self._kernels[key] = self._build(key)
        return self._kernels[key]

    def _build(self, key: tuple) -> Callable | None:
        name, dtype, device = key
        if name == "stochastic" and device == "cpu":
            # inductor has no vector form of the bit reinterpretation on the CPU: a C kernel (native.py)
            kernel = native.stochastic_bf16()
            if kernel is not None and self_check(kernel, name, dtype, device) is None:
                return kernel
        fn = {
            "stochastic": _stochastic_bf16,
            "nearest": _nearest,
            "float32": _float32,
            "float32_to": _float32_to,
        }
        try:
            # emulate_precision_casts: a cast to bf16 and back rounds, as in eager (inductor would keep
            # the float32 value otherwise, and the nearest kernel would measure an unrounded step)
            options = {"emulate_precision_casts": True}
            kernel = torch.compile(fn[name], dynamic=False, fullgraph=True, options=options)
            problem = self_check(kernel, name, dtype, device)
        except Exception as e:  # noqa: BLE001 - any failure to compile means: update eagerly
            problem = _describe(e)
        if problem is None:
            return kernel
        self._note(problem)
        return None


def _describe(e: Exception) -> str:
    return f"{type(e).__name__}: {first_line(e)}"


def self_check(kernel: Callable, name: str, dtype: torch.dtype | None, device: str) -> str | None:
    """None if ``kernel`` gives the eager path's weights on a small case, else what differs."""
    gen = torch.Generator().manual_seed(0)
    for n in (7 * BLOCK, 2 * BLOCK):  # two sizes: the second call runs the dynamic-shape kernel
        base = torch.randn(n, generator=gen) * 0.02
        intended = (torch.randn(n, generator=gen) * 1e-5).to(device)
        intended[::5] = 0.0
        stored = base.to(torch.float32 if name.startswith("float32") else dtype).to(device)
        want = stored.clone()
        offset, stream = (1 << 31) - 3 * BLOCK, 0x1234_5678_9ABC_DEF0
        if name == "stochastic":
            want.copy_(prec.stochastic_round(want.float() + intended, dtype, stream, offset))
            got = stored.clone()
            kernel(got.view(-1, BLOCK), intended.view(-1, BLOCK), _hash_key(offset, stream, device))
        elif name == "nearest":
            torch.add(want.float(), intended, out=want)
            got = stored.clone()
            kernel(got.view(-1, BLOCK), intended.view(-1, BLOCK))
        else:
            want.add_(intended)
            got = stored.clone()
            if name == "float32_to":
                live = torch.empty(n, dtype=dtype, device=device)
                kernel(got.view(-1, BLOCK), live.view(-1, BLOCK), intended.view(-1, BLOCK))
                if not torch.equal(live, want.to(dtype)):
                    return "its compute copy differs from the eager cast"
            else:
                kernel(got.view(-1, BLOCK), intended.view(-1, BLOCK))
        if not torch.equal(got, want):
            return f"its {name} update differs from the eager one"
    return None


FUSED = Fused()
