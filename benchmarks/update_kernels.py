"""Milliseconds per million values of each update kernel alone (es/fused.py, es/native.py): the stored
weights' update and its step statistics over a 1M-value chunk, as ``ParamSet.update`` calls them, without
the low-rank product that makes the step.

Usage: python benchmarks/update_kernels.py [--chunks 128] [--repeats 3]
Each row walks ``--chunks`` consecutive 1M-value chunks of one large weight tensor (so the weights come
from memory, as in a real update, and the step from cache) and prints the best of ``--repeats`` passes.
Rows: the C kernel for stochastic rounding into bf16, inductor's kernel for the same (what CUDA and a
CPU without a C compiler run), the other fused kernels, and the eager path for comparison.
"""

from __future__ import annotations

import argparse
import time

import torch

from esft.es import ParamSet, fused, native
from esft.es import precision as prec

N = 1 << 20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    intended = torch.randn(N, generator=gen) * 1e-5
    weights = {
        torch.bfloat16: (torch.randn(args.chunks * N, generator=gen) * 0.02).bfloat16(),
        torch.float32: torch.randn(args.chunks * N, generator=gen) * 0.02,
    }
    c_kernel = native.stochastic_bf16
    rows = [
        ("stochastic bf16, C kernel", "stochastic", torch.bfloat16, "native"),
        ("stochastic bf16, inductor", "stochastic", torch.bfloat16, "inductor"),
        ("stochastic bf16, eager", "stochastic", torch.bfloat16, "eager"),
        ("nearest bf16, inductor", "nearest", torch.bfloat16, "inductor"),
        ("float32, inductor", "float32", torch.float32, "inductor"),
    ]
    print(f"torch threads {torch.get_num_threads()}, {args.chunks} chunks of 2**20 values")
    print(f"{'kernel':<28} {'ms per 1M':>10}")
    for label, mode, dtype, kind in rows:
        native.stochastic_bf16 = c_kernel if kind == "native" else (lambda: None)
        own = fused.Fused()
        big = weights[dtype]

        eager = ParamSet(
            {"w": big}, scheme="lowrank", precision="auto" if mode == "float32" else mode
        )  # its chunk update (_apply)

        def one_pass(own=own, big=big, mode=mode, kind=kind, eager=eager, label=label) -> None:
            for c in range(args.chunks):
                o = big[c * N : (c + 1) * N]
                if kind == "eager":
                    eager._apply(big, big, slice(c * N, (c + 1) * N), intended, 7, prec.StepStats())
                elif own.apply(mode, o, o, intended, 7, c * N) is None:
                    raise SystemExit(f"{label}: no kernel here (see the note above)")

        one_pass()  # compile, self-check, warm up
        best = float("inf")
        for _ in range(args.repeats):
            tic = time.perf_counter()
            one_pass()
            best = min(best, time.perf_counter() - tic)
        if kind == "native" and not getattr(own._kernels[(mode, dtype, "cpu")], "native", False):
            label += " (unavailable: " + native.library()[1] + ")"
        print(f"{label:<28} {best / args.chunks * 1e3:>10.3f}", flush=True)
    native.stochastic_bf16 = c_kernel


if __name__ == "__main__":
    main()
