"""Microseconds of one linear layer with a rank-1 population correction, three ways: two batched
matmuls (x B_m) A_m^T; the row-wise dot product plus outer product that ``engines/population.py`` uses
at a decode step; and the two matmuls over all members' factors (the other members' products zeroed)
that it uses from ``MATMUL_ROWS`` rows per member on (a prefill). The embedded model's layer shapes,
30 members x ``--rows`` rows each (2: a decode step of 2 prompts per member; 80: a prefill).

A fourth form, "row-wise C", is the row-wise one with its outer product through the C kernel the hooks
use in bf16 (``native.outer_add_bf16``). A fifth, "in GEMM", puts the correction inside the layer's own
matmul: the weight stored with the members' A columns beside it ([W | sigma A], K = in + n padded to a
multiple of 64, so W is a strided view of it) and each row's input extended by its coefficient x B_m in
its member's column (the other members' zero), one GEMM for both; it would need the weights stored that
way, and is measured to see whether that could pay. ``--cold`` streams 128 MB through the caches before every
timed call (not timed), as a decode step's weights do between two uses of a layer's factors.

Usage: python benchmarks/population_hooks.py [--dtype bfloat16] [--rows 2] [--reps 200] [--cold]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from esft.es import native

SHAPES = {
    "q/o": (896, 896),
    "k/v": (896, 128),
    "gate/up": (896, 4864),
    "down": (4864, 896),
    "lm_head": (896, 151936),  # once per model, not in the layer's total
}
PER_LAYER = {"q/o": 2, "k/v": 2, "gate/up": 2, "down": 1, "lm_head": 0}
FORMS = ("bmm", "rowwise", "rowwise-c", "matmul", "in-gemm")
_stream: list[torch.Tensor] = []  # --cold: 128 MB copied before each timed call


def timed(f, reps: int) -> float:
    for _ in range(10):
        f()
    spent = 0.0
    for _ in range(reps):
        if _stream:
            _stream[1].copy_(_stream[0])
        tic = time.perf_counter()
        f()
        spent += time.perf_counter() - tic
    return spent / reps * 1e6


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

    def rowwise_c():
        out = F.linear(x, w).view(n, rows, o_f)
        coef = (x.view(n, rows, i_f) * b_t).sum(-1, keepdim=True)
        if outer is None:  # no C kernel here: torch's, so the column reads as row-wise
            return out.addcmul_(coef, a_t)
        outer(out, coef, a_t)
        return out

    def matmul():
        out = F.linear(x, w)
        coef = torch.mm(x, b_t.view(n, i_f).T)
        coef.view(n, rows, n, 1).mul_(own)
        return out.addmm_(coef, a_t.view(n, o_f))

    k_aug = i_f + -(-n // 64) * 64  # in + n, padded: oneDNN's bf16 GEMM slows on odd K
    w_aug = torch.zeros(o_f, k_aug, dtype=dt)
    w_aug[:, :i_f] = w
    w_aug[:, i_f : i_f + n] = a_t.view(n, o_f).T
    x_aug = torch.zeros(n * rows, k_aug, dtype=dt)
    b_cols = b_t.view(n, i_f).T.contiguous()

    def in_gemm():
        coef = torch.mm(x, b_cols).view(n, rows, n, 1).mul_(own)  # every member's x B, the others' zeroed
        x_aug[:, :i_f] = x
        x_aug[:, i_f : i_f + n] = coef.view(n * rows, n)
        return F.linear(x_aug, w_aug)

    outer = native.outer_add_bf16() if dt == torch.bfloat16 else None
    forms = {"plain": plain, "bmm": bmm, "rowwise": rowwise, "rowwise-c": rowwise_c, "matmul": matmul}
    forms["in-gemm"] = in_gemm
    ref = rowwise().float().view(n * rows, o_f)
    gap = (in_gemm().float() - ref).abs().max()
    assert gap <= 0.02 * ref.abs().max(), f"in-GEMM form disagrees with row-wise by {gap}"
    return {k: timed(f, reps) for k, f in forms.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--rows", type=int, default=2, help="rows per member")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--cold", action="store_true", help="stream 128 MB through the caches before each call")
    args = ap.parse_args()
    if args.cold:
        _stream.extend([torch.ones(32 << 20), torch.empty(32 << 20)])
    dt = getattr(torch, args.dtype)
    n, rows = 30, args.rows
    torch.manual_seed(0)
    print(f"{args.dtype}, {n} members x {rows} rows, torch threads {torch.get_num_threads()}")
    print(
        f"{'layer':<8} {'plain us':>9} {'bmm +%':>7} {'row-wise +%':>12} {'row-wise C +%':>14} {'matmul +%':>10} "
        f"{'in GEMM +%':>11}"
    )
    total = dict.fromkeys(("plain", *FORMS), 0.0)
    for name, (i_f, o_f) in SHAPES.items():
        reps = args.reps if PER_LAYER[name] else max(5, args.reps // 20)
        t = time_layer(i_f, o_f, dt, n, rows, reps)
        for k in total:
            total[k] += PER_LAYER[name] * t[k]
        extra = [100 * (t[k] / t["plain"] - 1) for k in FORMS]
        print(
            f"{name:<8} {t['plain']:>9.1f} {extra[0]:>6.0f}% {extra[1]:>11.0f}% {extra[2]:>13.0f}% {extra[3]:>9.0f}% "
            f"{extra[4]:>10.0f}%"
        )
    extras = ", ".join(f"{k} +{100 * (total[k] / total['plain'] - 1):.0f}%" for k in FORMS)
    print(f"one transformer layer: plain {total['plain']:.0f} us, {extras}")


if __name__ == "__main__":
    main()
