"""Where one low-rank ES update (N=30, bf16, stochastic rounding) of the embedded model's 630M values
spends its time: the C kernel's calls, and the rest (drawing the factors, their low-rank product, the
loop). Random matrices of Qwen2.5-0.5B's shapes: 24 layers of q, k, v, o, gate, up, down, plus the
embedding and an untied lm_head. Also a 1.26 GB copy, the machine's memory bandwidth for comparison.

    python benchmarks/update_breakdown.py                         # the kernel on OpenMP threads
    python benchmarks/update_breakdown.py --pthreads              # its POSIX-threads build
    OMP_WAIT_POLICY=PASSIVE python benchmarks/update_breakdown.py --pthreads

``--pthreads`` builds the kernel without OpenMP (into a temporary cache), as a compiler without it would.
Prints the best of ``--repeats`` updates after a warm-up.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from esft.es import ParamSet, iteration_members, native

SHAPES = [(896, 896), (128, 896), (128, 896), (896, 896), (4864, 896), (4864, 896), (896, 4864)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pthreads", action="store_true", help="the kernel's build without OpenMP")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.pthreads:
        os.environ["ESFT_CACHE"] = tempfile.mkdtemp(prefix="esft-kernels-")
        native.OPENMP = ["--no-such-flag-esft"]  # every OpenMP build fails: the POSIX-threads one serves
    print(f"torch threads {torch.get_num_threads()}, kernel threading: {native.threading()}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}")  # fmt: skip

    x = torch.randn(315_000_000)  # 1.26 GB
    y = torch.empty_like(x)
    y.copy_(x)
    tic = time.perf_counter()
    y.copy_(x)
    copy = time.perf_counter() - tic
    print(f"copy of 1.26 GB: {copy:.3f} s, {2 * 1.26 / copy:.1f} GB/s read + written")
    del x, y

    g = torch.Generator().manual_seed(0)
    params = {
        f"l{i}.{j}.weight": (torch.randn(s, generator=g) * 0.02).bfloat16()
        for i in range(24)
        for j, s in enumerate(SHAPES)
    }
    for name in ("embed.weight", "head.weight"):
        params[name] = (torch.randn(151936, 896, generator=g) * 0.02).bfloat16()
    total = sum(t.numel() for t in params.values())
    members = iteration_members(0, 1, 30)
    weights = torch.randn(30, generator=torch.Generator().manual_seed(1)).tolist()

    kernel = native.stochastic_bf16()
    spent = [0.0]

    def timed_kernel(*a):
        tic = time.perf_counter()
        out = kernel(*a)
        spent[0] += time.perf_counter() - tic
        return out

    timed_kernel.native = True
    native.stochastic_bf16 = lambda: timed_kernel  # fused.py builds its kernel through this
    ps = ParamSet(params, scheme="lowrank", precision="stochastic")
    ps.update(members, weights, 5e-4)  # warm-up: allocations, the kernel's build and self-check
    best = None
    for _ in range(args.repeats):
        spent[0] = 0.0
        tic = time.perf_counter()
        ps.update(members, weights, 5e-4)
        row = (time.perf_counter() - tic, spent[0])
        best = row if best is None or row[0] < best[0] else best
    whole, in_kernel = best
    print(f"update of {total / 1e6:.0f}M values: {whole:.2f} s; C kernel {in_kernel:.2f} s "
          f"({in_kernel * 1e3 / (total / 1e6):.2f} ms per 1M), the rest {whole - in_kernel:.2f} s")  # fmt: skip


if __name__ == "__main__":
    main()
