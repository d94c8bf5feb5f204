"""Reading user dataset files (JSON array, JSONL) with one-line errors for malformed input."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from esft.errors import DataError, first_line


def read_rows(path: str | Path, required: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Rows of a .json (array of objects) or .jsonl file; each must hold the ``required`` keys."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"dataset file {str(path)!r} does not exist")
    rows: list[Any]
    text = p.read_text(encoding="utf-8") if p.suffix in (".json", ".jsonl") else ""
    if p.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{p}: not valid JSON ({e.msg} at line {e.lineno}); expected an array of objects"
            ) from None
        if isinstance(rows, dict) and isinstance(rows.get("data"), list):
            rows = rows["data"]
        if not isinstance(rows, list):
            raise DataError(f"{p}: expected a JSON array of objects")
    elif p.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{p}: reading Parquet needs pyarrow: pip install pyarrow") from None
        try:
            rows = pq.read_table(p).to_pylist()
        except Exception as e:
            raise DataError(f"{p}: not a readable Parquet file ({type(e).__name__})") from None
    elif p.suffix == ".jsonl":
        rows = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{p}:{lineno}: not valid JSON ({e.msg}); expected one object per line"
                ) from None
    else:
        raise DataError(f"{p}: unsupported file type {p.suffix!r}; use .json, .jsonl or .parquet")
    if not rows:
        raise DataError(f"{p}: the file holds no rows")
    for i, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise DataError(f"{p}: row {i} is not an object")
        missing = [k for k in required if k not in row]
        if missing:
            raise DataError(f"{p}: row {i} lacks {', '.join(missing)}; each row needs {', '.join(required)}")
    return rows


def file_split(
    split: str,
    data_file: str,
    test_file: str | None,
    seed: int,
    read: Callable[[str], list[dict[str, Any]]],
) -> list[dict[str, Any]]:
    """The rows of ``split`` from user files, read (and validated) by ``read(path)``.

    With a ``test_file``, ``data_file`` is all train. Otherwise rows go by their ``split`` column when
    any row has one, else by a fixed-seed 90/10 shuffle (at least one test row when there are two+).
    """
    if test_file:
        return read(test_file if split == "test" else data_file)
    rows = read(data_file)
    if any("split" in r for r in rows):
        return [r for r in rows if r.get("split") == split]
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    test = set(order[: max(1, len(rows) // 10)]) if len(rows) > 1 else set()
    return [r for i, r in enumerate(rows) if (i in test) == (split == "test")]


def read_hub(name: str, split: str, config: str | None = None) -> list[dict[str, Any]]:
    """Rows of split ``split`` of the Hugging Face dataset ``name`` (needs ``datasets`` and a hub).

    Every failure (package missing, hub unreachable, unknown dataset or split) is one ``DataError`` line.
    """
    try:
        import datasets
        from datasets.utils.logging import disable_progress_bar, set_verbosity_error
    except ImportError:
        raise DataError(
            f"loading the Hugging Face dataset {name!r} needs the datasets package: "
            "pip install 'esft[hub]' (or pass a local data_file)"
        ) from None
    set_verbosity_error()
    disable_progress_bar()
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except ValueError as e:  # unknown split or config
        first = first_line(e)
        raise DataError(f"Hugging Face dataset {name!r}: {first}") from None
    except Exception as e:  # ConnectionError, DatasetNotFoundError, ...
        first = first_line(e)
        raise DataError(
            f"cannot load the Hugging Face dataset {name!r} (split {split!r}): {first}; "
            "check the name and network access, or download it and pass data_file=<path>"
        ) from None
    return [dict(r) for r in ds]
