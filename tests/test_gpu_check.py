"""benchmarks/gpu_check.py on the CPU: its smoke mode runs every check of tests/test_cuda.py (on the CPU)
and the bench end to end, so the script is known to work before it meets a GPU."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import test_cuda
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_mode_on_cpu_passes_every_check_and_benches_every_mode(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--small", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((out / "gpu_check.json").read_text())
    status = {c["name"]: c["status"] for c in report["checks"]}
    assert {name: status.get(name) for name in test_cuda.CHECKS} == dict.fromkeys(test_cuda.CHECKS, "PASS")
    assert status["bench: identical token work in every row"] == "PASS"
    assert (out / "cuda_tests.xml").is_file()  # the checks ran through pytest
    rows = report["bench"]["rows"]
    assert [r["mode"] for r in rows] == [
        "floor (batched)",
        "ES, lowrank r=1 (batched)",
        "ES, table noise",
        "ES, independent noise",
        "reference (paper code)",
    ]
    assert all(r["tokens"] == 4 * 2 * 4 and r["x_floor"] > 0 for r in rows)  # N=4, 2 prompts, 4 tokens
    assert "x floor" in proc.stdout and f"{len(test_cuda.CHECKS) + 1} passed, 0 failed" in proc.stdout


def test_checks_run_in_process_without_pytest_and_failures_are_reported(tmp_path, monkeypatch):
    gpu_check = load_script()

    def broken(device, tmp):
        raise AssertionError("planted")

    monkeypatch.setitem(test_cuda.CHECKS, "planted-failure", broken)
    only = ["noise_deterministic-correlated", "restore_bit_exact-bfloat16", "planted-failure"]
    results = gpu_check.run_checks("cpu", tmp_path, use_pytest=False, only=only)
    assert [(r["name"], r["status"]) for r in results] == [
        ("noise_deterministic-correlated", "PASS"),
        ("restore_bit_exact-bfloat16", "PASS"),
        ("planted-failure", "FAIL"),
    ]
    assert "planted" in results[-1]["message"]


def test_missing_packages_and_missing_cuda_exit_2(tmp_path, monkeypatch, capsys):
    gpu_check = load_script()
    real = gpu_check._importable
    monkeypatch.setattr(gpu_check, "_importable", lambda m: m != "yaml" and real(m))
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    assert "yaml (pip install pyyaml)" in capsys.readouterr().err
    monkeypatch.setattr(gpu_check, "_importable", real)
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_resume_checks_run_without_tensorboard(tmp_path, monkeypatch):
    """A bare GPU image may lack tensorboard: the resume checks train with no tracker, so they pass
    (not skip) when it cannot be imported."""
    gpu_check = load_script()
    for module in ("tensorboard", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, module, None)  # any import of it raises ImportError
    with pytest.raises(ImportError):
        import torch.utils.tensorboard  # noqa: F401
    only = ["resume_bit_identical-independent-master", "resume_bit_identical-lowrank-stochastic"]
    results = gpu_check.run_checks("cpu", tmp_path, use_pytest=False, only=only)
    assert [(r["name"], r["status"]) for r in results] == [(name, "PASS") for name in only]


def test_a_transformers_older_than_the_declared_minimum_exits_2(tmp_path, monkeypatch, capsys):
    gpu_check = load_script()
    assert gpu_check.too_old() == []  # this environment satisfies pyproject.toml
    real = gpu_check._installed
    monkeypatch.setattr(gpu_check, "_installed", lambda n: "4.51.3" if n == "transformers" else real(n))
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "transformers 4.51.3 (esft needs transformers>=4.56.2" in err
    assert gpu_check._release("2.13.0+cpu") == (2, 13, 0) and gpu_check._release("4.56.2.dev0") == (4, 56, 2)
