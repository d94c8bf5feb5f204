import torch
from safetensors.torch import load_file

from esft.bench import format_table, run_bench
from esft.cli import main
from esft.engines import HFEngine
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
