"""``esft sweep``: hyperparameter search over any training setting with Optuna (``docs/sweeps.md``).

A sweep is a folder: ``sweep.yaml`` (the resolved sweep file), the Optuna storage (``study.db``,
SQLite, by default), and one ordinary run folder per trial under ``trials/`` (so ``esft analyze``,
``esft report``, ``esft eval`` and ``esft replay`` work on each). One job per module:

- ``layout``: the sweep folder (paths, the saved sweep file, opening the study); no torch, no trainer,
  so ``esft report`` reads sweeps through it;
- ``space``: the sweep file parsed and checked into Optuna distributions, samplers and pruners, with
  one-line errors;
- ``objective``: one trial as a run folder, trained by the ES trainer or the GRPO run, reported to
  Optuna at each periodic evaluation and pruned there; also the entry point of a trial's own process;
- ``driver``: creating or resuming the study, asking trials and running them in this process, in K
  processes (``--parallel K``) or as Ray tasks (``--ray``, ``--ray-address``);
- ``cli``: the ``esft sweep`` command.

Optuna is an optional extra (``pip install -e '.[sweep]'``); nothing here imports it at import time.
"""
