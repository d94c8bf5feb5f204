"""``--report-to``: each tracker, for real and offline (W&B offline, MLflow's local store, Trackio's local
database), logs the values metrics.jsonl and eval.jsonl hold, under the same names, for ES and GRPO; a
resume continues the same tracker run; ``none`` writes no tracker files; bad names and missing packages
are one-line errors."""

from __future__ import annotations

import importlib
import json
import math
import os
import struct
import sys
import tempfile
import time
from pathlib import Path

import pytest
from helpers import import_or_skip, tiny_config

from esft.callbacks import scalars
from esft.cli import build_parser, main
from esft.config import ESConfig, GRPORunConfig
from esft.errors import ConfigError
from esft.runstore import RunStore
from esft.trackers import PACKAGES, read_state, resolve
from esft.trainer import ESTrainer

# Trackio reads its folder once, at import: keep the tests' databases out of ~/.cache
os.environ.setdefault("TRACKIO_DIR", tempfile.mkdtemp(prefix="esft-test-trackio-"))


def need(tracker: str):
    """The tracker's package; skip without it, except in CI (which installs the dev extra)."""
    return import_or_skip(
        PACKAGES[tracker], "install esft with the dev (or trackers) extra", "pip install -e '.[trackers]'"
    )


@pytest.fixture(autouse=True)
def offline(monkeypatch, request):
    """Every tracker offline and in the run folder, and a Trackio project of the test's own."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    for var in ("WANDB_DIR", "WANDB_PROJECT", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TRACKIO_PROJECT", f"esft-test-{os.getpid()}-{request.node.name}"[:80])


def _config(tiny_model, out, cls=ESConfig, **kw):
    return tiny_config(tiny_model, out, cls, **kw)


def expected(run: Path) -> dict[tuple[str, int], float]:
    """(name, step) -> value, as the trackers must hold them: metrics.jsonl's numbers, and the
    evaluations' scalars (eval/<metric>) from eval.jsonl."""
    store = RunStore(run)
    out = {(k, m["iteration"]): v for m in store.metrics() for k, v in scalars(m).items()}
    for row in store.evals():
        for k, v in row.items():
            if k != "iteration" and isinstance(v, int | float) and math.isfinite(v):
                out[(f"eval/{k}", row["iteration"])] = float(v)
    return out


# -- reading each tracker back --------------------------------------------------------------------


def _wandb_records(path: Path):
    """The records of a W&B transaction log (``run-<id>.wandb``: a 7-byte header, then LevelDB-log
    blocks of 32 KiB whose records are protobuf ``Record``s); W&B no longer ships a Python reader."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero padding
            pos += left
            continue
        payload, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):  # full, last
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def _finished_wandb_records(path: Path, wait: float = 60.0) -> list:
    """The records of a W&B transaction log once its run's ``exit`` record is there. Read at once after
    ``run.finish()``, the log gave no history records twice in about a dozen runs on a loaded machine;
    W&B's service process may still be writing it then (``wandb sync`` reads it later), and waiting for
    the exit record rules that out."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            records = list(_wandb_records(path))
        except Exception:  # a record still being written
            records = []
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        time.sleep(0.2)
    return list(_wandb_records(path))


def _key(item) -> str:
    """A W&B history or config item's name (``key``, or ``nested_key`` for a path of keys)."""
    return item.key or ".".join(item.nested_key)


def read_wandb(run: Path) -> tuple[dict[tuple[str, int], float], list[dict], set[str]]:
    """What the W&B runs in ``run``/wandb logged: (name, iteration) -> value, their configs, their ids."""
    values: dict[tuple[str, int], float] = {}
    configs, ids = [], set()
    files = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert files, f"no offline W&B run in {run}"
    for path in files:
        config = {}
        for record in _finished_wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.add(record.run.run_id)
            elif kind == "config":
                config.update({_key(u): json.loads(u.value_json) for u in record.config.update})
            elif kind == "history":
                row = {_key(i): json.loads(i.value_json) for i in record.history.item}
                step = row.pop("iteration")
                values.update({(k, step): v for k, v in row.items() if not k.startswith("_")})
        configs.append(config)
    return values, configs, ids


def read_mlflow(run: Path) -> tuple[dict[tuple[str, int], float], dict[str, str], dict]:
    """(name, step) -> value of the run's MLflow run (kept in trackers.json), its params, and its id,
    status and every (name, step) logged, repeats included."""
    from mlflow.tracking import MlflowClient

    state = read_state(run)["mlflow"]
    assert state["tracking_uri"] == f"sqlite:///{run.resolve() / 'mlflow.db'}"
    client = MlflowClient(state["tracking_uri"])
    got = client.get_run(state["run_id"])
    values, history = {}, []
    for key in got.data.metrics:
        for m in client.get_metric_history(state["run_id"], key):
            values[(key, m.step)] = m.value
            history.append((key, m.step))
    return values, got.data.params, {"id": got.info.run_id, "status": got.info.status, "history": history}


def read_trackio(run: Path) -> tuple[dict[tuple[str, int], float], dict]:
    from trackio.sqlite_storage import SQLiteStorage

    state = read_state(run)["trackio"]
    values = {}
    for row in SQLiteStorage.get_logs(state["project"], state["name"]):
        values.update({(k, row["step"]): v for k, v in row.items() if k not in ("step", "timestamp")})
    return values, SQLiteStorage.get_run_config(state["project"], state["name"]) or {}


def read_tensorboard(run: Path) -> dict[tuple[str, int], float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "events"), size_guidance={"scalars": 0})
    acc.Reload()
    return {(tag, e.step): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}


def assert_same(got: dict, want: dict, rel: float = 0.0) -> None:
    assert set(got) == set(want), (sorted(set(want) - set(got))[:5], sorted(set(got) - set(want))[:5])
    for key, v in want.items():
        assert got[key] == pytest.approx(v, rel=rel, abs=1e-30 if rel else 0), key


# -- the tests -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("tracker", ["wandb", "mlflow", "trackio", "tensorboard"])
def test_each_tracker_logs_the_values_of_metrics_jsonl(tiny_model, tmp_path, tracker):
    need(tracker)
    run = tmp_path / "run"
    ESTrainer(_config(tiny_model, run, report_to=[tracker]), progress=False).train()
    want = expected(run)
    assert ("train/reward_mean", 3) in want and ("es/update_norm", 1) in want and ("eval/reward", 0) in want
    config = RunStore(run).read_config()
    if tracker == "wandb":
        got, configs, ids = read_wandb(run)
        assert_same(got, want)
        assert configs[0]["population"] == 4 and configs[0]["report_to"] == ["wandb"]
        assert ids == {read_state(run)["id"]} and ids.pop().startswith("run-")
    elif tracker == "mlflow":
        got, params, info = read_mlflow(run)
        assert_same(got, want)
        assert len(info["history"]) == len(set(info["history"]))  # each value once
        assert params["population"] == "4" and params["task"] == "conciseness"
        assert params["report_to"] == '["mlflow"]' and info["status"] == "FINISHED"
    elif tracker == "trackio":
        got, tconfig = read_trackio(run)
        assert_same(got, want)
        assert tconfig["population"] == 4 and tconfig["task"] == config["task"]
    else:
        assert_same(read_tensorboard(run), want, rel=1e-6)  # TensorBoard keeps float32
    others = {"wandb": run / "wandb", "mlflow": run / "mlflow.db", "tensorboard": run / "events"}
    assert [k for k, p in others.items() if p.exists()] == ([tracker] if tracker in others else [])


def test_several_trackers_at_once_and_resume_continues_each_tracker_run(tiny_model, tmp_path):
    for t in ("wandb", "mlflow", "trackio"):
        need(t)
    run = tmp_path / "run"
    report = ["wandb", "mlflow", "trackio"]
    ESTrainer(_config(tiny_model, run, iterations=2, report_to=report), progress=False).train()
    first = read_state(run)
    mlflow_id = read_mlflow(run)[2]["id"]
    # resumed with another iteration count and one more tracker (both may change on --resume)
    config = _config(tiny_model, run, iterations=4, report_to=["tensorboard", *report])
    ESTrainer(config, resume=True, progress=False).train()
    assert read_state(run)["id"] == first["id"] and read_state(run)["mlflow"] == first["mlflow"]
    want = expected(run)
    assert {step for _, step in want} == {0, 1, 2, 3, 4}

    got, configs, ids = read_wandb(run)
    assert_same(got, want)
    assert ids == {first["id"]} and len(configs) == 2  # two offline segments of one W&B run
    assert configs[-1]["iterations"] == 4

    got, params, info = read_mlflow(run)
    assert info["id"] == mlflow_id and info["status"] == "FINISHED"
    assert_same(got, want)
    assert len(info["history"]) == len(set(info["history"]))
    assert params["iterations"] == "2"  # MLflow params cannot change; the first start's are kept

    got, _ = read_trackio(run)
    assert_same(got, want)
    tb = read_tensorboard(run)  # started on the resume: iterations 3 and 4 only
    assert {step for _, step in tb} == {3, 4}


def test_grpo_logs_the_same_names_as_its_metrics_jsonl(tiny_model, tmp_path):
    import_or_skip("trl", "install esft with the dev (or grpo) extra", "pip install -e '.[grpo]'")
    for t in ("wandb", "mlflow", "trackio"):
        need(t)
    from esft.grpo import GRPORun

    run = tmp_path / "run"
    config = _config(
        tiny_model,
        run,
        GRPORunConfig,
        iterations=2,
        eval_every=2,
        group_size=4,
        learning_rate=1e-3,
        seed=1,
        report_to=["wandb", "mlflow", "trackio"],
    )
    GRPORun(config, progress=False).train()
    want = expected(run)
    names = {k for k, _ in want}
    # the names ES logs for the same things
    assert {"train/reward_mean", "perf/seconds", "samples", "grpo/loss", "eval/reward"} <= names
    assert_same(read_wandb(run)[0], want)
    assert_same(read_mlflow(run)[0], want)
    assert_same(read_trackio(run)[0], want)


def test_a_resumed_grpo_run_logs_each_redone_step_once(tiny_model, tmp_path):
    """GRPO resumes from its last training state (step 2) and redoes step 3, which the first attempt had
    logged: W&B, MLflow and Trackio keep one row per step (the first attempt's), TensorBoard the redone
    one; the values are metrics.jsonl's (the redone step is bit-identical but for its timings)."""
    import_or_skip("trl", "install esft with the dev (or grpo) extra", "pip install -e '.[grpo]'")
    for t in ("wandb", "mlflow", "trackio", "tensorboard"):
        need(t)
    from esft.callbacks import Callback
    from esft.grpo import GRPORun

    class Crash(Callback):  # the process dies once step 3 is logged everywhere
        def on_log(self, metrics, step):
            if step == 3:
                raise KeyboardInterrupt

    run = tmp_path / "run"
    config = _config(tiny_model, run, GRPORunConfig, iterations=4, eval_every=1, checkpoint_every=2,
                     group_size=4, learning_rate=1e-3, seed=1,
                     report_to=["tensorboard", "wandb", "mlflow", "trackio"])  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        GRPORun(config, callbacks=[Crash()], progress=False).train()
    assert [p.name for p in (run / "trl").glob("checkpoint-*")] == ["checkpoint-2"]
    assert [m["iteration"] for m in RunStore(run).metrics()] == [1, 2, 3]
    GRPORun(config, resume=True, progress=False).train()
    want = expected(run)
    assert {step for _, step in want} == {0, 1, 2, 3, 4}
    # timings are measured anew on the redo (esft's perf/*, TRL's step_time)
    timing = {k for k in want if k[1] == 3 and (k[0].startswith("perf/") or k[0].endswith("_time"))}

    def same(got: dict) -> None:
        assert set(got) == set(want)
        assert_same(
            {k: v for k, v in got.items() if k not in timing},
            {k: v for k, v in want.items() if k not in timing},
        )

    rows = wandb_rows(run, "train/reward_mean")
    assert rows == [1, 2, 3, 4], rows  # not 1, 2, 3, 3, 4
    same(read_wandb(run)[0])
    got, _, info = read_mlflow(run)
    assert len(info["history"]) == len(set(info["history"])), "a step logged twice"
    same(got)
    assert trackio_rows(run, "train/reward_mean") == [1, 2, 3, 4]
    same(read_trackio(run)[0])
    # TensorBoard purged the first attempt's step 3 and holds the redone one, timings included
    tb = read_tensorboard(run)
    assert sorted({step for _, step in tb}) == [0, 1, 2, 3, 4]
    assert all(tb[k] == pytest.approx(want[k], rel=1e-6) for k in tb)


def wandb_rows(run: Path, key: str) -> list[int]:
    """The iterations of every W&B history row holding ``key``, in logging order, repeats included."""
    steps = []
    for path in sorted((run / "wandb").glob("offline-run-*/run-*.wandb")):
        for record in _wandb_records(path):
            if record.WhichOneof("record_type") == "history":
                row = {_key(i): json.loads(i.value_json) for i in record.history.item}
                if key in row:
                    steps.append(row["iteration"])
    return steps


def trackio_rows(run: Path, key: str) -> list[int]:
    from trackio.sqlite_storage import SQLiteStorage

    state = read_state(run)["trackio"]
    return [r["step"] for r in SQLiteStorage.get_logs(state["project"], state["name"]) if key in r]


def test_none_writes_no_tracker_files_but_the_run_logs(tiny_model, tmp_path):
    run = tmp_path / "run"
    ESTrainer(_config(tiny_model, run, iterations=2, report_to=["none"]), progress=False).train()
    names = {p.name for p in run.iterdir()}
    assert {"metrics.jsonl", "eval.jsonl", "config.yaml"} <= names
    assert not names & {"events", "wandb", "mlflow.db", "trackers.json", "mlartifacts"}
    assert len(RunStore(run).metrics()) == 2 and RunStore(run).seedlog()


def test_report_to_names_flags_and_config_files(tmp_path, monkeypatch):
    from esft.cli import _train_config

    def parse(*argv):
        args = build_parser().parse_args(["train", *argv])
        return _train_config(args, ["train", *argv])[0].report_to

    assert ESConfig().report_to == GRPORunConfig().report_to == ["tensorboard"]
    assert parse("--report-to", "wandb", "mlflow") == ["wandb", "mlflow"]
    assert parse("--report-to", "wandb,trackio") == ["wandb", "trackio"]
    cfg = tmp_path / "c.yaml"
    cfg.write_text("report_to: tensorboard, mlflow\n")
    assert parse("--config", str(cfg)) == ["tensorboard", "mlflow"]
    cfg.write_text("report_to: [trackio]\n")
    assert parse("--config", str(cfg)) == ["trackio"]
    assert parse("--config", str(cfg), "--report-to", "none") == ["none"]
    assert resolve(["none"]) == [] and resolve([]) == []
    found = {t for t in PACKAGES if importlib.util.find_spec(PACKAGES[t])}
    assert set(resolve("all")) == found and "tensorboard" in found
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "wandb" else object())
    assert resolve(["all"]) == ["tensorboard", "mlflow", "trackio"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--report-to", "wandbx"],
            "unknown report_to wandbx; valid: tensorboard, wandb, mlflow, trackio, all, none",
        ),
        (["--report-to", "none", "wandb"], "report_to: all and none stand alone"),
    ],
)
def test_a_bad_name_is_a_one_line_error(tiny_model, tmp_path, capsys, flags, message):
    argv = ["train", "--model", str(tiny_model), "--output", str(tmp_path / "run"), "--task", "conciseness"]
    assert main([*argv, *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_a_missing_tracker_package_is_a_one_line_error_before_the_run_starts(
    tiny_model, tmp_path, monkeypatch
):
    monkeypatch.setitem(sys.modules, "trackio", None)  # import trackio now fails
    with pytest.raises(
        ConfigError, match=r"^--report-to trackio: the trackio package .*; pip install trackio"
    ):
        ESTrainer(_config(tiny_model, tmp_path / "run", report_to=["mlflow", "trackio"]), progress=False)
    assert not (tmp_path / "run" / "config.yaml").exists()
    argv = ["train", "--model", str(tiny_model), "--output", str(tmp_path / "r2"), "--report-to", "trackio"]
    assert main([*argv, "--task", "conciseness", "--quiet"]) == 2


def test_wandb_online_without_a_login_is_a_one_line_error(tiny_model, tmp_path, monkeypatch):
    wandb = need("wandb")
    monkeypatch.delenv("WANDB_MODE")

    def no_key(*a, **k):
        raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.setattr(wandb, "login", no_key)
    with pytest.raises(ConfigError, match="wandb login.*WANDB_MODE=offline"):
        ESTrainer(_config(tiny_model, tmp_path / "run", report_to=["wandb"]), progress=False)
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_a_failed_run_is_marked_failed_in_mlflow(tiny_model, tmp_path, monkeypatch):
    need("mlflow")
    run = tmp_path / "run"
    trainer = ESTrainer(_config(tiny_model, run, report_to=["mlflow"]), progress=False)

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(trainer, "_iteration", boom)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    assert read_mlflow(run)[2]["status"] == "FAILED"
