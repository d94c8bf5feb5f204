"""Hugging Face model folders (safetensors, one file or sharded) read tensor by tensor, without building a
model. Run checkpoints are such folders too; ``runstore.py`` writes and lists them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import torch


def safetensors_files(folder: str | Path) -> list[Path]:
    """The safetensors shards of a checkpoint folder (from its index when sharded)."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors checkpoint in {folder}")
    return files


def iter_tensors(folder: str | Path, names: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of the checkpoint (or for ``names``), loading one at a time."""
    with ExitStack() as stack:
        from safetensors import safe_open

        where: dict[str, object] = {}
        for f in safetensors_files(folder):
            handle = stack.enter_context(safe_open(str(f), framework="pt"))
            for key in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                where[key] = handle
        for name in names if names is not None else sorted(where):
            if name not in where:
                raise KeyError(f"{name} is not in the checkpoint {folder}")
            yield name, where[name].get_tensor(name)


def tensor_names(folder: str | Path) -> set[str]:
    from safetensors import safe_open

    names: set[str] = set()
    for f in safetensors_files(folder):
        with safe_open(str(f), framework="pt") as handle:
            names.update(handle.keys())
    return names
