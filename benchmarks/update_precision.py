"""Seconds of one low-rank ES update (N=30) per weight dtype and update precision, on random matrices of
the embedded model's shapes (Qwen2.5-0.5B: 24 layers of q, k, v, o, gate, up, down; 358M values; the
quickstart's trained set, embeddings and lm_head frozen).

Usage: python benchmarks/update_precision.py [--layers 24] [--repeats 3]
Prints the best of ``--repeats`` per row (a warm-up update first), and each row's applied-step metrics.
Updates of this size run through the fused kernels (es/fused.py) unless ESFT_FUSED_UPDATE=off; the row
"stochastic (inductor)" sets the CPU's C kernel for stochastic rounding (es/native.py) aside, as on a
machine without a C compiler, to compare the two kernels side by side.
"""

from __future__ import annotations

import argparse
import time

import torch

from esft.es import ParamSet, fused, iteration_members, native

SHAPES = [(896, 896), (128, 896), (128, 896), (896, 896), (4864, 896), (4864, 896), (896, 4864)]
ROWS = [
    ("float32", torch.float32, "auto"),
    ("bfloat16", torch.bfloat16, "nearest"),
    ("bfloat16", torch.bfloat16, "stochastic"),
    ("bfloat16", torch.bfloat16, "stochastic (inductor)"),
    ("bfloat16", torch.bfloat16, "master"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--alpha", type=float, default=5e-4)
    args = ap.parse_args()
    members = iteration_members(0, 1, 30)
    weights = torch.randn(30, generator=torch.Generator().manual_seed(1)).tolist()
    print(f"torch threads {torch.get_num_threads()}, alpha {args.alpha:g}, N=30, rank 1")
    print(f"{'dtype':<9} {'precision':<21} {'seconds':>8} {'cosine':>7} {'lost':>7}")
    c_kernel = native.stochastic_bf16
    for dtype_name, dtype, row in ROWS:
        precision = row.split()[0]
        inductor = row.endswith("(inductor)")
        native.stochastic_bf16 = (lambda: None) if inductor else c_kernel
        fused.FUSED._kernels.pop(("stochastic", torch.bfloat16, "cpu"), None)  # rebuilt for this row
        g = torch.Generator().manual_seed(0)
        params = {
            f"l{i}.{j}.weight": (torch.randn(s, generator=g) * 0.02).to(dtype)
            for i in range(args.layers)
            for j, s in enumerate(SHAPES)
        }
        ps = ParamSet(params, scheme="lowrank", precision=precision)
        ps.update(members, weights, args.alpha)  # warm-up (allocations)
        best, stats = float("inf"), None
        for _ in range(args.repeats):
            tic = time.perf_counter()
            stats = ps.update(members, weights, args.alpha)
            best = min(best, time.perf_counter() - tic)
        print(
            f"{dtype_name:<9} {ps.precision + (' (inductor)' if inductor else ''):<21} {best:>8.2f} "
            f"{stats.step_cosine:>7.4f} "
            f"{stats.lost_fraction:>7.1%}"
        )


if __name__ == "__main__":
    main()
