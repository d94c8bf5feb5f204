"""Distributed ES on a local Ray cluster (loopback, two CPU workers, the tiny model): the same weights
as one process, a worker killed mid-iteration, diverging workers, and one-line errors without Ray or
with an unreachable cluster. Skipped without Ray, except in CI (which installs the ray extra)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import missing_dependency
from safetensors.torch import load_file

from esft import cli, population
from esft.cli import main
from esft.runstore import RunStore

HAVE_RAY = importlib.util.find_spec("ray") is not None
COMMON = ["--task", "conciseness", "--population", "4", "--sigma", "0.05", "--alpha", "0.05",
          "--max-new-tokens", "12", "--seed", "3", "--batch-size", "4", "--quiet"]  # fmt: skip
ITERATIONS = 4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Each of the two workers gets one core and one torch thread; on CPU a matmul's rounding can depend
    on the thread count, so the single-process runs compared with them use one thread too."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def needs_ray():
    if not HAVE_RAY:
        missing_dependency("ray", ".ci/run must pip install -e '.[ray]'", "pip install -e '.[ray]'")


@pytest.fixture(scope="module")
def ray_cluster(needs_ray):
    """One local cluster (2 CPUs, loopback) that the pools below join instead of starting their own."""
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        logging_level="WARNING",
    )
    yield
    ray.shutdown()


def train(model: Path, out: Path, *extra: str, iterations: int = ITERATIONS) -> int:
    return main(["train", "--model", str(model), "--output", str(out), "--iterations", str(iterations),
                 *COMMON, *extra])  # fmt: skip


def weights(run: Path, iteration: int = ITERATIONS) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"iter-{iteration:06d}" / "model.safetensors"))


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_same_run(a: Path, b: Path) -> None:
    """Bit-identical final weights, which training moved away from the base model's (every matrix:
    all noise schemes train them), the same seed log (members, rewards, weights) and member rewards."""
    wa, wb = weights(a), weights(b)
    assert set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)
    base = load_file(str(Path(RunStore(a).read_config()["model_path"]) / "model.safetensors"))
    assert set(base) == set(wa)
    matrices = [k for k, v in base.items() if v.ndim == 2]
    assert matrices and all(not torch.equal(base[k].to(wa[k].dtype), wa[k]) for k in matrices), [
        k for k in matrices if torch.equal(base[k].to(wa[k].dtype), wa[k])
    ]
    assert rows(a / "seedlog.jsonl") == rows(b / "seedlog.jsonl")
    assert [m["member_rewards"] for m in rows(a / "metrics.jsonl")] == [
        m["member_rewards"] for m in rows(b / "metrics.jsonl")
    ]


def test_checksum_is_exact_and_sees_one_ulp():
    from esft.es.checksum import checksums, digest, tensor_checksum

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        t = torch.randn(1001, generator=g).to(dtype)  # 1001 values: whole 8-byte words plus a tail
        base = tensor_checksum(t)
        assert tensor_checksum(t.clone()) == base
        for i in (0, 500, 1000):  # one value one ulp up, at the start, the middle and in the tail
            u = t.clone()
            u[i] = torch.nextafter(u[i], torch.tensor(float("inf"), dtype=dtype))
            assert tensor_checksum(u) != base, (dtype, i)
    view = torch.randn(40, generator=g)[3:]  # a view at a 12-byte offset: not 8-byte aligned
    assert tensor_checksum(view) == tensor_checksum(view.clone())
    a = {"x": torch.ones(3), "y": torch.zeros(2)}
    assert digest(checksums(a)) == digest(checksums(dict(reversed(a.items()))))
    assert digest(checksums(a)) != digest(checksums({"x": torch.ones(3), "z": torch.zeros(2)}))


def test_a_worker_is_a_param_set_behind_remote_calls(tiny_model, monkeypatch):
    """The worker side driven in-process through RemoteParamSet (no Ray): perturb, restore and update
    give the bits and statistics of a local ParamSet on an identical engine."""
    from esft.distributed.worker import Worker
    from esft.engines import build_engine
    from esft.es import iteration_members
    from esft.es.checksum import checksums
    from esft.es.remote import RemoteParamSet

    spec = {"engine": "hf", "dtype": "float32", "device": "cpu", "batch_size": 4, "engine_options": {},
            "task": {"name": "conciseness"}, "threads": 1}  # fmt: skip
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # a Worker sets them for its process: undo here
        monkeypatch.setenv(name, os.environ.get(name, ""))
    worker = Worker(spec, 0)
    report = worker.build([(str(tiny_model), [])])
    assert report["device"] == "cpu" and report["task"][0] == "conciseness"
    remote = RemoteParamSet(lambda method, *args: getattr(worker, method)(*args), ["lm_head*"], "independent")
    engine = build_engine("hf", str(tiny_model), dtype="float32", device="cpu", batch_size=4)
    local = population.es_params(engine, ["lm_head*"], "independent")
    assert remote.numel == local.numel and remote.names == list(local.params)
    base = checksums(engine.parameters())
    members = iteration_members(0, 1, 4)
    remote.perturb(members[1], 0.1)
    local.perturb(members[1], 0.1)
    assert checksums(worker.engine.parameters()) == checksums(engine.parameters()) != base
    remote.restore()
    local.restore()
    assert checksums(worker.engine.parameters()) == base
    ours, theirs = (
        remote.update(members, [1.0, -0.5, 0.25, 0.0], 0.1),
        local.update(members, [1.0, -0.5, 0.25, 0.0], 0.1),
    )
    assert (ours.update_norm, ours.param_norm, ours.changed_fraction) == (
        theirs.update_norm, theirs.param_norm, theirs.changed_fraction
    )  # fmt: skip
    assert checksums(worker.engine.parameters()) == checksums(engine.parameters()) != base


def single_run(model: Path, out: Path, noise: str) -> Path:
    """A single-process run (4 iterations, checkpoints every 2, evaluation at the end)."""
    assert train(model, out, "--noise", noise, "--checkpoint-every", "2", "--eval-every", "4") == 0
    return out


@pytest.fixture(scope="module")
def single(tiny_model, tmp_path_factory) -> Path:
    return single_run(tiny_model, tmp_path_factory.mktemp("ray") / "single", "independent")


@pytest.fixture(scope="module")
def single_lowrank(tiny_model, tmp_path_factory) -> Path:
    return single_run(tiny_model, tmp_path_factory.mktemp("ray") / "single-lowrank", "lowrank")


@pytest.mark.parametrize("noise", ["independent", "lowrank"])
def test_two_workers_give_the_single_process_run(
    needs_ray, tiny_model, noise, request, tmp_path, monkeypatch, capsys
):
    """--workers 2 starts a local cluster, spreads the members (low-rank: population batches of
    batch_size // prompts members) and ends with the same bits, seed log, rewards and evaluation; the
    run folder replays, like any other."""
    import ray

    import esft.distributed.pool as pool

    monkeypatch.setattr(pool, "usable_cpus", lambda: 2)  # one core and one thread per worker, on any machine

    single = request.getfixturevalue("single" if noise == "independent" else "single_lowrank")
    assert not ray.is_initialized()  # the pool starts its own cluster here, and stops it
    out = tmp_path / "two"
    extra = ("--noise", noise, "--checkpoint-every", "2", "--eval-every", "4")
    assert train(tiny_model, out, "--workers", "2", *extra) == 0
    assert not ray.is_initialized()
    assert_same_run(single, out)
    strip = [{k: v for k, v in e.items() if k != "examples"} for e in rows(single / "eval.jsonl")]
    assert strip == [{k: v for k, v in e.items() if k != "examples"} for e in rows(out / "eval.jsonl")]
    env_single = json.loads((single / "environment.json").read_text())
    assert json.loads((out / "environment.json").read_text()) == env_single
    capsys.readouterr()  # the replay of the final iteration is checked against its checkpoint, bit for bit
    assert main(["replay", "--run", str(out), "--iteration", str(ITERATIONS), "--quiet"]) == 0
    checkpoint = out / "checkpoints" / f"iter-{ITERATIONS:06d}"
    assert f"matches checkpoint {checkpoint}: bit-identical" in capsys.readouterr().out


def test_worker_killed_mid_iteration(ray_cluster, tiny_model, single, tmp_path, monkeypatch, capsys):
    """Worker 1 dies after scoring its first member of iteration 4, with that member in flight: the
    member is re-queued, a replacement is rebuilt from checkpoint 2 plus seed-log entry 3, and the run
    ends with the single-process run's bits."""
    monkeypatch.setenv("ESFT_RAY_FAULT", "exit:worker=1:iteration=4:after=1")
    out = tmp_path / "killed"
    rc = main(["train", "--model", str(tiny_model), "--output", str(out), "--iterations", str(ITERATIONS),
               *[a for a in COMMON if a != "--quiet"], "--workers", "2", "--checkpoint-every", "2",
               "--eval-every", "4"])  # fmt: skip
    assert rc == 0
    captured = capsys.readouterr()
    log = captured.out + captured.err
    assert "Ray worker 1 died while scoring" in log and "re-queued to the others" in log, log
    assert "rebuilt from checkpoint 2 + 1 seed-log update(s)" in log, log
    assert "replacement Ray worker 1 ready" in log and "weights match" in log, log
    assert "1 worker(s) replaced" in log, log
    assert_same_run(single, out)


def test_hung_worker_is_killed_and_replaced(ray_cluster, tiny_model, single, tmp_path, monkeypatch, capsys):
    """Worker 1 stops answering (alive, asleep) after its first unit of iteration 4: past the hang limit
    it is killed and replaced like a dead worker, and the run ends with the single-process run's bits."""
    monkeypatch.setenv("ESFT_RAY_FAULT", "hang:worker=1:iteration=4:after=1")
    out = tmp_path / "hung"
    rc = main(["train", "--model", str(tiny_model), "--output", str(out), "--iterations", str(ITERATIONS),
               *[a for a in COMMON if a != "--quiet"], "--workers", "2", "--checkpoint-every", "2",
               "--eval-every", "4", "--worker-timeout", "10"])  # fmt: skip
    assert rc == 0
    captured = capsys.readouterr()
    log = captured.out + captured.err
    assert "Ray worker 1 hung while scoring (no answer in 10 s, the hang limit (--worker-timeout)" in log, log
    assert "re-queued to the others" in log and "replacement Ray worker 1 ready" in log, log
    assert_same_run(single, out)


def test_automatic_hang_limit():
    from esft.distributed.calls import HANG_FACTOR, HANG_FLOOR_S, Calls

    pool = object.__new__(Calls)  # only the limit's arithmetic, no cluster
    pool.worker_timeout, pool.slowest = 0.0, 0.0
    assert pool.hang_limit() is None  # nothing came back yet: no basis for a limit
    pool.slowest = 2.0
    assert pool.hang_limit() == HANG_FLOOR_S
    pool.slowest = 100.0
    assert pool.hang_limit() == HANG_FACTOR * 100.0
    pool.worker_timeout = 7.5
    assert pool.hang_limit() == 7.5


def test_resume_a_distributed_run_in_one_process(ray_cluster, tiny_model, single, tmp_path):
    """A distributed run folder is an ordinary one: resumed without workers, it ends the same, with the
    workers' torch thread count (one each) set back in the resuming process."""
    out = tmp_path / "resumed"
    assert train(tiny_model, out, "--workers", "2", "--checkpoint-every", "2", iterations=3) == 0
    assert json.loads((out / "environment.json").read_text())["cpu_threads"] == 1
    torch.set_num_threads(2)  # this process's default would differ from the workers'
    assert main(["train", "--output", str(out), "--iterations", str(ITERATIONS), "--resume", "--workers", "1",
                 "--quiet"]) == 0  # fmt: skip
    assert torch.get_num_threads() == 1
    wa, wb = weights(single), weights(out)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert rows(single / "seedlog.jsonl") == rows(out / "seedlog.jsonl")


def test_diverging_workers_stop_the_run(ray_cluster, tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ESFT_RAY_FAULT", "corrupt:worker=1:iteration=2:after=1")
    out = tmp_path / "diverged"
    assert train(tiny_model, out, "--workers", "2") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("esft: error: the Ray workers' weights diverged after update (iteration 2)"), err
    assert "worker(s) 1 differ" in err and "first differing tensor: model.embed_tokens.weight" in err, err
    assert len(rows(out / "seedlog.jsonl")) == 2 and "--resume" in err


def test_without_ray_workers_is_a_one_line_error(tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails, as when it is not installed
    assert train(tiny_model, tmp_path / "r", "--workers", "2") == 2
    err = capsys.readouterr().err.strip()
    assert err == "esft: error: --workers 2 runs ES on Ray, which is not installed: pip install -e '.[ray]'"


def test_unreachable_cluster_is_a_quick_one_line_error(needs_ray, tiny_model, tmp_path, capsys):
    tic = time.perf_counter()
    assert train(tiny_model, tmp_path / "r", "--ray-address", "127.0.0.1:1") == 2
    assert time.perf_counter() - tic < 10
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--ray-address 127.0.0.1:1: cannot reach a Ray cluster there" in err, err


def test_pool_copies_a_checkpoint_from_another_node(ray_cluster, tiny_model, tmp_path, monkeypatch):
    """A checkpoint is written by a worker on the driver's node; with none there, it is copied over in
    chunks. Both give the same files."""
    from esft.distributed import checkpoints
    from esft.distributed import pool as pool_module
    from esft.tasks import load_task

    cfg = cli._train_config(
        cli.build_parser().parse_args(["train", "--model", str(tiny_model), "--workers", "2", *COMMON]), ["x"]
    )[0]
    pool = pool_module.WorkerPool(cfg, str(tiny_model), {}, load_task("conciseness"), log=lambda m: None)
    try:
        assert all(s.node == pool.driver_node for s in pool.slots)  # one machine: every worker is local
        pool.save(tmp_path / "direct")
        monkeypatch.setattr(checkpoints, "CHUNK_BYTES", 4096)
        pool.driver_node = "another node"
        pool.save(tmp_path / "copied")
    finally:
        pool.close()
    direct = {p.name: p.read_bytes() for p in (tmp_path / "direct").iterdir()}
    assert direct and direct == {p.name: p.read_bytes() for p in (tmp_path / "copied").iterdir()}


@pytest.mark.parametrize(("noise", "precision"), [("independent", "master"), ("lowrank", "stochastic")])
def test_bf16_remedies_on_two_workers_give_the_single_process_bits(
    ray_cluster, tiny_model, tmp_path, monkeypatch, capsys, noise, precision
):
    """bf16 with float32 masters or stochastic rounding: every worker updates its replica with the same
    bits as one process; worker 1 dies in iteration 4 and its replacement is rebuilt from checkpoint 2
    (with that checkpoint's masters) plus seed-log entry 3, and the run still ends with the same bits."""
    extra = (
        "--dtype",
        "bfloat16",
        "--noise",
        noise,
        "--update-precision",
        precision,
        "--checkpoint-every",
        "2",
    )
    one = tmp_path / "one"
    assert train(tiny_model, one, *extra) == 0
    if precision == "master":
        assert (one / "checkpoints" / "iter-000002" / "es-state" / "master.safetensors").is_file()
    monkeypatch.setenv("ESFT_RAY_FAULT", "exit:worker=1:iteration=4:after=1")
    two = tmp_path / "two"
    capsys.readouterr()
    assert main(["train", "--model", str(tiny_model), "--output", str(two), "--iterations", str(ITERATIONS),
                 *[a for a in COMMON if a != "--quiet"], "--workers", "2", *extra]) == 0  # fmt: skip
    log = "".join(capsys.readouterr())
    assert "rebuilt from checkpoint 2 + 1 seed-log update(s)" in log and "weights match" in log, log
    assert_same_run(one, two)
    env = json.loads((two / "environment.json").read_text())
    assert env["dtype"] == "bfloat16" and env["update_precision"] == precision


def test_reward_functions_given_in_python_reach_the_workers(ray_cluster, tiny_model, tmp_path):
    """esft.ESTrainer with a reward function defined here (a closure, as in a notebook) and rows given as
    a list: the Ray workers receive the task itself, without its rows, and two workers end with the bits
    of one process."""
    import esft
    from esft.config import ESConfig

    target = 7

    def closeness(prompts, completions, **kwargs):  # uses a variable of this scope: pickled by value
        return [-abs(len(c) - target) for c in completions]

    rows = [{"prompt": "Say hi"}, {"prompt": "Count to three"}, {"prompt": "Name a colour"}]

    def run(out: Path, workers: int) -> Path:
        args = ESConfig(population=4, iterations=2, sigma=0.05, alpha=0.05, max_new_tokens=8, seed=3,
                        batch_size=4, workers=workers, output=str(out), eval_every=0)  # fmt: skip
        trainer = esft.ESTrainer(str(tiny_model), closeness, args=args, train_dataset=rows, progress=False)
        return trainer.train().final_checkpoint

    one, two = run(tmp_path / "one", 1), run(tmp_path / "two", 2)
    a, b = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    base = load_file(str(tiny_model / "model.safetensors"))
    assert any(not torch.equal(a[k], base[k]) for k in a)
    ra = [m["train/reward_mean"] for m in RunStore(tmp_path / "one").metrics()]
    assert ra == [m["train/reward_mean"] for m in RunStore(tmp_path / "two").metrics()]
