"""Microseconds of one linear layer with a rank-1 population correction, three ways: two batched
matmuls (x B_m) A_m^T; the row-wise dot product plus outer product that ``engines/population.py`` uses
at a decode step; and the two matmuls over all members' factors (the other members' products zeroed)
that it uses from ``MATMUL_ROWS`` rows per member on (a prefill). The embedded model's layer shapes,
30 members x ``--rows`` rows each (2: a decode step of 2 prompts per member; 80: a prefill).

Usage: python benchmarks/population_hooks.py [--dtype bfloat16] [--rows 2] [--reps 200]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

SHAPES = {"q/o": (896, 896), "k/v": (896, 128), "gate/up": (896, 4864), "down": (4864, 896)}
PER_LAYER = {"q/o": 2, "k/v": 2, "gate/up": 2, "down": 1}
FORMS = ("bmm", "rowwise", "matmul")


def timed(f, reps: int) -> float:
    for _ in range(10):
        f()
    tic = time.perf_counter()
    for _ in range(reps):
        f()
    return (time.perf_counter() - tic) / reps * 1e6


def time_layer(i_f: int, o_f: int, dt: torch.dtype, n: int, rows: int, reps: int) -> dict[str, float]:
    w = (torch.randn(o_f, i_f) * 0.02).to(dt)
    x = torch.randn(n * rows, i_f).to(dt)
    a_t = (torch.randn(n, 1, o_f) * 1e-3).to(dt)
    b_t = torch.randn(n, 1, i_f).to(dt)
    own = torch.eye(n, dtype=dt).view(n, 1, n, 1)

    def plain():
        return F.linear(x, w)

    def bmm():
        out = F.linear(x, w).view(n, rows, o_f)
        return out.add_(torch.bmm(torch.bmm(x.view(n, rows, i_f), b_t.transpose(1, 2)), a_t))

    def rowwise():
        out = F.linear(x, w).view(n, rows, o_f)
        return out.addcmul_((x.view(n, rows, i_f) * b_t).sum(-1, keepdim=True), a_t)

    def matmul():
        out = F.linear(x, w)
        coef = torch.mm(x, b_t.view(n, i_f).T)
        coef.view(n, rows, n, 1).mul_(own)
        return out.addmm_(coef, a_t.view(n, o_f))

    forms = {"plain": plain, "bmm": bmm, "rowwise": rowwise, "matmul": matmul}
    return {k: timed(f, reps) for k, f in forms.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--rows", type=int, default=2, help="rows per member")
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args()
    dt = getattr(torch, args.dtype)
    n, rows = 30, args.rows
    torch.manual_seed(0)
    print(f"{args.dtype}, {n} members x {rows} rows, torch threads {torch.get_num_threads()}")
    print(f"{'layer':<8} {'plain us':>9} {'bmm +%':>7} {'row-wise +%':>12} {'matmul +%':>10}")
    total = dict.fromkeys(("plain", *FORMS), 0.0)
    for name, (i_f, o_f) in SHAPES.items():
        t = time_layer(i_f, o_f, dt, n, rows, args.reps)
        for k in total:
            total[k] += PER_LAYER[name] * t[k]
        extra = [100 * (t[k] / t["plain"] - 1) for k in FORMS]
        print(f"{name:<8} {t['plain']:>9.1f} {extra[0]:>6.0f}% {extra[1]:>11.0f}% {extra[2]:>9.0f}%")
    extras = ", ".join(f"{k} +{100 * (total[k] / total['plain'] - 1):.0f}%" for k in FORMS)
    print(f"one transformer layer: plain {total['plain']:.0f} us, {extras}")


if __name__ == "__main__":
    main()
