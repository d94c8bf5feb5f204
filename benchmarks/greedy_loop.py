"""The HF engine's greedy loop (``engines/greedy.py``) against transformers' own, side by side.

    python benchmarks/greedy_loop.py [--rounds 3] [--members 30] [--max-new-tokens 48] [--dtype bfloat16]

On the embedded model, the conciseness task's 2 chat training prompts: a batch of ``--members`` x 2
rows generated freely, the same with every row held to ``--max-new-tokens`` (``--fixed-length``), and a
population of ``--members`` low-rank members (sigma 1e-3). The two loops alternate, one round after the
other; the script prints each loop's seconds per round and whether the tokens are the same (they must
be: it exits 1 where they differ). First it times one step's token choice alone on random logits of
the batch's shape (rows x the model's vocabulary, in ``--dtype``): transformers' float32 copy and
argmax, ``argmax`` on the logits themselves, and the loop's ``max(dim=-1).indices``.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from esft.dtypes import cpu_summary
from esft.engines.hf import HFEngine
from esft.es import ParamSet, iteration_members
from esft.es.lowrank import lowrank_trainable
from esft.models import embedded_model_path
from esft.tasks import load_task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--members", type=int, default=30)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    engine = HFEngine(embedded_model_path(), dtype=args.dtype, device="cpu")
    loops = {"transformers": {}, "esft": engine._greedy}
    if not loops["esft"]:
        sys.exit("this transformers cannot run the engine's greedy loop; nothing to compare")
    prompts = [r["prompt"] for r in load_task("conciseness", prompt_format="chat").split("train")][:2]
    texts, raw = engine._texts(prompts * args.members)
    params = ParamSet(lowrank_trainable(engine.parameters()), scheme="lowrank")
    members = iteration_members(3, 0, args.members)
    n = args.max_new_tokens

    def batch(hold: int):
        engine.min_new_tokens = hold
        return [g.token_ids for g in engine._generate_texts(texts, n, raw)]

    def population():
        engine.min_new_tokens = 0
        return [
            [g.token_ids for g in m] for m in engine.generate_population(prompts, members, params, 1e-3, n)
        ]

    cases = {"free": lambda: batch(0), "fixed-length": lambda: batch(n), "population": population}
    print(f"{args.dtype}, {len(texts)} rows, {n} new tokens, {cpu_summary()}")
    logits = torch.randn(len(texts), engine.model.config.vocab_size).to(engine.dtype)
    choices = {
        "float32 copy + argmax": lambda: torch.argmax(logits.to(copy=True, dtype=torch.float32), dim=-1),
        "argmax": lambda: torch.argmax(logits, dim=-1),
        "max(dim=-1).indices": lambda: logits.max(dim=-1).indices,
    }
    for name, choose in choices.items():
        choose()
        tic = time.perf_counter()
        for _ in range(30):
            choose()
        print(f"one step's token choice, {name}: {(time.perf_counter() - tic) / 30 * 1e3:.1f} ms")
    same = True
    for case, run in cases.items():
        seconds: dict[str, list[float]] = {name: [] for name in loops}
        tokens = {}
        for _ in range(args.rounds):
            for name, kwargs in loops.items():
                engine._greedy = kwargs
                tic = time.perf_counter()
                tokens[name] = run()
                seconds[name].append(time.perf_counter() - tic)
        equal = tokens["esft"] == tokens["transformers"]
        same &= equal
        print(f"{case:13s} same tokens: {equal}; " + "; ".join(
            f"{name} {' / '.join(f'{s:.2f}' for s in secs)} s" for name, secs in seconds.items()
        ))  # fmt: skip
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
