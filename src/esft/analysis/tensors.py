"""Streaming several checkpoints of one architecture side by side, tensor by tensor, chunk by chunk.

Analyses of 0.5B+ models must not hold whole models in memory: :func:`aligned_tensors` yields one
tensor name at a time with that tensor from every folder (loaded lazily from safetensors), and
:func:`chunks` cuts them into float32 slices of at most ``CHUNK`` values, so a delta is never
materialised for a whole embedding matrix. Folders that do not hold the same tensor names and shapes do
not share a base model, which is a one-line :class:`~esft.errors.ConfigError`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from esft.errors import ConfigError
from esft.safetensors_folder import iter_tensors, tensor_names

CHUNK = 1 << 22  # values per float32 slice: 16 MB


def _names(folder: Path) -> set[str]:
    try:
        return tensor_names(folder)
    except FileNotFoundError as e:
        raise ConfigError(f"{folder} has no safetensors weights: point at a Hugging Face model folder") from e


def check_same_names(folders: Sequence[Path]) -> list[str]:
    """The sorted tensor names shared by all ``folders``; ConfigError when any folder differs."""
    first = _names(folders[0])
    for other in folders[1:]:
        names = _names(other)
        if names != first:
            only_a, only_b = sorted(first - names), sorted(names - first)
            example = f"{only_a[0]} only in {folders[0]}" if only_a else f"{only_b[0]} only in {other}"
            raise ConfigError(
                f"{folders[0]} and {other} have different parameters ({example}): they are not the same "
                "architecture, so they cannot share a base; compare checkpoints of one base model"
            )
    return sorted(first)


def aligned_tensors(
    folders: Sequence[Path], progress: bool = False, desc: str = "tensors"
) -> Iterator[tuple[str, list[torch.Tensor]]]:
    """(name, [tensor of folder 0, tensor of folder 1, ...]) for every tensor name, one name at a time.

    Raises ConfigError when the folders differ in names or in the shape of a tensor."""
    names = check_same_names(folders)
    streams = [iter_tensors(f, names) for f in folders]
    for name in tqdm(names, desc=desc, unit="tensor", disable=not progress, leave=False):
        tensors = [next(s)[1] for s in streams]
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) > 1:
            raise ConfigError(
                f"{name} has shapes {' vs '.join(str(tuple(t.shape)) for t in tensors)} in "
                f"{' and '.join(map(str, folders))}: they do not share a base model"
            )
        yield name, tensors


def in_run_dtype(base: torch.Tensor, tuned: torch.Tensor) -> torch.Tensor:
    """``base`` rounded to the dtype its fine-tune ``tuned`` is stored in, when that is a narrower float
    type (a bf16 run of a float32 base): the run started from those rounded weights, so comparing with
    the unrounded base would count the base's own rounding as update. Two runs in different dtypes each
    take their own (``cosine.py``)."""
    dtype = tuned.dtype
    if dtype.is_floating_point and base.is_floating_point() and dtype.itemsize < base.dtype.itemsize:
        return base.to(dtype)
    return base


def chunks(*tensors: torch.Tensor, size: int = CHUNK) -> Iterator[list[torch.Tensor]]:
    """Aligned float32 slices (at most ``size`` values) of the flattened ``tensors``."""
    flats = [t.reshape(-1) for t in tensors]
    n = flats[0].numel()
    for start in range(0, n, size):
        yield [f[start : start + size].to(torch.float32) for f in flats]


@torch.no_grad()
def load_weights(params: Mapping[str, torch.Tensor], folder: Path) -> None:
    """Copy the tensors of checkpoint ``folder`` into the live ``params`` (an engine's parameters),
    tensor by tensor, cast to each parameter's dtype. ConfigError when names or shapes differ."""
    names = _names(folder)
    if names != set(params):
        missing, extra = sorted(set(params) - names), sorted(names - set(params))
        example = f"{missing[0]} is missing" if missing else f"{extra[0]} is extra"
        raise ConfigError(
            f"{folder} does not fit the loaded model ({example}): use checkpoints of one base model"
        )
    for name, t in iter_tensors(folder, sorted(params)):
        live = params[name]
        if tuple(t.shape) != tuple(live.shape):
            raise ConfigError(
                f"{name} has shape {tuple(t.shape)} in {folder} but {tuple(live.shape)} in the loaded "
                "model: use checkpoints of one base model"
            )
        live.copy_(t)
