"""The sweep folder, and opening its Optuna study. Imports neither torch nor a trainer: ``esft report``
reads sweeps through this module.

```
SWEEP/
  sweep.yaml            the resolved sweep file (what esft sweep --resume and the trials read)
  study.db              the Optuna storage (SQLite; study.journal with storage: journal)
  trials/trial-0007/    trial 7's run folder (an ordinary one)
  logs/trial-0007.log   its output, when it ran in a process of its own (--parallel K, Ray)
  .lock                 held by the running esft sweep
```

``storage`` in the sweep file is ``sqlite`` (the default: ``SWEEP/study.db``), ``journal`` (Optuna's
``JournalStorage`` over ``JournalFileBackend``: ``SWEEP/study.journal``, the choice for a folder on a
network file system) or any database URL Optuna's ``RDBStorage`` takes (``postgresql://...``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from esft.errors import ConfigError, first_line

SPEC_FILE = "sweep.yaml"
SQLITE_FILE = "study.db"
JOURNAL_FILE = "study.journal"
TRIALS = "trials"
LOGS = "logs"
INSTALL = "pip install -e '.[sweep]'"


def is_sweep(path: str | Path) -> bool:
    """Whether ``path`` is a sweep folder (it holds ``sweep.yaml``)."""
    return (Path(path) / SPEC_FILE).is_file()


def trial_name(number: int) -> str:
    return f"trial-{number:04d}"


def trial_dir(root: Path, number: int) -> Path:
    return Path(root) / TRIALS / trial_name(number)


def log_path(root: Path, number: int) -> Path:
    return Path(root) / LOGS / f"{trial_name(number)}.log"


def read_spec(root: str | Path) -> dict[str, Any]:
    """The saved sweep file of the sweep in ``root``."""
    path = Path(root) / SPEC_FILE
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"{root} is not a sweep folder ({path}: {e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is malformed: {first_line(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping")
    return data


def write_spec(root: Path, spec: dict[str, Any]) -> None:
    path = Path(root) / SPEC_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(spec, sort_keys=False))
    tmp.replace(path)


def study_name(root: str | Path, spec: dict[str, Any]) -> str:
    """The study's name: ``study_name`` from the sweep file, else the sweep folder's name."""
    return str(spec.get("study_name") or Path(root).resolve().name)


def storage_url(root: str | Path, storage: str) -> str:
    """Where the study lives, as one string (a URL, or the journal file's path)."""
    root = Path(root).resolve()
    if storage == "sqlite":
        return f"sqlite:///{root / SQLITE_FILE}"
    if storage == "journal":
        return str(root / JOURNAL_FILE)
    return storage


def import_optuna():
    try:
        import optuna
    except ImportError:
        raise ConfigError(f"sweeps run on Optuna, which is not installed: {INSTALL}") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # esft prints its own line per trial
    return optuna


def open_storage(root: str | Path, storage: str):
    """The Optuna storage object of a sweep (see the module docstring)."""
    optuna = import_optuna()
    if storage == "journal":
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(storage_url(root, storage)))
    url = storage_url(root, storage)
    # several trial processes write one SQLite file: wait for its lock rather than fail after 5 s
    kwargs = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else None
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    except Exception as e:  # a bad URL, a missing database driver, an unreachable server
        first = first_line(e)
        raise ConfigError(f"storage {url}: cannot open it: {first}") from None


def load_study(root: str | Path, spec: dict[str, Any] | None = None, sampler=None, pruner=None):
    """The sweep's study, read from its storage (``spec``: the saved sweep file, read if None)."""
    optuna = import_optuna()
    spec = read_spec(root) if spec is None else spec
    storage = open_storage(root, str(spec.get("storage") or "sqlite"))
    name = study_name(root, spec)
    try:
        return optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
    except KeyError:
        raise ConfigError(f"{root}: its storage holds no study named {name!r}") from None
