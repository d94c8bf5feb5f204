"""What a run's numbers depend on besides its config: recorded at the start, checked on resume/replay.

Resume and replay are bit-identical only on the same hardware, backend and library versions (CPU and
CUDA draw different noise from the same seed; kernels differ across torch versions and GPUs; other
weights are another model). ``RUN/environment.json`` records the resolved device and dtype, the engine,
torch / transformers / vLLM versions, the GPU name, a fingerprint of the model's weight files and, on
CPU, the number of torch threads per process; ``esft train --resume`` and ``esft replay`` refuse a
change in any of them with a one-line error that names it (``--allow-environment-change`` overrides,
for a run that need not be bit-identical).

The thread count is different: a CPU matmul's rounding can depend on how many threads split it, so a
resumed run scores members exactly as before only with the same count, and it is a setting rather than a
property of the machine. ``--resume`` therefore sets it back (``resume_threads``) instead of refusing.
Replay does not check it: it only adds noise to weights, elementwise, which no thread count changes.

esft's own code is recorded too (``esft``: its version and, run from a git checkout, the commit, marked
``+modified`` when ``src/`` differs from it), but not checked: most changes keep every bit, and a study
resumed over weeks of development must go on. Some changes do not (2026-12-05's prefill matmuls in the
population hooks, c56a73d, score members with another rounding, so the same seed takes another path
from the first iteration; docs/experiments.md), so ``--resume`` says when the code changed, and keeps the
earlier sources in ``esft_earlier``, where a later comparison of two runs can find them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from esft.errors import ConfigError

FILENAME = "environment.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
# Fields that change noise or numerics. `engine` and `vllm` are left out of replay's check: replay
# always runs the HF engine, which draws the same noise as the vLLM engine (docs/vllm.md).
CHECKED = (
    "device",
    "dtype",
    "engine",
    "torch",
    "transformers",
    "vllm",
    "gpu",
    "model_fingerprint",
    "cpu_threads",
    "update_precision",
)
REPLAY_CHECKED = ("device", "dtype", "torch", "gpu", "model_fingerprint")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _device_kind(device: Any) -> str:
    return str(device).split(":")[0]


def model_fingerprint(model_path: str) -> str:
    """sha256 over the model folder's weight files (names, sizes, contents); a hub id that is not a
    local folder is recorded by name. Cached by (path, size, mtime) so a 7B model is hashed once."""
    folder = Path(model_path)
    if not folder.is_dir():
        return f"id:{model_path}"
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    from esft.models import cache_dir

    cache_file = cache_dir() / "fingerprints.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    outer = hashlib.sha256()
    changed = False
    for p in files:
        st = p.stat()
        key = f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        digest = cache.get(key)
        if digest is None:
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for block in iter(lambda f=f: f.read(1 << 24), b""):
                    h.update(block)
            digest = cache[key] = h.hexdigest()
            changed = True
        outer.update(f"{p.name}:{st.st_size}:{digest}\n".encode())
    if changed:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache))
            tmp.replace(cache_file)
        except OSError:
            pass  # the fingerprint is still right; it is only recomputed next time
    return "sha256:" + outer.hexdigest()


def _git(folder: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "--no-optional-locks", "-C", str(folder), *args],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    return done.stdout.strip()


@functools.cache
def esft_source() -> str:
    """esft's version, with the commit and ``+modified`` when it runs from a git checkout: "0.1.0 (git
    f74a1b4c2e9d)" or "0.1.0 (git f74a1b4c2e9d+modified)"; the version alone from an installed copy."""
    version = _version("esft") or "unknown"
    package = Path(__file__).resolve().parent  # not `import esft`: the package's API sits above this
    try:
        top = Path(_git(package, "rev-parse", "--show-toplevel"))
        if (top / "src" / "esft").resolve() != package:
            return version  # installed inside some other repository (a venv in a user's project)
        commit = _git(package, "rev-parse", "--short=12", "HEAD")
        modified = _git(package, "status", "--porcelain", "--untracked-files=no", "--", str(package.parent))
    except (OSError, subprocess.SubprocessError):
        return version  # no git, or not a checkout
    return f"{version} (git {commit}{'+modified' if modified else ''})"


def carry_source(recorded: dict[str, Any] | None, now: dict[str, Any], log: Callable[[str], None]) -> None:
    """On resume: say when esft's code changed since the run's last start, and keep the earlier ones in
    ``now["esft_earlier"]`` (oldest first). Not a refusal: most changes keep every bit (module doc)."""
    if not recorded or "esft" not in recorded:
        return
    earlier = [s for s in [*recorded.get("esft_earlier", []), recorded["esft"]] if s != now.get("esft")]
    earlier = list(dict.fromkeys(earlier))
    if earlier:
        now["esft_earlier"] = earlier
    if recorded["esft"] != now.get("esft"):
        log(
            f"esft: resuming with esft {now.get('esft')}; the run last started with {recorded['esft']} "
            "(the continued run matches an uninterrupted one only if no change between them altered the "
            "arithmetic)"
        )


def describe(engine: Any, engine_name: str, model_path: str) -> dict[str, Any]:
    """The environment of a run about to use ``engine`` on ``model_path`` (for a pool of Ray workers,
    the one the workers run in)."""
    from esft.engines.base import DescribesEnvironment

    if isinstance(engine, DescribesEnvironment):
        return {"esft": esft_source(), **engine.describe_environment(engine_name, model_path)}
    import torch

    from esft.dtypes import cpu_summary

    device = engine.device
    gpu = None
    if _device_kind(device) == "cuda" and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(torch.device(str(device)))
    # mixed precision (GRPO in bf16): the dtype it computes in, and float32 weights (mixed_precision)
    mixed = getattr(engine, "autocast_dtype", None)
    return {
        "esft": esft_source(),
        "device": _device_kind(device),
        "dtype": str(mixed or engine.dtype).removeprefix("torch."),
        **({"weights_dtype": "float32"} if mixed is not None else {}),
        "dtype_reason": engine.dtype_reason or None,  # --dtype auto's choice (esft/dtypes.py)
        "engine": engine_name,
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "vllm": _version("vllm") if engine_name == "vllm" else None,
        "gpu": gpu,
        "model_fingerprint": model_fingerprint(model_path),
        "cpu": cpu_summary(),  # the model and its bf16/AMX flags: which machine kind the timings are from
        # torch's threads run the HF engine's forward; vLLM's worker binds its own (VLLM_CPU_OMP_THREADS_BIND)
        "cpu_threads": torch.get_num_threads()
        if _device_kind(device) == "cpu" and engine_name == "hf"
        else None,
    }


def mixed_precision(env: dict[str, Any] | None) -> str | None:
    """The compute dtype of a run that trained in mixed precision (GRPO in bf16: float32 weights under
    autocast, ``weights_dtype`` recorded), else None: engines that evaluate or analyse its checkpoints
    load them in float32 and compute under autocast in this dtype, as the run did."""
    env = env or {}
    if env.get("weights_dtype") == "float32" and env.get("dtype") not in (None, "float32"):
        return str(env["dtype"])
    return None


def write(run_dir: str | Path, env: dict[str, Any]) -> None:
    path = Path(run_dir) / FILENAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(env, indent=1))
    tmp.replace(path)


def read(run_dir: str | Path) -> dict[str, Any] | None:
    path = Path(run_dir) / FILENAME
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def check(recorded: dict[str, Any] | None, now: dict[str, Any], fields: tuple[str, ...], what: str) -> None:
    """Raise a one-line ConfigError if any of ``fields`` differs between ``recorded`` and ``now``."""
    if recorded is None:
        return  # a run from before environments were recorded: nothing to compare
    # a field the run did not record yet (an older esft) is not compared
    changed = [
        f"{k} {recorded[k]!r} -> {now.get(k)!r}"
        for k in fields
        if k in recorded and recorded[k] != now.get(k)
    ]
    if changed:
        raise ConfigError(
            f"{what}: {'; '.join(changed)} since the run started, so the result would not be bit-identical; "
            "use the original environment, or pass --allow-environment-change to accept that"
        )


def use_threads(threads: int | None, log: Callable[[str], None]) -> None:
    """Run this process's torch with ``threads`` threads (a resumed CPU run's; None: leave it), saying
    so when that is not the machine's default."""
    import torch

    if threads is None or threads == torch.get_num_threads():
        return
    log(
        f"esft: resuming with {threads} torch thread(s), as the run started (this machine's default is "
        f"{torch.get_num_threads()}; CPU rounding depends on it; --allow-environment-change keeps the default)"
    )
    torch.set_num_threads(threads)


def resume_threads(recorded: dict[str, Any] | None) -> int | None:
    """The torch thread count a resumed CPU run must use to score as it did (None: nothing recorded,
    or not a CPU run)."""
    if not recorded or recorded.get("device") != "cpu":
        return None
    threads = recorded.get("cpu_threads")
    return int(threads) if isinstance(threads, int) and threads > 0 else None
