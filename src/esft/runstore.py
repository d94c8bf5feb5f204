"""The run store: one folder per run, the single source of truth for analysis, resume and replay.

Layout::

    RUN/
      config.yaml              resolved ESConfig (+ the resolved model location)
      seedlog.jsonl            per iteration: members (seed, sign) and shaped rewards (the update's inputs)
      metrics.jsonl            per iteration: rewards, parts, lengths, update norms, timings
      eval.jsonl               periodic evaluation summaries
      events/                  TensorBoard event files
      checkpoints/iter-000010  Hugging Face format (safetensors + config + tokenizer) + esft_checkpoint.json
                               (+ es-state/master.safetensors: float32 masters, es/precision.py)
                               + README.md, its model card (model_card.py)

Base model + seed log determine every ES checkpoint exactly. Checkpoints are written to a hidden temp
folder and renamed into place, so a crash never leaves a half-written checkpoint that resume would trust.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from esft.errors import ConfigError, EsftError


class DiskFullError(EsftError):
    """The disk of the run folder is full; what was saved is intact."""


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT as an OSError, or wrapped by a library (safetensors reports a Rust IoError)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return "No space left on device" in text or "StorageFull" in text or "Disk quota exceeded" in text


CHECKPOINT_RE = re.compile(r"^iter-(\d{6,})$")
CHECKPOINT_MARKER = "esft_checkpoint.json"


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Complete JSON lines of ``path``; a torn last line (crash mid-write) is ignored."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def take_lock(path: Path, busy: Callable[[str], str]) -> int:
    """An exclusive OS file lock on ``path`` (released when its descriptor closes, or when the process
    exits or is killed), holding the holder's pid, host and start time; the descriptor. Held by another
    process: a one-line ConfigError ``busy(holder)``, where holder reads " by pid P on host H (since T)"."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = ""
        with contextlib.suppress(OSError, ValueError):
            info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            holder = f" by pid {info.get('pid')} on host {info.get('host')} (since {info.get('since')})"
        os.close(fd)
        raise ConfigError(busy(holder)) from None
    info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    return fd


class RunStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._lock_fd: int | None = None

    # one writer per run folder
    @property
    def lock_path(self) -> Path:
        return self.root / ".lock"

    def lock(self) -> None:
        """Take the run folder's writer lock (an OS file lock: released when this process exits or is
        killed, so a killed run can be resumed at once). A second writer gets a one-line ConfigError
        naming the holder."""
        if self._lock_fd is not None:
            return
        self._lock_fd = take_lock(
            self.lock_path,
            lambda holder: (
                f"{self.root} is in use{holder}: one process writes a run folder at a time; wait "
                "for it to finish or stop it, then --resume"
            ),
        )

    def unlock(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._lock_fd, 0)
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    # paths
    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def seedlog_path(self) -> Path:
        return self.root / "seedlog.jsonl"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def eval_path(self) -> Path:
        return self.root / "eval.jsonl"

    @property
    def checkpoint_root(self) -> Path:
        return self.root / "checkpoints"

    def exists(self) -> bool:
        return self.config_path.is_file()

    # config
    def write_config(self, config: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.config_path.with_suffix(".yaml.tmp")
        tmp.write_text(yaml.safe_dump(config, sort_keys=False))
        tmp.replace(self.config_path)

    def read_config(self) -> dict[str, Any]:
        if not self.exists():
            raise ConfigError(f"{self.root} is not an esft run folder (no config.yaml)")
        return yaml.safe_load(self.config_path.read_text()) or {}

    # logs
    def _append(self, path: Path, row: dict[str, Any]) -> None:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def append_seedlog(self, row: dict[str, Any]) -> None:
        self._append(self.seedlog_path, row)

    def append_metrics(self, row: dict[str, Any]) -> None:
        self._append(self.metrics_path, row)

    def append_eval(self, row: dict[str, Any]) -> None:
        self._append(self.eval_path, row)

    def evals(self) -> list[dict[str, Any]]:
        return _read_jsonl(self.eval_path)

    def seedlog(self) -> list[dict[str, Any]]:
        return _read_jsonl(self.seedlog_path)

    def metrics(self) -> list[dict[str, Any]]:
        return _read_jsonl(self.metrics_path)

    def truncate_logs(self, last_iteration: int) -> None:
        """Drop log rows after ``last_iteration`` (and torn lines), before a resumed run appends."""
        for path in (self.seedlog_path, self.metrics_path, self.eval_path):
            if path.is_file():
                rows = [r for r in _read_jsonl(path) if r.get("iteration", 0) <= last_iteration]
                tmp = path.with_suffix(".jsonl.tmp")
                tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
                tmp.replace(path)

    # checkpoints
    def checkpoint_dir(self, iteration: int) -> Path:
        return self.checkpoint_root / f"iter-{iteration:06d}"

    def checkpoints(self) -> dict[int, Path]:
        """Complete checkpoints by iteration (only folders with the completion marker)."""
        out = {}
        if self.checkpoint_root.is_dir():
            for d in self.checkpoint_root.iterdir():
                m = CHECKPOINT_RE.match(d.name)
                if m and (d / CHECKPOINT_MARKER).is_file():
                    out[int(m.group(1))] = d
        return dict(sorted(out.items()))

    def save_checkpoint(self, iteration: int, write: Callable[[Path], None], info: dict[str, Any]) -> Path:
        """Atomically create checkpoint ``iteration``: ``write(tmp_dir)``, marker, then rename."""
        final = self.checkpoint_dir(iteration)
        tmp = self.checkpoint_root / f".tmp-iter-{iteration:06d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
            write(tmp)
            (tmp / CHECKPOINT_MARKER).write_text(json.dumps({"iteration": iteration, **info}, indent=1))
            for f in tmp.rglob("*"):  # es-state/ (float32 masters) is a subfolder
                if f.is_file():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # never leave half a checkpoint behind
            raise
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        return final

    def prune_checkpoints(self, keep: int, pinned: list[int] | tuple[int, ...] = ()) -> list[int]:
        """Delete all but the newest ``keep`` checkpoints and the ``pinned`` ones (keep=0: keep all);
        returns the dropped iterations. The newest is always kept: resume starts from it."""
        ckpts = self.checkpoints()
        if keep <= 0 or len(ckpts) <= keep:
            return []
        newest = sorted(ckpts)[-keep:]
        dropped = [i for i in ckpts if i not in newest and i not in set(pinned)]
        for i in dropped:
            self.drop_checkpoint(i)
        return dropped

    def drop_checkpoint(self, iteration: int) -> None:
        """Delete checkpoint ``iteration``, its completion marker first: a crash mid-delete leaves a
        folder that resume ignores."""
        path = self.checkpoint_dir(iteration)
        (path / CHECKPOINT_MARKER).unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)

    def clean_temp(self) -> None:
        if self.checkpoint_root.is_dir():
            for d in self.checkpoint_root.glob(".tmp-*"):
                shutil.rmtree(d, ignore_errors=True)
