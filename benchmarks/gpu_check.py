"""GPU check (issue 14, section 4): what no CPU run can verify, in one script for a lent GPU machine.

Usage, from the repository root, on a machine with a CUDA GPU, torch and transformers (esft itself
need not be installed; it runs from src/):

    PYTHONUNBUFFERED=1 python benchmarks/gpu_check.py [--out DIR]       # about 4-5 min on an H100
    python benchmarks/gpu_check.py --device cpu --small                 # smoke test, ~1 min on 2 cores

1. The checks of tests/test_cuda.py (marker ``cuda``) on the device: CUDA noise is deterministic for
   every scheme, perturb/restore is bit-exact in float32, bfloat16 and float16, the update is summed in
   float32 and cast once, the low-rank population hooks equal materialised perturbations (logits and
   greedy text), the bf16 remedies for lost steps (stochastic rounding is unbiased and seeded on the
   device, float32 masters follow the float32 run exactly), the fused update (es/fused.py: inductor's
   Triton kernels on CUDA) builds and writes the eager update's bits in every precision mode,
   ``--fixed-length``'s in-place EOS hold gives the tokens of transformers' ``min_new_tokens``, and a
   tiny bf16 ES run resumes and replays bit for bit with each remedy and noise scheme. They run as
   ``pytest -m cuda tests/test_cuda.py`` in a subprocess when pytest is importable, else as the same
   functions in this process.
2. ``esft bench`` through its Python API (``run_bench``, as ``esft bench`` calls it) on a randomly
   initialised model with the embedded model's configuration (Qwen2.5-Coder-0.5B-Instruct as esft
   converts it: 24 layers, hidden 896, vocab 151936, untied lm_head; no weights travel to a GPU
   machine) and an in-process byte-level tokenizer, on the quickstart's workload: chat conciseness
   prompts, N=30, 2 prompts per member, 48 new tokens, embeddings and lm_head frozen, bfloat16, HF
   engine, ``--fixed-length`` (every completion exactly 48 tokens, so every row does identical token
   work), modes lowrank, table, independent and reference.

It prints PASS/FAIL/SKIP per check, the bench table and each mode's ratio to the floor, writes
gpu_check.json (and cuda_tests.xml from pytest) to --out (default $OUT, else runs/gpu-check), and
exits 1 if a check failed, 2 if a package it needs is missing or older than pyproject.toml's
minimum.

On CUDA, perturb, restore and the low-rank factor draw only queue kernels; this script makes them wait
for the device (``torch.cuda.synchronize``) so that the bench's noise column holds their time instead
of the next generate call. Totals are unaffected but for those few waits.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import tomllib
import traceback
import xml.etree.ElementTree as ET
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# module -> what to install; esft's own imports on the bench path need all of them
REQUIRED = {
    "torch": "torch",
    "transformers": "transformers",
    "tokenizers": "tokenizers",
    "safetensors": "safetensors",
    "numpy": "numpy",
    "yaml": "pyyaml",
    "tqdm": "tqdm",
}
OPTIONAL = {
    "pytest": "without it the checks run in this process (the same functions)",
}

# Qwen2.5-Coder-0.5B-Instruct as esft converts the embedded GGUF (~/.cache/esft/models/.../config.json)
EMBEDDED_CONFIG = {
    "vocab_size": 151936,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rope_theta": 1e6,
    "rms_norm_eps": 1e-6,
}
SMALL_CONFIG = {  # the CPU smoke test; a vocabulary larger than the tokenizer's, like the real one
    "vocab_size": 4096,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
FREEZE = ["*embed_tokens*", "lm_head*"]  # the quickstart's
MODES = ["lowrank", "table", "independent", "reference"]
BUDGET_S = 480  # what a lent GPU's share of a task allows for this script


def missing_packages() -> tuple[list[str], list[str]]:
    """(required, optional) packages that cannot be imported here, with a note each."""
    required = [f"{mod} (pip install {pkg})" for mod, pkg in REQUIRED.items() if not _importable(mod)]
    optional = [f"{mod}: {why}" for mod, why in OPTIONAL.items() if not _importable(mod)]
    return required, optional


def declared_minimums() -> dict[str, str]:
    """The minimum versions of torch and transformers that pyproject.toml declares (also read by
    .ci/run, which tests the oldest transformers)."""
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    wanted = (re.fullmatch(r"(torch|transformers)>=([0-9.]+)", d.replace(" ", "")) for d in dependencies)
    return dict(m.groups() for m in wanted if m is not None)


def too_old() -> list[str]:
    """Installed torch and transformers older than the minimum pyproject.toml declares, with the fix."""
    old = []
    for name, minimum in declared_minimums().items():
        have = _installed(name)
        if _release(have) < _release(minimum):
            old.append(f"{name} {have} (esft needs {name}>={minimum}: pip install -U '{name}>={minimum}')")
    return old


def _installed(name: str) -> str:
    return metadata.version(name)


def _release(version: str) -> tuple[int, ...]:
    """The leading release numbers of a version string: '2.13.0+cpu' -> (2, 13, 0)."""
    lead = re.match(r"[0-9]+(?:\.[0-9]+)*", version)
    return tuple(int(x) for x in lead.group().split(".")) if lead else ()


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _use_repo_sources() -> None:
    """esft from this checkout's src/ and the test helpers from tests/, installed or not."""
    for sub in ("tests", "src"):
        path = str(ROOT / sub)
        if path not in sys.path:
            sys.path.insert(0, path)


def environment(device: str) -> dict[str, Any]:
    import torch
    import transformers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": device,
        "cuda_available": torch.cuda.is_available(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
        env["cuda"] = torch.version.cuda
    return env


# -- 1. the checks of tests/test_cuda.py ----------------------------------------------------------


def run_checks(
    device: str, out: Path, use_pytest: bool = True, only: list[str] | None = None
) -> list[dict[str, Any]]:
    """One {name, status (PASS/FAIL/SKIP), seconds, message} per check of tests/test_cuda.py (SKIP: pytest
    skipped it, e.g. the module without CUDA)."""
    if use_pytest and only is None:
        return _run_pytest(device, out)
    return _run_in_process(device, only)


def _run_pytest(device: str, out: Path) -> list[dict[str, Any]]:
    xml = out / "cuda_tests.xml"
    xml.unlink(missing_ok=True)
    env = dict(os.environ, ESFT_CHECK_DEVICE=device)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "-q", "-rfEs"]
    cmd += ["-p", "no:cacheprovider", f"--junitxml={xml}"]
    print("$ " + " ".join(cmd), flush=True)
    rc = subprocess.run(cmd, cwd=ROOT, env=env).returncode
    if not xml.is_file():
        return [{"name": "pytest", "status": "FAIL", "seconds": 0.0, "message": f"pytest exited {rc}"}]
    results = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        name = case.get("name", "?")
        name = name[name.find("[") + 1 : -1] if "[" in name else name
        status, message = "PASS", ""
        for tag, label in (("failure", "FAIL"), ("error", "FAIL"), ("skipped", "SKIP")):
            node = case.find(tag)
            if node is not None:
                status, message = label, (node.get("message") or "").strip().splitlines()[:1]
                message = message[0][:200] if message else ""
                break
        results.append(
            {"name": name, "status": status, "seconds": float(case.get("time", 0)), "message": message}
        )
    if rc not in (0, 1) or not results:  # 1 = some tests failed (listed); anything else broke pytest
        results.append({"name": "pytest", "status": "FAIL", "seconds": 0.0, "message": f"pytest exited {rc}"})
    return results


def _run_in_process(device: str, only: list[str] | None) -> list[dict[str, Any]]:
    _use_repo_sources()
    import test_cuda

    results = []
    for name, check in test_cuda.CHECKS.items():
        if only is not None and name not in only:
            continue
        tic = time.perf_counter()
        status, message = "PASS", ""
        with tempfile.TemporaryDirectory(prefix="esft-check-") as tmp:
            try:
                check(device, Path(tmp))
            except Exception as e:
                traceback.print_exc()
                status, message = "FAIL", f"{type(e).__name__}: {e}".splitlines()[0][:200]
        seconds = time.perf_counter() - tic
        print(f"{status:<4}  {name} ({seconds:.1f} s) {message}", flush=True)
        results.append({"name": name, "status": status, "seconds": seconds, "message": message})
    return results


# -- 2. esft bench --------------------------------------------------------------------------------


def synchronise_noise_timers() -> None:
    """Make ParamSet.perturb/restore and PopulationHooks.prepare wait for the GPU, so their time is
    counted as noise rather than as the next generate's (whose .tolist() is the first sync)."""
    import torch

    from esft.engines.population import PopulationHooks
    from esft.es.params import ParamSet

    def synced(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            result = fn(*args, **kwargs)
            torch.cuda.synchronize()
            return result

        return run

    for cls, name in ((ParamSet, "perturb"), (ParamSet, "restore"), (PopulationHooks, "prepare")):
        setattr(cls, name, synced(getattr(cls, name)))


def run_gpu_bench(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """Build the random model in ``folder``, run the bench, print its table; the rows and ratios."""
    _use_repo_sources()
    from helpers import build_tiny_model
    from transformers.utils import logging as hf_logging

    from esft.bench import format_table, run_bench
    from esft.engines.hf import HFEngine
    from esft.tasks import load_task

    hf_logging.disable_progress_bar()  # save_pretrained's shard bar
    config = SMALL_CONFIG if args.small else EMBEDDED_CONFIG
    tic = time.perf_counter()
    build_tiny_model(folder, tie=False, seed=0, **config)
    engine = HFEngine(folder, dtype=args.dtype, device=args.device, batch_size=args.batch_size)
    n_params = sum(t.numel() for t in engine.parameters().values())
    print(f"random model built and loaded in {time.perf_counter() - tic:.1f} s: {n_params / 1e6:.1f}M params")
    task = load_task("conciseness", prompt_format="chat")
    prompts = [r["prompt"] for r in task.train[: args.prompts_per_member]]
    tic = time.perf_counter()  # first use of both batch shapes (kernel selection), so the floor is fair
    engine.generate(prompts * args.population, 4)
    engine.generate(prompts, 4)
    print(f"warm-up {time.perf_counter() - tic:.1f} s", flush=True)
    if args.device.startswith("cuda"):
        synchronise_noise_timers()
    rows = run_bench(
        engine,
        task,
        args.population,
        args.prompts_per_member,
        args.max_new_tokens,
        args.modes,
        sigma=1e-3,
        freeze=FREEZE,
        rank=1,
        fixed_length=True,
    )
    info = {
        "model": "random, " + ("small config" if args.small else "Qwen2.5-Coder-0.5B config"),
        "task": "conciseness (chat)",
        "N": args.population,
        "prompts/member": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "fixed_length": True,
        "engine": "hf",
        "dtype": str(engine.dtype).removeprefix("torch."),
        "device": args.device,
    }
    print(format_table(rows, info), flush=True)
    floor = rows[0].seconds
    return {
        "info": info,
        "params_millions": round(n_params / 1e6, 1),
        "rows": [{**asdict(r), "x_floor": r.ratio(floor)} for r in rows],
        "tokens_identical": len({r.tokens for r in rows}) == 1,
    }


# -- main -----------------------------------------------------------------------------------------


def save(report: dict[str, Any], out: Path, start: float) -> None:
    report["seconds"] = time.perf_counter() - start
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu for a smoke test")
    ap.add_argument("--small", action="store_true", help="smoke test: tiny model, N=4, 4 new tokens")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "runs" / "gpu-check"))
    ap.add_argument("--population", type=int, help="bench N (default 30; 4 with --small)")
    ap.add_argument("--prompts-per-member", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, help="bench completion length (default 48; 4 with --small)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--modes", nargs="+", default=MODES, help=f"bench modes (default {' '.join(MODES)})")
    ap.add_argument("--no-pytest", action="store_true", help="run the checks in this process")
    ap.add_argument("--skip-checks", action="store_true")
    ap.add_argument("--skip-bench", action="store_true")
    args = ap.parse_args(argv)
    if args.population is None:
        args.population = 4 if args.small else 30
    if args.max_new_tokens is None:
        args.max_new_tokens = 4 if args.small else 48
    return args


def main(argv: list[str] | None = None) -> int:
    start = time.perf_counter()
    args = parse_args(argv)
    required, optional = missing_packages()
    for line in optional:
        print(f"note: {line}")
    if required:
        print("gpu_check: missing required packages: " + ", ".join(required), file=sys.stderr)
        print("  carry them as wheels (see the device README) or pip install them", file=sys.stderr)
        return 2
    old = too_old()
    if old:
        print("gpu_check: too old here: " + ", ".join(old), file=sys.stderr)
        return 2
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            "gpu_check: CUDA is not available here; use --device cpu --small for a smoke test",
            file=sys.stderr,
        )
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment(args.device)
    print("environment: " + " | ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    report: dict[str, Any] = {"environment": env, "args": vars(args), "checks": [], "bench": None}

    if not args.skip_checks:
        print("\n== checks: tests/test_cuda.py ==", flush=True)
        report["checks"] = run_checks(
            args.device, out, use_pytest=not args.no_pytest and _importable("pytest")
        )
        save(report, out, start)  # kept if the bench is cut short
    if not args.skip_bench:
        print(
            f"\n== esft bench: N={args.population}, {args.dtype}, {args.device}, fixed length ==", flush=True
        )
        tic = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="esft-gpu-check-") as tmp:
            try:
                report["bench"] = run_gpu_bench(args, Path(tmp) / "model")
                ok = report["bench"]["tokens_identical"]
                message = "" if ok else "rows differ in token count: ratios are not like for like"
                report["checks"].append(
                    {
                        "name": "bench: identical token work in every row",
                        "status": "PASS" if ok else "FAIL",
                        "seconds": time.perf_counter() - tic,
                        "message": message,
                    }
                )
            except Exception as e:
                traceback.print_exc()
                report["checks"].append(
                    {
                        "name": "bench",
                        "status": "FAIL",
                        "seconds": time.perf_counter() - tic,
                        "message": f"{type(e).__name__}: {e}".splitlines()[0][:200],
                    }
                )

    save(report, out, start)
    print("\n== summary ==")
    for c in report["checks"]:
        print(
            f"{c['status']:<4}  {c['name']} ({c['seconds']:.1f} s){'  ' + c['message'] if c['message'] else ''}"
        )
    if report["bench"]:
        rows = report["bench"]["rows"]
        ratios = " | ".join(f"{r['mode']} {r['x_floor']:.2f}x" for r in rows[1:])
        print(f"bench, x floor ({rows[0]['seconds']:.2f} s): {ratios}")
    counts = {s: sum(c["status"] == s for c in report["checks"]) for s in ("PASS", "FAIL", "SKIP")}
    print(
        f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped in "
        f"{report['seconds']:.0f} s; report: {out / 'gpu_check.json'}"
    )
    if report["seconds"] > BUDGET_S:
        print(f"warning: over the {BUDGET_S} s budget of a GPU check; lower --max-new-tokens or drop a mode")
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
