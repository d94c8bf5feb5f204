"""Checkpoints of a Ray pool (driver side): saved by one worker into the run folder.

``save`` runs on a worker on the driver's own node, straight into the run folder; from another node the
files are copied over in chunks. The driver holds no model, so it cannot write them itself.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from esft.distributed.calls import Calls, DistributedError, _Slot, _WorkerDied
from esft.distributed.recovery import Recovery

CHUNK_BYTES = 64 << 20  # checkpoint files copied from a worker on another node in chunks of this size


def save(calls: Calls, recovery: Recovery, path: str | Path, driver_node: str) -> None:
    """Write the weights into ``path``: straight from a worker on this node, else copied over from
    another node in chunks."""
    path = Path(path)
    for _ in range(recovery.max_replacements + len(calls.slots)):
        slot = calls.pick(prefer_node=driver_node)
        try:
            if slot.node == driver_node:
                calls.get(calls.call(slot, "save", str(path)), slot)
            else:
                _copy_checkpoint(calls, slot, path)
            return
        except _WorkerDied as dead:
            recovery.replace(dead, "while saving a checkpoint")
    raise DistributedError("no Ray worker survived saving a checkpoint")


def _copy_checkpoint(calls: Calls, slot: _Slot, path: Path) -> None:
    folder, files = calls.get(calls.call(slot, "save_local"), slot)
    try:
        for name, size in files:
            target = path / name
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "wb") as f:
                for offset in range(0, size, CHUNK_BYTES):
                    f.write(
                        calls.get(calls.call(slot, "read_chunk", folder, name, offset, CHUNK_BYTES), slot)
                    )
    finally:
        with contextlib.suppress(Exception):
            calls.call(slot, "drop", folder)


def _checkpoint_iteration(path: str) -> int:
    """The iteration a checkpoint folder holds (0 for a base model)."""
    import json

    from esft.runstore import CHECKPOINT_MARKER

    marker = Path(path) / CHECKPOINT_MARKER
    try:
        return int(json.loads(marker.read_text())["iteration"])
    except (OSError, ValueError, KeyError):
        return 0
