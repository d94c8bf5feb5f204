"""Callbacks see what the run folder records, for ES and GRPO alike, and can end a run early."""

from __future__ import annotations

import pytest
from helpers import tiny_config

from esft.callbacks import Callback
from esft.config import ESConfig
from esft.runstore import RunStore
from esft.trainer import ESTrainer


class Recorder(Callback):
    def __init__(self, stop_at: int | None = None) -> None:
        self.events: list[tuple] = []
        self.stop_at = stop_at

    def on_train_begin(self, run):
        self.events.append(("begin", run.trainer, run.start, run.config["task"]))

    def on_log(self, metrics, step):
        self.events.append(("log", step, metrics["train/reward_mean"]))
        if self.stop_at is not None and step >= self.stop_at:
            self.stop = f"told to stop at {self.stop_at}"

    def on_evaluate(self, scalars, rows, step):
        self.events.append(("eval", step, sorted(scalars), len(rows)))

    def on_checkpoint(self, path, step):
        self.events.append(("checkpoint", step, path.name))

    def on_train_end(self):
        self.events.append(("end",))


def _config(tiny_model, out, **kw) -> ESConfig:
    return tiny_config(tiny_model, out, iterations=4, **kw)


def test_es_callbacks_see_the_logged_rows_evaluations_and_checkpoints(tiny_model, tmp_path):
    rec = Recorder()
    ESTrainer(_config(tiny_model, tmp_path / "run"), progress=False, callbacks=[rec]).train()
    store = RunStore(tmp_path / "run")
    logged = [(e[1], e[2]) for e in rec.events if e[0] == "log"]
    assert logged == [(m["iteration"], m["train/reward_mean"]) for m in store.metrics()]
    assert rec.events[0] == ("begin", "es", 0, "conciseness") and rec.events[-1] == ("end",)
    assert [e[1] for e in rec.events if e[0] == "eval"] == [0, 2, 4]
    assert all(e[2] and all(k.startswith("eval/") for k in e[2]) for e in rec.events if e[0] == "eval")
    assert [(e[1], e[2]) for e in rec.events if e[0] == "checkpoint"] == [
        (2, "iter-000002"),
        (4, "iter-000004"),
    ]
    assert (tmp_path / "run" / "events").is_dir()  # TensorBoard is a callback too, always on


def test_a_callback_stops_an_es_run_which_ends_as_at_its_last_iteration(tiny_model, tmp_path):
    rec = Recorder(stop_at=1)
    result = ESTrainer(_config(tiny_model, tmp_path / "run"), progress=False, callbacks=[rec]).train()
    assert result.iterations == 1 and result.final_checkpoint is not None
    assert [e[1] for e in rec.events if e[0] == "log"] == [1]
    assert rec.events[-1] == ("end",) and [e for e in rec.events if e[0] == "end"] == [("end",)]
    # and the run resumes from there like any other
    again = Recorder()
    ESTrainer(_config(tiny_model, tmp_path / "run"), resume=True, progress=False, callbacks=[again]).train()
    assert again.events[0][:3] == ("begin", "es", 1)
    assert [e[1] for e in again.events if e[0] == "log"] == [2, 3, 4]


def test_the_end_is_reported_when_a_run_fails(tiny_model, tmp_path, monkeypatch):
    rec = Recorder()
    trainer = ESTrainer(_config(tiny_model, tmp_path / "run"), progress=False, callbacks=[rec])

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(trainer, "_iteration", boom)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    assert rec.events[-1] == ("end",)
