import pytest
import torch
from safetensors.torch import load_file

from esft.bench import format_table, run_bench
from esft.cli import main
from esft.engines import HFEngine
from esft.errors import ConfigError
from esft.tasks import load_task


def test_bench_measures_floor_and_each_scheme_without_changing_weights(tiny_model):
    engine = HFEngine(tiny_model)
    before = {k: v.clone() for k, v in engine.parameters().items()}
    modes = ["reference", "independent", "table", "lowrank"]
    rows = run_bench(engine, load_task("conciseness"), 3, 2, 4, modes, rank=2)
    assert [r.mode for r in rows] == [
        "floor (batched)",
        "reference (paper code)",
        "ES, independent noise",
        "ES, table noise",
        "ES, lowrank r=2 (batched)",
    ]
    floor = rows[0]
    assert floor.noise == 0 and floor.update == 0 and floor.tokens > 0
    for r in rows[1:]:
        assert r.generate > 0 and r.noise > 0 and r.update > 0 and r.tokens > 0
        assert r.seconds >= r.generate + r.noise
    assert all(torch.equal(before[k], v) for k, v in engine.parameters().items())
    table = format_table(rows, {"N": 3})
    assert "x floor" in table and table.count("\n") == 6


def test_bench_cli(tiny_model, capsys):
    assert (
        main(
            [
                "bench",
                "--model",
                str(tiny_model),
                "--population",
                "2",
                "--max-new-tokens",
                "3",
                "--modes",
                "table",
                "lowrank",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "floor (batched)" in out and "ES, table noise" in out and "lowrank r=1" in out
    assert load_file(str(tiny_model / "model.safetensors"))  # the model folder is untouched


def test_fixed_length_gives_every_mode_identical_token_work(tiny_model):
    engine = HFEngine(tiny_model)
    rows = run_bench(engine, load_task("conciseness"), 3, 2, 5, ["table", "lowrank"], fixed_length=True)
    assert [r.tokens for r in rows] == [3 * 2 * 5] * 3


def test_repeats_interleave_rounds_and_take_medians(tiny_model, monkeypatch):
    """Each round measures the floor and then every mode; a row is the median of its rounds and its ratio
    the median of the per-round ratios (here with a clock that makes every round's floor 1 s longer)."""
    import esft.bench as bench

    calls = []
    real_floor, real_iteration = bench._floor, bench._iteration

    def floor(*args):
        row = real_floor(*args)
        calls.append("floor")
        row.seconds = float(len([c for c in calls if c == "floor"]))  # 1, 2, 3 s
        return row

    def iteration(*args):
        row = real_iteration(*args)
        calls.append(row.mode)
        row.seconds = 1.5 * len([c for c in calls if c == "floor"])  # 1.5x its round's floor
        return row

    monkeypatch.setattr(bench, "_floor", floor)
    monkeypatch.setattr(bench, "_iteration", iteration)
    rows = run_bench(HFEngine(tiny_model), load_task("conciseness"), 2, 1, 2, ["lowrank"], repeats=3)
    assert calls == ["floor", "ES, lowrank r=1 (batched)"] * 3
    assert rows[0].seconds == 2.0 and rows[1].seconds == 3.0
    assert rows[1].ratios == [1.5, 1.5, 1.5] and rows[1].ratio(rows[0].seconds) == 1.5
    table = format_table(rows, {"N": 2})
    assert "range" in table and "1.50-1.50" in table and "medians of 3 rounds" in table
    with pytest.raises(ConfigError, match="--repeats must be >= 1"):
        run_bench(HFEngine(tiny_model), load_task("conciseness"), 2, 1, 2, ["lowrank"], repeats=0)
