"""Throughput of ES on Ray workers against one process, and the bytes that cross the wire per iteration.

Usage: python benchmarks/ray_scaling.py [--model DIR | --hidden 384 --layers 6] [--population 8]
       [--max-new-tokens 32] [--iterations 3] [--noise independent lowrank] [--setups ...] [--json OUT]
       [--device cuda --dtype bfloat16 --gpus-per-worker 1 --setups inproc-1t ray-1 ray-2]

Runs the trainer's iteration (score the population, shape, update: ``score_population`` and
``ParamSet.update``, the code ``ESTrainer`` runs) on the same model, prompts and seeds in several setups:

- ``inproc-Tt``: one process, no Ray, T torch threads;
- ``ray-K``: a local Ray cluster with K workers, each with (cores / K) threads and its own replica;
- ``ray-K-Cc``: the same on a cluster of C CPUs (``ray-1-1c``: one worker with one thread).

Generation is fixed-length (EOS suppressed) so every member does the same token work, and the tiny
test model is built at a larger size unless ``--model`` is given (e.g. the embedded model's folder).
For each setup: seconds per iteration (median over the timed iterations, after one warm-up), split into
scoring and update wall time, member throughput, and for Ray the payload bytes sent and received per
iteration (every call and answer pickled, as ``WorkerPool.traffic`` counts them) plus the loopback
interface's byte counter over the iteration (all of Ray's traffic on this machine, its control plane and
anyone else's loopback traffic included: an upper bound). It also checks that every setup ends with the
same weights (the same seed log), and times one weight checksum. ``cores busy`` is the CPU time this
run's processes (driver, Ray, workers) used per second of the iteration: on a shared machine it shows how
much of the machine the setup actually got.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from esft.config import ESConfig  # noqa: E402
from esft.engines import build_engine  # noqa: E402
from esft.es import iteration_members, shape  # noqa: E402
from esft.population import engine_options, es_params, score_population  # noqa: E402
from esft.tasks import load_task  # noqa: E402
from esft.tasks.base import TrainerState  # noqa: E402


@dataclasses.dataclass
class BenchConfig(ESConfig):
    """ESConfig plus the distributed settings (as ``esft train --workers`` has them)."""

    workers: int = 1
    ray_address: str | None = None
    gpus_per_worker: float = 0


def loopback_bytes() -> int:
    """Bytes received on the loopback interface so far (each loopback byte is sent and received once)."""
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == "lo":
            return int(rest.split()[0])
    return 0


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU seconds of process ``root`` and all its descendants (the local Ray cluster's
    processes, workers included, descend from the driver), from /proc."""
    children: dict[int, list[int]] = {}
    times: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid, ppid = int(d.name), int(fields[1])
        children.setdefault(ppid, []).append(pid)
        times[pid] = (int(fields[11]) + int(fields[12])) / tick
    total, stack = 0.0, [root]
    while stack:
        pid = stack.pop()
        total += times.get(pid, 0.0)
        stack.extend(children.get(pid, []))
    return total


def build_model(folder: Path, hidden: int, layers: int) -> Path:
    from helpers import build_tiny_model

    heads = max(2, hidden // 64)
    return build_tiny_model(
        folder,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 8 * 8,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        vocab_size=8192,
    )


def run_setup(name: str, model: str, args, noise: str) -> dict:
    cfg = BenchConfig(
        model=model,
        task="conciseness",
        population=args.population,
        noise=noise,
        max_new_tokens=args.max_new_tokens,
        fixed_length=True,
        batch_size=args.batch_size,
        sigma=1e-3,
        alpha=1e-4,
        dtype=args.dtype,
        device=args.device,
        gpus_per_worker=args.gpus_per_worker,
    )
    task = load_task("conciseness")
    rows = task.train[: args.prompts]
    options = engine_options("hf", noise, cfg.population, cfg.rank)
    pool = None
    tic = time.perf_counter()
    if name.startswith("inproc"):
        torch.set_num_threads(int(name.split("-")[1].rstrip("t")))
        engine = build_engine(
            "hf", model, dtype=args.dtype, device=args.device, batch_size=cfg.batch_size, **options
        )
    else:
        from esft.distributed.pool import WorkerPool

        _, k, *cpus = name.split("-")
        cfg.workers = int(k)
        if cpus:  # a cluster of that many CPUs: each worker gets cpus / K threads
            import ray

            ray.init(
                address="local",
                num_cpus=int(cpus[0].rstrip("c")),
                include_dashboard=False,
                _node_ip_address="127.0.0.1",
                logging_level="WARNING",
            )
        engine = pool = WorkerPool(cfg, model, options, task, log=lambda m: print("  " + m, flush=True))
    engine.min_new_tokens = args.max_new_tokens
    params = es_params(engine, [], noise, cfg.rank)
    startup = time.perf_counter() - tic
    times, scoring, updating, cores, wire, members_total, seedlog = [], [], [], [], [], 0, []
    for t in range(1, args.iterations + 2):
        members = iteration_members(0, t, cfg.population)
        lo0, cpu0 = loopback_bytes(), tree_cpu_seconds(os.getpid())
        sent0 = dict(pool.traffic) if pool else None
        t0 = time.perf_counter()
        pop = score_population(
            engine, params, task, members, rows, cfg.sigma, args.max_new_tokens, state=TrainerState(t)
        )
        t1 = time.perf_counter()
        weights = shape([s["reward"] for s in pop.summaries], "zscore")
        params.update(members, weights, cfg.alpha)
        t2 = time.perf_counter()
        seedlog.append([s["reward"] for s in pop.summaries])
        if t == 1:
            continue  # warm-up
        times.append(t2 - t0)
        cores.append((tree_cpu_seconds(os.getpid()) - cpu0) / (t2 - t0))
        scoring.append(t1 - t0)
        updating.append(t2 - t1)
        members_total += len(members)
        if pool:
            wire.append(
                {
                    "payload_sent": pool.traffic["sent"] - sent0["sent"],
                    "payload_received": pool.traffic["received"] - sent0["received"],
                    "loopback": loopback_bytes() - lo0,
                }
            )
    out = {
        "setup": name,
        "noise": noise,
        "startup_s": startup,
        "iteration_s": statistics.median(times),
        "scoring_s": statistics.median(scoring),
        "update_s": statistics.median(updating),
        "members_per_s": members_total / sum(times),
        "cores_used": statistics.median(cores),  # CPU seconds of this run's processes per wall second
        "numel": params.numel,
        "seedlog": seedlog,
    }
    if wire:
        out.update({k: statistics.median(w[k] for w in wire) for k in wire[0]})
    if pool:
        pool.close()
        import ray

        ray.shutdown()
    return out


def checksum_seconds(model: str, dtype: str, device: str) -> tuple[float, int]:
    from esft.es.checksum import checksums

    torch.set_num_threads(1)
    engine = build_engine("hf", model, dtype=dtype, device=device)
    tensors = engine.parameters()
    tic = time.perf_counter()
    checksums(tensors)
    return time.perf_counter() - tic, sum(t.numel() * t.element_size() for t in tensors.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model folder (default: the tiny test model at --hidden/--layers)")
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--population", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument(
        "--batch-size", type=int, default=8, help="lowrank: batch_size // prompts members per batch"
    )
    ap.add_argument("--iterations", type=int, default=3, help="timed iterations (after one warm-up)")
    ap.add_argument("--noise", nargs="+", default=["independent", "lowrank"])
    ap.add_argument("--setups", nargs="+", default=["inproc-1t", "ray-1-1c", "ray-2"])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (then give Ray workers --gpus-per-worker)")
    ap.add_argument("--gpus-per-worker", type=float, default=0)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="esft-ray-bench-"))
    try:
        model = args.model or str(build_model(tmp / "model", args.hidden, args.layers))
        load = os.getloadavg()
        print(
            f"model {model}; {os.cpu_count()} cores; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}"
        )
        seconds, nbytes = checksum_seconds(model, args.dtype, args.device)
        print(f"weight checksum: {nbytes / 1e6:.0f} MB in {seconds:.3f} s ({args.device}, one CPU thread)")
        results = []
        for noise in args.noise:
            for name in args.setups:
                r = run_setup(name, model, args, noise)
                results.append(r)
                extra = (
                    f" | payload {r['payload_sent'] / 1e3:.1f} kB sent {r['payload_received'] / 1e3:.1f} kB received"
                    f" | loopback {r['loopback'] / 1e6:.2f} MB"
                    if "payload_sent" in r
                    else ""
                )
                print(
                    f"{noise:>11} {name:>9}: {r['iteration_s']:6.2f} s/iteration (scoring {r['scoring_s']:.2f}, "
                    f"update {r['update_s']:.2f}) | {r['members_per_s']:.2f} members/s | {r['cores_used']:.2f} "
                    f"cores busy | startup "
                    f"{r['startup_s']:.1f} s{extra}",
                    flush=True,
                )
            same = {json.dumps(r["seedlog"]) for r in results if r["noise"] == noise}
            print(f"{noise:>11}: every setup scored the same rewards: {len(same) == 1}")
        load = os.getloadavg()
        print(f"load average at the end {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
