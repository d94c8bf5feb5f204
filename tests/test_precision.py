"""Mixed precision: the ES step reaches bf16/fp16 weights (float32 masters, stochastic rounding), the
loss is measured right, and ``--dtype auto`` follows the hardware (es/precision.py, esft/dtypes.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import make_params

from esft.dtypes import choose, cpu_summary
from esft.es import ParamSet, iteration_members
from esft.es.precision import StepStats, random_bits, resolve, rounding_seed, stochastic_round

ULP_AT_ONE = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_is_unbiased_where_nearest_rounds_to_zero(dtype):
    step = 0.03 * ULP_AT_ONE[dtype]  # far below half an ulp
    x = torch.full((400_000,), 1.0 + step)
    assert torch.equal(x.to(dtype).float(), torch.ones_like(x))  # round to nearest: the step is gone
    for sign in (1, -1):
        r = stochastic_round(sign * x, dtype, seed=1 + sign).float()
        assert set(r.unique().tolist()) == {sign * 1.0, sign * (1.0 + ULP_AT_ONE[dtype])}
        # the moved share is Binomial(n, 0.03): 3 standard deviations of its mean
        moved = float((r != sign).float().mean())
        assert abs(moved - 0.03) < 3 * math.sqrt(0.03 * 0.97 / x.numel())
        assert abs(float(r.mean()) - sign * (1.0 + step)) < 3 * ULP_AT_ONE[dtype] * math.sqrt(
            0.03 / x.numel()
        )


def test_stochastic_rounding_keeps_representable_values_and_is_seeded():
    x = torch.randn(10_000).bfloat16().float()  # already bf16 values
    assert torch.equal(stochastic_round(x, torch.bfloat16, seed=0).float(), x)
    y = torch.randn(10_000)
    a = stochastic_round(y, torch.bfloat16, seed=5)
    assert torch.equal(a, stochastic_round(y, torch.bfloat16, seed=5))
    assert torch.equal(a, a.bfloat16().float())  # bf16 values, handed back as float32
    assert not torch.equal(a, stochastic_round(y, torch.bfloat16, seed=6))
    # a slice rounds as it does inside the whole: the bits follow the coordinate, not the cut
    assert torch.equal(stochastic_round(y[4000:], torch.bfloat16, seed=5, offset=4000), a[4000:])
    # the bits are uniform: each of 16 low bits is set about half the time, pairs are uncorrelated
    bits = random_bits(123, 0, 1 << 20)
    ones = torch.stack([(bits >> k) & 1 for k in range(16)]).float().mean(1)
    assert (ones - 0.5).abs().max() < 0.005
    low = (bits & 0xFFFF).float()
    assert abs(float(torch.corrcoef(torch.stack([low[:-1], low[1:]]))[0, 1])) < 0.01
    assert rounding_seed([(1, 1), (2, -1)]) == rounding_seed([(1, 1), (2, -1)])
    assert rounding_seed([(1, 1), (2, -1)]) != rounding_seed([(1, 1), (2, 1)])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_stochastic_update_moves_the_weights_by_the_step_on_average(dtype):
    """Weights at 1.0 and a step of about 3% of an ulp: round to nearest keeps none of it, stochastic
    rounding keeps all of it in expectation (the mean applied step is the mean intended step)."""
    members = iteration_members(0, 1, 8)
    weights = [1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 0.25, -0.25]
    alpha = 0.03 * ULP_AT_ONE[dtype] * 8 / math.sqrt(sum(w * w for w in weights))
    intended = ParamSet({"w": torch.ones(200_000)}, precision="auto")  # float32: the exact step
    intended.update(members, weights, alpha)
    step = intended.params["w"] - 1.0
    nearest = ParamSet({"w": torch.ones(200_000, dtype=dtype)}, precision="nearest")
    stats = nearest.update(members, weights, alpha)
    assert torch.equal(nearest.params["w"].float(), torch.ones(200_000))
    assert stats.lost_fraction == 1.0 and stats.update_norm == 0.0 and stats.changed_fraction == 0.0
    sr = ParamSet({"w": torch.ones(200_000, dtype=dtype)}, precision="stochastic")
    stats = sr.update(members, weights, alpha)
    applied = sr.params["w"].float() - 1.0
    # each coordinate: E[applied] = step, Var <= ulp * |step|; the mean of 200k is within 4 sigma
    sd = math.sqrt(float((step.abs() * ULP_AT_ONE[dtype]).sum())) / step.numel()
    assert abs(float(applied.mean() - step.mean())) < 4 * sd
    assert float((applied * step).sum()) > 0  # moves go the step's way
    assert 0.0 < stats.changed_fraction < 0.2


@pytest.mark.parametrize("noise", ["independent", "table", "lowrank"])
def test_master_weights_follow_the_float32_run_exactly(noise):
    base = make_params(torch.bfloat16)
    exact = ParamSet({k: v.float() for k, v in base.items()}, scheme=noise, rank=2)
    master = ParamSet({k: v.clone() for k, v in base.items()}, scheme=noise, rank=2, precision="master")
    assert exact.precision == "float32" and master.precision == "master"
    for t in range(1, 6):
        members = iteration_members(7, t, 6)
        weights = [0.3, -1.2, 0.9, 0.1, -0.4, 0.3]
        for ps in (exact, master):
            if noise != "lowrank":
                ps.perturb(members[0], 0.01)  # perturb + restore in between must not disturb the masters
                ps.restore()
            s = ps.update(members, weights, 1e-4)
        assert s.lost_fraction < 1e-3 and s.step_cosine > 0.9999
    for name in base:
        assert torch.equal(master.pristine[name], exact.params[name]), name
        assert torch.equal(master.params[name], exact.params[name].to(torch.bfloat16)), name


def test_step_stats_on_a_constructed_case():
    s = StepStats()
    s.add(torch.tensor([1.0, 0.0, 0.0, 2.0]), torch.tensor([1.0, 1.0, 0.0, 2.0]))
    assert s.lost == 1 and s.intended_nonzero == 3 and s.changed == 2
    assert s.dot == pytest.approx(5.0) and s.sq_applied == pytest.approx(5.0)
    assert s.sq_intended == pytest.approx(6.0)
    s.add(torch.tensor([-3.0, 0.0]), torch.tensor([3.0, 0.0]))  # a step the wrong way round
    assert s.dot == pytest.approx(5.0 - 9.0) and s.lost == 1 and s.changed == 3


def test_sums_left_on_the_device_settle_to_the_sums_read_one_by_one():
    """The fused update's chunk sums stay where they were computed until the update ends (one wait for
    a GPU, not one per chunk): the totals are the same floats as reading each chunk's at once."""
    gen = torch.Generator().manual_seed(4)
    chunks = [torch.rand(6, generator=gen, dtype=torch.float64) * 10**k for k in range(5)]
    for c in chunks:
        c[4:] = c[4:].round()
    eager, deferred = StepStats(), StepStats()
    for c in chunks:
        v = c.tolist()
        eager.add_sums(v[0], v[1], v[2], v[3], int(v[4]), int(v[5]))
        deferred.add_sums_tensor(c)
    assert deferred.sq_old == 0.0  # nothing read before settle
    deferred.settle()
    deferred.settle()  # a second settle adds nothing
    fields = ("sq_old", "sq_intended", "sq_applied", "dot", "intended_nonzero", "changed", "lost")
    assert [getattr(deferred, f) for f in fields] == [getattr(eager, f) for f in fields]


def test_the_update_works_in_larger_chunks_off_the_cpu():
    from esft.es.params import CHUNK, CHUNK_DEVICE, chunk_values

    assert chunk_values(torch.device("cpu")) == CHUNK == 1 << 20
    assert chunk_values(torch.device("cuda")) == CHUNK_DEVICE > CHUNK


def test_the_loss_is_measured_on_a_constructed_bf16_case():
    """Half the coordinates sit at 0 (bf16 keeps any small step there), half at 256 (ulp 2: every step
    of about 1e-3 is lost to round to nearest): about half the step is lost, cosine about 1/sqrt(2)."""
    w = torch.cat([torch.zeros(50_000), torch.full((50_000,), 256.0)]).bfloat16()
    ps = ParamSet({"w": w}, precision="nearest")
    stats = ps.update(iteration_members(0, 1, 4), [1.0, -1.0, 0.5, -0.5], 1e-3)
    assert abs(stats.lost_fraction - 0.5) < 1e-3
    assert abs(stats.step_cosine - 1 / math.sqrt(2)) < 0.01
    assert abs(stats.norm_ratio - 1 / math.sqrt(2)) < 0.01
    assert torch.equal(ps.params["w"][50_000:].float(), torch.full((50_000,), 256.0))


def test_auto_precision_rule_and_master_state_round_trip(tmp_path):
    assert resolve("auto", [torch.float32], lowrank=False)[0] == "float32"
    assert resolve("master", [torch.float32], lowrank=False)[0] == "float32"
    assert resolve("auto", [torch.bfloat16], lowrank=False)[0] == "master"
    assert resolve("auto", [torch.bfloat16], lowrank=True)[0] == "stochastic"
    assert resolve("nearest", [torch.float16], lowrank=True)[0] == "nearest"
    ps = ParamSet(make_params(torch.bfloat16), precision="master")
    ps.update(iteration_members(0, 1, 4), [1.0, -1.0, 0.5, -0.5], 1e-3)
    assert ps.save_state(tmp_path)
    other = ParamSet({k: v.clone() for k, v in ps.params.items()}, precision="master")
    assert other.load_state(tmp_path)
    assert all(torch.equal(other.pristine[k], ps.pristine[k]) for k in ps.params)
    stale = ParamSet(make_params(torch.bfloat16), precision="master")  # weights of another iteration
    with pytest.raises(ValueError, match="does not round"):
        stale.load_state(tmp_path)


def test_dtype_auto_follows_cpu_flags_and_cuda_capability(monkeypatch):
    for flags, want in [
        ("fpu avx2 avx512f", torch.float32),
        ("avx512f avx512_bf16", torch.bfloat16),
        ("amx_tile amx_bf16", torch.bfloat16),
        ("", torch.float32),
    ]:
        monkeypatch.setenv("ESFT_CPU_FLAGS", flags)
        dtype, reason = choose("auto", "cpu")
        assert dtype == want and reason.startswith("auto:"), (flags, reason)
    monkeypatch.setenv("ESFT_CPU_FLAGS", "avx512_bf16")
    assert choose("float32", "cpu") == (torch.float32, "--dtype float32")
    for capability, want in [((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16), ((7, 5), torch.float32)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        dtype, reason = choose("auto", "cuda")
        assert dtype == want and f"{capability[0]}.{capability[1]}" in reason


def test_cpu_summary_names_the_model_and_the_speed_flags(monkeypatch):
    monkeypatch.setenv("ESFT_CPU_FLAGS", "fpu avx2 amx_bf16 avx512f sse")
    assert cpu_summary().endswith(" [avx512f amx_bf16]")
    monkeypatch.setenv("ESFT_CPU_FLAGS", "fpu avx2")
    assert cpu_summary().endswith(" [none of avx512f avx512_bf16 avx512_fp16 amx_bf16 amx_tile]")


# -- whole runs -------------------------------------------------------------------------------------


def _train(model, out, iterations, *extra):
    from test_e2e import train

    return train(model, out, iterations, "--dtype", "bfloat16", "--checkpoint-every", "1", *extra)


@pytest.mark.parametrize(
    ("noise", "precision"),
    [("independent", "master"), ("lowrank", "stochastic"), ("lowrank", "master"), ("table", "nearest")],
)
def test_bf16_run_resumes_and_replays_bit_identically(tiny_model, tmp_path, capsys, noise, precision):
    from safetensors.torch import load_file

    from esft.cli import main

    extra = ("--noise", noise, "--update-precision", precision, "--rank", "2")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert _train(tiny_model, straight, 3, *extra) == 0
    assert _train(tiny_model, resumed, 1, *extra) == 0
    if precision == "master":  # the masters of checkpoint 1 are what the resumed run continues from
        assert (resumed / "checkpoints" / "iter-000001" / "es-state" / "master.safetensors").is_file()
    assert _train(tiny_model, resumed, 3, *extra, "--resume") == 0
    a = load_file(str(straight / "checkpoints" / "iter-000003" / "model.safetensors"))
    b = load_file(str(resumed / "checkpoints" / "iter-000003" / "model.safetensors"))
    base = load_file(str(tiny_model / "model.safetensors"))
    assert all(v.dtype == torch.bfloat16 for v in a.values())
    assert any(not torch.equal(base[k].bfloat16(), a[k]) for k in a), "training changed nothing"
    assert all(torch.equal(a[k], b[k]) for k in a)
    env = json.loads((straight / "environment.json").read_text())
    assert env["dtype"] == "bfloat16" and env["update_precision"] == precision
    metrics = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    for m in metrics:
        assert 0.0 <= m["es/step_lost_fraction"] <= 1.0 and -1.0 <= m["es/step_cosine"] <= 1.0
        assert m["es/intended_norm"] > 0 and m["es/step_norm_ratio"] > 0
        if precision == "master":
            assert m["es/step_cosine"] > 0.9999 and m["es/step_lost_fraction"] < 1e-3
    capsys.readouterr()
    assert main(["replay", "--run", str(straight), "--iteration", "3", "--quiet"]) == 0
    assert "bit-identical" in capsys.readouterr().out


def test_master_resume_without_saved_masters_replays_from_the_base(tiny_model, tmp_path):
    """A checkpoint without masters (removed here) cannot continue a master run: resume starts from the
    base model and replays the whole seed log, with the same bits."""
    import shutil

    from safetensors.torch import load_file

    extra = ("--update-precision", "master")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert _train(tiny_model, straight, 2, *extra) == 0
    assert _train(tiny_model, resumed, 1, *extra) == 0
    shutil.rmtree(resumed / "checkpoints" / "iter-000001" / "es-state")
    assert _train(tiny_model, resumed, 2, *extra, "--resume") == 0
    a = load_file(str(straight / "checkpoints" / "iter-000002" / "model.safetensors"))
    b = load_file(str(resumed / "checkpoints" / "iter-000002" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def small_alpha_runs(tiny_model, tmp_path_factory):
    """The same bf16 run and seeds with a small alpha, once per precision (2 iterations)."""
    root = tmp_path_factory.mktemp("precision")
    runs = {}
    for precision in ("nearest", "stochastic", "master"):
        out = runs[precision] = root / precision
        assert _train(tiny_model, out, 2, "--alpha", "1e-4", "--update-precision", precision) == 0
    return runs


def test_bf16_nearest_loses_steps_the_remedies_keep(small_alpha_runs):
    logged = {
        p: json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
        for p, run in small_alpha_runs.items()
    }
    assert logged["nearest"]["es/step_lost_fraction"] > 0.2
    assert logged["nearest"]["es/step_cosine"] < 0.99
    assert logged["master"]["es/step_lost_fraction"] < 1e-3
    # stochastic rounding moves fewer coordinates, but by whole ulps: the norm is kept on average
    assert 0.5 < logged["stochastic"]["es/step_norm_ratio"] < 2.0


def test_analysis_uses_the_base_in_the_run_dtype_and_reports_each_checkpoints_loss(
    tiny_model, small_alpha_runs, tmp_path
):
    from safetensors.torch import load_file, save_file

    from esft.analysis.randomwalk import growth
    from esft.analysis.weights import update_norm
    from esft.runstore import RunStore

    # a bf16 copy of the float32 base is no update at all
    cast = tmp_path / "cast"
    cast.mkdir()
    tensors = {k: v.bfloat16() for k, v in load_file(str(tiny_model / "model.safetensors")).items()}
    save_file(tensors, str(cast / "model.safetensors"), metadata={"format": "pt"})
    assert update_norm(tiny_model, cast)[0] == 0.0
    lost = {}
    for precision, run in small_alpha_runs.items():
        points = growth(RunStore(run), tiny_model).points
        assert [p.iteration for p in points] == [1, 2]
        lost[precision] = points[-1].step_lost_fraction
        print(precision, points[-1])
    # a bf16 checkpoint cannot hold what is below half an ulp of the whole update (masters keep it for
    # the next iterations); round to nearest at every step loses far more than that one rounding
    assert lost["master"] < lost["nearest"] and lost["stochastic"] < lost["nearest"]


def test_analysis_loads_models_in_the_dtype_the_run_recorded(tiny_model, tmp_path):
    """A run whose --dtype auto chose bf16 is analysed in bf16 on any machine (here: auto is float32)."""
    import argparse

    from esft.analysis import cli as analysis_cli
    from esft.runstore import RunStore

    store = RunStore(tmp_path / "run")
    store.write_config({"dtype": "auto", "device": "cpu", "model_path": str(tiny_model)})
    (store.root / "environment.json").write_text(json.dumps({"dtype": "bfloat16", "device": "cpu"}))
    args = argparse.Namespace(dtype=None, device=None, batch_size=4)
    config = store.read_config()
    assert analysis_cli._engine(str(tiny_model), args, config, store).dtype == torch.bfloat16
    assert analysis_cli._engine(str(tiny_model), args, config).dtype == torch.float32  # no run: auto here
    args.dtype = "float32"
    assert analysis_cli._engine(str(tiny_model), args, config, store).dtype == torch.float32
