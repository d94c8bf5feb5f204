"""Where a low-rank population's generation spends the time its floor does not: torch's profiler over
one batched greedy generation of the embedded model, without and with the population hooks
(``engines/population.py``), by operator and input shapes.

    python benchmarks/population_profile.py [--members 30] [--prompts 2] [--max-new-tokens 16] [--top 15]

Prints the wall time of each generation (outside the profiler), then the operator/shape rows whose
self time grew most with the hooks, with calls and microseconds per call in each. The profiler adds a
few microseconds per operator, so its totals exceed the wall times; compare rows, not sums.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from esft.engines.hf import HFEngine
from esft.engines.population import PopulationHooks
from esft.es import ParamSet, iteration_members
from esft.es.lowrank import lowrank_trainable
from esft.models import embedded_model_path

PROMPTS = ["Write one word: the capital of France?", "How many legs does a spider have? Answer briefly."]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--members", type=int, default=30)
    ap.add_argument("--prompts", type=int, default=2, choices=[1, 2])
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    engine = HFEngine(embedded_model_path(), dtype=args.dtype, device="cpu")
    params = ParamSet(lowrank_trainable(engine.parameters()), scheme="lowrank")
    texts = PROMPTS[: args.prompts] * args.members
    members = iteration_members(0, 1, args.members)
    tokens = engine.tokenizer(texts, padding=True)["input_ids"]
    print(f"{args.dtype}, {args.members} members x {args.prompts} prompts ({len(tokens[0])} tokens), "
          f"{args.max_new_tokens} new tokens, torch threads {torch.get_num_threads()}")  # fmt: skip

    def generate(n: int) -> float:
        """The engine's own batched greedy generation, every row exactly n tokens (--fixed-length)."""
        engine.min_new_tokens = n
        tic = time.perf_counter()
        engine._generate_texts(texts, n, raw=True)
        return time.perf_counter() - tic

    tables = {}
    for label in ("floor", "hooks"):
        hooks = PopulationHooks(engine.model, params) if label == "hooks" else None
        if hooks is not None:
            hooks.__enter__()
            hooks.prepare(members, 1e-3, engine.dtype)
        generate(2)  # warm-up
        wall = min(generate(args.max_new_tokens) for _ in range(2))
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            generate(args.max_new_tokens)
        if hooks is not None:
            hooks.__exit__(None, None, None)
        rows: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0.0])
        for e in prof.key_averages(group_by_input_shape=True):
            row = rows[(e.key, str(e.input_shapes))]
            row[0] += e.count
            row[1] += e.self_cpu_time_total
        tables[label] = rows
        print(f"{label}: {wall:.2f} s")
    floor, hooked = tables["floor"], tables["hooks"]
    grown = sorted(hooked, key=lambda k: floor.get(k, [0, 0.0])[1] - hooked[k][1])
    print(f"\n{'operator':<22} {'input shapes':<62} {'ms (floor)':>11} {'ms (hooks)':>11} {'us/call':>8}")
    for key in grown[: args.top]:
        calls, us = hooked[key]
        base = floor.get(key, [0, 0.0])[1]
        print(
            f"{key[0]:<22} {key[1][:62]:<62} {base / 1e3:>11.1f} {us / 1e3:>11.1f} {us / max(calls, 1):>8.1f}"
        )


if __name__ == "__main__":
    main()
