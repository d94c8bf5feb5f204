"""Cost of ES noise work on the embedded model: perturb, restore and update, per noise scheme.

Usage: python benchmarks/noise_work.py [--dtype bfloat16] [--population 8] [--freeze-embeddings]
       [--schemes independent table]
Measures, side by side in one process on the same weights: seconds per member for perturb and for
restore, and seconds for one update over the population.
"""

from __future__ import annotations

import argparse
import time

from esft.engines import HFEngine
from esft.es import ParamSet, iteration_members, zscore
from esft.es.noise import noise_table
from esft.es.params import select_trained
from esft.models import embedded_model_path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--population", type=int, default=8)
    ap.add_argument("--freeze-embeddings", action="store_true", help="freeze embed_tokens and lm_head")
    ap.add_argument("--schemes", nargs="+", default=["independent", "table"])
    args = ap.parse_args()
    engine = HFEngine(str(embedded_model_path()), dtype=args.dtype)
    freeze = ["*embed_tokens*", "lm_head*"] if args.freeze_embeddings else []
    live = select_trained(engine.parameters(), freeze)
    members = iteration_members(0, 1, args.population)
    weights = zscore(list(range(args.population)))
    tic = time.perf_counter()
    noise_table("cpu")
    print(f"noise table: {time.perf_counter() - tic:.2f} s once per process")
    for scheme in args.schemes:
        params = ParamSet(live, scheme=scheme)
        perturb = restore = 0.0
        for m in members:
            tic = time.perf_counter()
            params.perturb(m, 1e-3)
            perturb += time.perf_counter() - tic
            tic = time.perf_counter()
            params.restore()
            restore += time.perf_counter() - tic
        tic = time.perf_counter()
        params.update(members, weights, 1e-9)  # tiny step: measure the cost, barely move the weights
        update = time.perf_counter() - tic
        n = args.population
        print(
            f"{scheme:>11}: {params.numel / 1e6:.1f}M params {args.dtype} | perturb {perturb / n:.2f} s/member | "
            f"restore {restore / n:.2f} s/member | update {update:.2f} s (N={n}) | "
            f"total noise work {perturb + restore + update:.1f} s/iteration",
            flush=True,
        )


if __name__ == "__main__":
    main()
