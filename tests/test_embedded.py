"""Slower tests on the embedded default model (Qwen2.5-Coder-0.5B-Instruct from PyPI)."""

from __future__ import annotations

import json

import pytest

import esft.models as models
from esft.cli import main
from esft.errors import ModelError

pytestmark = pytest.mark.slow


def test_embedded_model_trains_two_iterations(tmp_path):
    out = tmp_path / "run"
    rc = main(["train", "--task", "conciseness", "--population", "2", "--iterations", "2",
               "--max-new-tokens", "8", "--freeze", "*embed_tokens*", "--freeze", "lm_head*",
               "--checkpoint-every", "0", "--output", str(out), "--quiet"])  # fmt: skip
    assert rc == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2
    assert metrics[-1]["es/update_norm"] > 0 or metrics[-1]["train/reward_std"] == 0
    assert (out / "checkpoints" / "iter-000002" / "model.safetensors").is_file()
    assert "model_path" in (out / "config.yaml").read_text()


def test_corrupt_embedded_model_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "EMBEDDED_SHA256", "0" * 64)
    monkeypatch.setenv("ESFT_CACHE", str(tmp_path))
    with pytest.raises(ModelError, match="corrupt"):
        models.embedded_model_path(progress=False)
    assert not list((tmp_path / "models").glob(models.EMBEDDED_NAME))


def test_missing_embedded_model_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "EMBEDDED_PARTS", ["esft_no_such_part_pkg"])
    monkeypatch.setenv("ESFT_CACHE", str(tmp_path))
    with pytest.raises(ModelError, match=r"pip install 'esft\[model\]'"):
        models.embedded_model_path(progress=False)
