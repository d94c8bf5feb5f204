"""A Ray cluster of several nodes on one machine (``ray.cluster_utils.Cluster``: a head node with no
CPUs and two worker nodes of one CPU each, every node its own raylet and object store). What a
multi-machine cluster adds to the single local cluster of test_ray.py is checked here for real, short
of a second machine: ``esft train --ray-address`` with every worker on a node other than the driver's
(so each checkpoint is copied over from a worker's node, and nothing is shared through the driver's
node), and ``esft sweep --ray-address`` with its trials spread over the nodes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_ray import ITERATIONS, assert_same_run, needs_ray, single_run, train  # noqa: F401

from esft.cli import main


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Each worker node has one CPU, so each worker computes with one torch thread; the single-process
    run compared with them does too (a matmul's rounding can depend on the thread count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cluster(needs_ray):  # noqa: F811 - the fixture imported from test_ray
    from ray.cluster_utils import Cluster

    c = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "include_dashboard": False, "object_store_memory": 128 << 20},
    )
    try:
        for _ in range(2):
            c.add_node(num_cpus=1, object_store_memory=128 << 20)
        c.wait_for_nodes()
        yield c
    finally:
        c.shutdown()


@pytest.fixture(scope="module")
def single(tiny_model, tmp_path_factory) -> Path:
    return single_run(tiny_model, tmp_path_factory.mktemp("cluster") / "single", "independent")


def test_workers_on_other_nodes_give_the_single_process_run(
    cluster, tiny_model, single, tmp_path, capsys, monkeypatch
):
    import ray

    from esft.distributed import checkpoints

    copied = []
    real_copy = checkpoints._copy_checkpoint

    def copy(calls, slot, path):
        copied.append((slot.node, Path(path).name))
        return real_copy(calls, slot, path)

    monkeypatch.setattr(checkpoints, "_copy_checkpoint", copy)
    out = tmp_path / "cluster"
    extra = ("--noise", "independent", "--checkpoint-every", "2", "--eval-every", "4")
    assert train(tiny_model, out, "--ray-address", cluster.address, "--workers", "2", *extra) == 0
    assert not ray.is_initialized()
    # no worker on the driver's node (the head has no CPU): both checkpoints came over from a worker node
    assert len(copied) == 2 and "iter-000002" in copied[0][1] and f"iter-{ITERATIONS:06d}" in copied[1][1]
    assert_same_run(single, out)
    # every checkpoint came over from a worker's node: the same files as the single-process run's
    for it in (2, ITERATIONS):
        name = f"iter-{it:06d}"
        ours = {
            p.name: p.read_bytes()
            for p in (out / "checkpoints" / name).iterdir()
            if p.suffix == ".safetensors"
        }
        theirs = {
            p.name: p.read_bytes()
            for p in (single / "checkpoints" / name).iterdir()
            if p.suffix == ".safetensors"
        }
        assert ours and ours == theirs
    capsys.readouterr()
    assert main(["replay", "--run", str(out), "--iteration", str(ITERATIONS), "--quiet"]) == 0
    assert "bit-identical" in capsys.readouterr().out


def test_sweep_trials_on_the_worker_nodes(cluster, tiny_model, tmp_path):
    """Two trials at once as Ray tasks on the cluster (one CPU each: one per worker node, none on the
    head), with the journal storage that docs/sweeps.md prescribes for several nodes."""
    from test_sweep import sweep_data, trials, write

    data = {**sweep_data(tiny_model, base={"iterations": 1}, n_trials=2), "storage": "journal"}
    config = write(tmp_path / "cluster.yaml", data)
    out = tmp_path / "sweep"
    args = ["sweep", "--config", str(config), "--output", str(out), "--ray-address", cluster.address]
    assert main([*args, "--parallel", "2"]) == 0
    assert (out / "study.journal").is_file() and not (out / "study.db").exists()
    done = trials(out)
    assert [t.state.name for t in done] == ["COMPLETE", "COMPLETE"]
    for t in done:
        run = out / t.user_attrs["run_dir"]
        assert (run / "checkpoints" / "iter-000001").is_dir()
        assert json.loads((run / "environment.json").read_text())["cpu_threads"] == 1  # its node's one CPU
