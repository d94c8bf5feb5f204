"""Safetensors model folders read tensor by tensor, and the weight comparison `esft replay` prints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from esft.replay import compare_weights
from esft.safetensors_folder import iter_tensors, safetensors_files, tensor_names


def weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"a.weight": torch.randn(3, 4), "b.bias": torch.randn(4), "c.weight": torch.randn(2, 2)}


def test_sharded_and_single_file_folders_read_the_same(tmp_path):
    w = weights()
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    single.mkdir()
    sharded.mkdir()
    save_file(w, str(single / "model.safetensors"))
    save_file({"a.weight": w["a.weight"]}, str(sharded / "model-00001-of-00002.safetensors"))
    save_file({k: w[k] for k in ("b.bias", "c.weight")}, str(sharded / "model-00002-of-00002.safetensors"))
    index = {"weight_map": {"a.weight": "model-00001-of-00002.safetensors"}}
    index["weight_map"].update({k: "model-00002-of-00002.safetensors" for k in ("b.bias", "c.weight")})
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    assert len(safetensors_files(sharded)) == 2
    for folder in (single, sharded):
        assert tensor_names(folder) == set(w)
        got = dict(iter_tensors(folder))
        assert all(torch.equal(got[k], w[k]) for k in w)
        assert [n for n, _ in iter_tensors(folder, ["c.weight"])] == ["c.weight"]
    with pytest.raises(KeyError, match="nope"):
        list(iter_tensors(single, ["nope"]))
    with pytest.raises(FileNotFoundError, match="no safetensors"):
        safetensors_files(tmp_path)


def test_compare_weights_against_a_checkpoint(tmp_path):
    w = weights()
    save_file(w, str(tmp_path / "model.safetensors"))
    assert compare_weights(w, tmp_path) == (True, 0.0)
    changed = dict(w)
    changed["b.bias"] = w["b.bias"].clone()
    changed["b.bias"][1] += 0.25
    same, diff = compare_weights(changed, tmp_path)
    assert not same and diff == pytest.approx(0.25)
    assert compare_weights({k: v for k, v in w.items() if k != "c.weight"}, tmp_path) == (False, float("inf"))
    assert compare_weights({**w, "a.weight": w["a.weight"].double()}, tmp_path) == (False, float("inf"))
