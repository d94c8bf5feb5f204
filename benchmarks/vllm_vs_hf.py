"""Greedy tokens/s (16 chat prompts x 32 new tokens) and perturb + restore cost, vLLM engine vs HF engine.

/work/vllm-venv/bin/python benchmarks/vllm_vs_hf.py vllm onednn   # or: vllm dense
.venv/bin/python benchmarks/vllm_vs_hf.py hf
"""

import os
import sys
import time

from esft.es.noise import Member
from esft.es.params import ParamSet

MODEL = os.path.expanduser("~/.cache/esft/models/qwen2.5-coder-0.5b-instruct")
PROMPTS = [
    [{"role": "user", "content": f"Write a long, detailed Python tutorial about topic number {i}."}]
    for i in range(16)
]


def gen_rate(engine, reps: int = 2) -> float:
    engine.generate(PROMPTS[:2], 4)  # warm-up
    best = 0.0
    for _ in range(reps):
        tic = time.perf_counter()
        gens = engine.generate(PROMPTS, 32)
        dt = time.perf_counter() - tic
        n = sum(g.num_tokens for g in gens)
        best = max(best, n / dt)
        print(f"  generate: {n} tokens in {dt:.2f}s = {n / dt:.1f} tok/s", flush=True)
    return best


def es_cost(ps, reps: int = 3) -> None:
    for i in range(reps):
        tic = time.perf_counter()
        ps.perturb(Member(1000 + i, 1), 1e-3)
        mid = time.perf_counter()
        ps.restore()
        print(f"  perturb {mid - tic:.2f}s restore {time.perf_counter() - mid:.2f}s", flush=True)


def main() -> None:
    which = sys.argv[1]
    tic = time.perf_counter()
    if which == "hf":
        from esft.engines.hf import HFEngine

        engine = HFEngine(MODEL, batch_size=16)
        print(f"hf load {time.perf_counter() - tic:.1f}s")
        gen_rate(engine)
        for scheme in ("independent", "table"):
            print(" scheme", scheme)
            es_cost(ParamSet(engine.parameters(), scheme=scheme))
    else:
        from esft.engines.vllm import VLLMEngine

        gemm = sys.argv[2] if len(sys.argv) > 2 else "onednn"
        engine = VLLMEngine(MODEL, batch_size=16, max_model_len=1024, cpu_gemm=gemm)
        print(f"vllm ({engine.setup_report['cpu_gemm']}) load {time.perf_counter() - tic:.1f}s")
        gen_rate(engine)
        for scheme in ("independent", "table"):
            print(" scheme", scheme)
            es_cost(engine.param_set([], scheme))
        engine.close()


if __name__ == "__main__":
    main()
