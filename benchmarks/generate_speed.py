"""Greedy generation throughput of the HF engine on the embedded model, per dtype and batch size.

Usage: python benchmarks/generate_speed.py [--dtypes float32 bfloat16] [--batches 2 8] [--tokens 32]
Prints tokens/s for each (dtype, batch) measured side by side in one process.
"""

from __future__ import annotations

import argparse
import time

from esft.engines import HFEngine
from esft.models import embedded_model_path
from esft.tasks import load_task


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--batches", nargs="+", type=int, default=[2, 8])
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    rows = load_task("conciseness").split("train")  # raw prompts: no early end of sequence
    for dtype in args.dtypes:
        engine = HFEngine(str(embedded_model_path()), dtype=dtype)
        engine.generate([rows[0]["prompt"]], 4)  # warm-up
        for batch in args.batches:
            prompts = [rows[i % len(rows)]["prompt"] for i in range(batch)]
            tic = time.perf_counter()
            gens = engine.generate(prompts, args.tokens)
            seconds = time.perf_counter() - tic
            tokens = sum(g.num_tokens for g in gens)
            print(f"{dtype:>9} batch {batch:>3}: {seconds:6.2f} s, {tokens / seconds:6.1f} tok/s", flush=True)


if __name__ == "__main__":
    main()
