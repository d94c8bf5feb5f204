"""Cost of running model-written code and reasoning-gym graders in the bubblewrap sandbox.

Usage: python benchmarks/sandbox_cost.py [--jobs 60] [--repeats 3]
Measures, side by side in one process: starting a sandbox (bwrap + interpreter + the profile's
imports), one job in a warm sandbox (a fork in the sandbox's PID 1), a batch of ``--jobs`` ARC
programs (an iteration's N x P at N=30, P=2) sequentially on one sandbox and spread over the pool,
the same batch of reasoning-gym gradings, and, for scale, a bare ``python -I -S`` start per job (what
a fresh process per program would cost before any isolation).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from esft import sandbox

PROGRAM = "import numpy as np\ndef transform(grid):\n    return np.fliplr(np.array(grid)).tolist()\n"
GRID = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]


def timed(fn, repeats: int) -> float:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    limits = sandbox.Limits()
    rows = []

    def start(profile):
        p = sandbox.SandboxPool(profile, workers=1)
        p.run("def f():\n    return 1\n", "f", [], limits)
        p.close()

    rows.append(("start a sandbox: ARC profile (numpy)", timed(lambda: start(sandbox.ARC), args.repeats), 1))
    from esft.tasks import rgym

    rows.append(("start a sandbox: reasoning-gym profile", timed(lambda: start(rgym.RG), args.repeats), 1))

    one = sandbox.SandboxPool(sandbox.ARC, workers=1)
    pooled = sandbox.SandboxPool(sandbox.ARC)
    jobs = [(PROGRAM, "transform", [GRID])] * args.jobs
    one.run_many(jobs[:2], limits)
    pooled.run_many(jobs[: 2 * pooled.workers], limits)
    rows.append(("one ARC job, warm sandbox", timed(lambda: one.run(*jobs[0], limits), 20), 1))
    rows.append(
        (
            f"{args.jobs} ARC jobs, 1 sandbox",
            timed(lambda: one.run_many(jobs, limits), args.repeats),
            args.jobs,
        )
    )
    rows.append(
        (
            f"{args.jobs} ARC jobs, pool of {pooled.workers}",
            timed(lambda: pooled.run_many(jobs, limits), args.repeats),
            args.jobs,
        )
    )
    import reasoning_gym

    entry = reasoning_gym.create_dataset("spiral_matrix", size=1, seed=1)[0]
    rgym.score_answers("spiral_matrix", [entry["answer"]] * 4, [entry] * 4)
    rows.append(
        (
            f"{args.jobs} spiral_matrix gradings, pool",
            timed(
                lambda: rgym.score_answers(
                    "spiral_matrix", [entry["answer"]] * args.jobs, [entry] * args.jobs
                ),
                args.repeats,
            ),
            args.jobs,
        )
    )
    bare = [sys.executable, "-I", "-S", "-c", "pass"]
    rows.append(("bare `python -I -S` start (no isolation)", timed(lambda: subprocess.run(bare), 10), 1))
    one.close()
    pooled.close()
    print("| what | seconds | per job (ms) |\n|---|---|---|")
    for what, seconds, n in rows:
        print(f"| {what} | {seconds:.3f} | {1000 * seconds / n:.1f} |")


if __name__ == "__main__":
    main()
