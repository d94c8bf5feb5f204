"""Where a low-rank population's generation spends the time its floor does not: one batched greedy
generation of the embedded model, without and with the population hooks (``engines/population.py``).

    python benchmarks/population_profile.py [--members 30] [--prompts 2] [--max-new-tokens 48]
                                            [--rounds 3] [--operators] [--top 15]

By default every linear and embedding module is timed in place with ``time.perf_counter``: a pre-hook,
a hook run before the population hook (the module's own work: the GEMM) and one after it (the
population's correction), summed per module kind over the generation. Floor and hooks alternate for
``--rounds`` rounds; each cell is the median over rounds. "rest" is the wall time outside those modules
(attention, norms, sampling). The timers cost the floor and the hooks alike (a few microseconds a call).

``--operators`` adds torch's profiler by operator and input shapes (one more generation each way).
That profiler distorts large operators: on a 2-core AMD EPYC it put the lm_head's GEMM at 130 ms a
call where the timers measure 57 ms, so read its rows for the hooks' own small operators, not the
GEMMs (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from esft.engines.hf import HFEngine
from esft.engines.population import PopulationHooks
from esft.es import ParamSet, iteration_members
from esft.es.lowrank import lowrank_trainable
from esft.models import embedded_model_path

PROMPTS = ["Write one word: the capital of France?", "How many legs does a spider have? Answer briefly."]


class ModuleTimers:
    """Per module kind (the module name's last part): seconds in the module's own forward and in the
    forward hooks that run after it (the population's correction, when its hooks are registered)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.seconds: dict[str, float] = defaultdict(float)
        self._handles: list = []

    def __enter__(self) -> ModuleTimers:
        for name, module in self.model.named_modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                kind = name.rsplit(".", 1)[-1]
                self._handles += [
                    module.register_forward_pre_hook(self._start),
                    module.register_forward_hook(self._own(kind), prepend=True),
                    module.register_forward_hook(self._hooks(kind)),
                ]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _start(self, module, args) -> None:
        module._esft_tic = time.perf_counter()

    def _own(self, kind: str):
        def hook(module, args, out) -> None:
            module._esft_mid = time.perf_counter()
            self.seconds[f"{kind}: own"] += module._esft_mid - module._esft_tic

        return hook

    def _hooks(self, kind: str):
        def hook(module, args, out) -> None:
            self.seconds[f"{kind}: hooks"] += time.perf_counter() - module._esft_mid

        return hook


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--members", type=int, default=30)
    ap.add_argument("--prompts", type=int, default=2, choices=[1, 2])
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--operators", action="store_true", help="also torch's profiler by operator")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    engine = HFEngine(embedded_model_path(), dtype=args.dtype, device="cpu")
    params = ParamSet(lowrank_trainable(engine.parameters()), scheme="lowrank")
    texts = PROMPTS[: args.prompts] * args.members
    members = iteration_members(0, 1, args.members)
    tokens = engine.tokenizer(texts, padding=True)["input_ids"]
    print(f"{args.dtype}, {args.members} members x {args.prompts} prompts ({len(tokens[0])} tokens), "
          f"{args.max_new_tokens} new tokens, torch threads {torch.get_num_threads()}")  # fmt: skip
    hooks = PopulationHooks(engine.model, params)

    def generate(label: str, n: int, timed: bool = True):
        """The engine's own batched greedy generation, every row exactly n tokens (--fixed-length):
        wall seconds and, with ``timed``, the module timers' seconds."""
        engine.min_new_tokens = n
        if label == "hooks":
            hooks.__enter__()
            hooks.prepare(members, 1e-3, engine.dtype)
        timers = ModuleTimers(engine.model)
        try:
            if timed:
                timers.__enter__()  # after the population hooks, so "hooks" times include them
            tic = time.perf_counter()
            engine._generate_texts(texts, n, raw=True)
            wall = time.perf_counter() - tic
        finally:
            timers.__exit__(None, None, None)
            if label == "hooks":
                hooks.__exit__(None, None, None)
        return wall, dict(timers.seconds)

    labels = ("floor", "hooks")
    for label in labels:
        generate(label, 2)  # warm-up
    runs: dict[str, list] = {label: [] for label in labels}
    for _ in range(args.rounds):
        for label in labels:
            runs[label].append(generate(label, args.max_new_tokens))
    kinds = sorted({k for label in labels for _, sec in runs[label] for k in sec})

    def median(label: str, key: str) -> float:
        values = []
        for wall, sec in runs[label]:
            values.append(
                wall if key == "wall" else wall - sum(sec.values()) if key == "rest" else sec.get(key, 0.0)
            )
        return statistics.median(values)

    for label in labels:
        print(f"{label} walls: " + ", ".join(f"{w:.2f}" for w, _ in runs[label]) + " s")
    floor_wall = median("floor", "wall")
    print(f"\n{'module: part':<22} {'floor ms':>10} {'hooks ms':>10} {'extra ms':>9} {'% of floor':>10}")
    for key in ["wall", *kinds, "rest"]:
        f, h = median("floor", key), median("hooks", key)
        print(
            f"{key:<22} {f * 1e3:>10.0f} {h * 1e3:>10.0f} {(h - f) * 1e3:>+9.0f} {(h - f) / floor_wall * 100:>+9.1f}%"
        )
    extra = sum(median("hooks", k) - median("floor", k) for k in kinds if k.endswith(": hooks"))
    print(
        f"\nthe corrections (every ': hooks' row): {extra:.2f} s, {extra / floor_wall * 100:.1f}% of the floor"
    )

    if args.operators:
        operators(generate, args.max_new_tokens, args.top)


def operators(generate, n: int, top: int) -> None:
    """torch's profiler over one more generation each way: the operator/shape rows whose self time grew
    most with the hooks, with calls and microseconds per call in each."""
    tables = {}
    for label in ("floor", "hooks"):
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            generate(label, n, timed=False)
        rows: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0.0])
        for e in prof.key_averages(group_by_input_shape=True):
            row = rows[(e.key, str(e.input_shapes))]
            row[0] += e.count
            row[1] += e.self_cpu_time_total
        tables[label] = rows
    floor, hooked = tables["floor"], tables["hooks"]
    grown = sorted(hooked, key=lambda k: floor.get(k, [0, 0.0])[1] - hooked[k][1])
    print(f"\n{'operator':<22} {'input shapes':<62} {'ms (floor)':>11} {'ms (hooks)':>11} {'us/call':>8}")
    for key in grown[:top]:
        calls, us = hooked[key]
        base = floor.get(key, [0, 0.0])[1]
        print(
            f"{key[0]:<22} {key[1][:62]:<62} {base / 1e3:>11.1f} {us / 1e3:>11.1f} {us / max(calls, 1):>8.1f}"
        )


if __name__ == "__main__":
    main()
