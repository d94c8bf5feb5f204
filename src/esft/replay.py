"""Rebuild the weights of any iteration from the base model and the seed log alone.

A seed log entry holds the members (seed, sign), their shaped rewards and alpha: everything the update
needs. Applying entries 1..T to the base model with the same code path reproduces checkpoint T bit for
bit (same device type and dtype), which makes an ES fine-tune describable in kilobytes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from esft import environment
from esft.config import ESConfig
from esft.engines import Engine, build_engine
from esft.errors import ConfigError
from esft.models import resolve_model
from esft.population import apply_seedlog, es_params
from esft.runstore import RunStore
from esft.safetensors_folder import iter_tensors, tensor_names


def replay(
    run_dir: str | Path,
    iteration: int,
    progress: bool = True,
    allow_environment_change: bool = False,
    after: Callable[[int, Engine], None] | None = None,
) -> tuple[Engine, ESConfig]:
    """An engine holding the weights of ``iteration`` of the run in ``run_dir``, rebuilt from the base.
    Refuses (one-line ConfigError) if the device, dtype, torch version, GPU or base weights differ from
    the run's ``environment.json``, unless ``allow_environment_change``. ``after(t, engine)`` is called
    with the weights of every iteration t = 0..``iteration`` on the way (to check one against its
    checkpoint)."""
    store = RunStore(run_dir)
    saved = store.read_config()
    config = ESConfig.from_dict(
        {k: v for k, v in saved.items() if k in ESConfig.field_names()}, str(store.config_path)
    )
    log = store.seedlog()
    if iteration < 0 or iteration > len(log):
        raise ConfigError(
            f"--iteration must be between 0 and {len(log)} (the iterations in {store.seedlog_path})"
        )
    model_path = saved.get("model_path") or resolve_model(config.model)
    # Always the HF engine: every engine draws the same noise for the same (seed, HF name) and runs the
    # same ParamSet update, so a vLLM run replays bit for bit here (on the same device type and dtype).
    engine = build_engine(
        "hf", model_path, dtype=config.dtype, device=config.device, batch_size=config.batch_size
    )
    if not allow_environment_change:
        now = environment.describe(engine, "hf", model_path)
        environment.check(environment.read(store.root), now, environment.REPLAY_CHECKED, "esft replay")
    params = es_params(engine, config.freeze, config.noise, config.rank, config.update_precision)
    if after is not None:
        after(0, engine)
    for t, entry in enumerate(tqdm(log[:iteration], desc="replay", unit="it", disable=not progress), 1):
        apply_seedlog(params, [entry])
        if after is not None:
            after(t, engine)
    return engine, config


def compare_weights(a: dict[str, torch.Tensor], b: str | Path) -> tuple[bool, float]:
    """(bit-identical, max abs difference) of the tensors ``a`` and those of the checkpoint folder ``b``,
    read from its safetensors one tensor at a time (no model is built). Different names, shapes or
    dtypes give (False, inf)."""
    if set(a) != tensor_names(b):
        return False, float("inf")
    identical, worst = True, 0.0
    for name, y in iter_tensors(b):
        x = a[name].detach().cpu()
        if x.shape != y.shape or x.dtype != y.dtype:
            return False, float("inf")
        if not torch.equal(x, y):
            identical = False
            worst = max(worst, float((x.float() - y.float()).abs().max()))
    return identical, worst
