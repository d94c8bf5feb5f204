"""Checks that need a CUDA GPU (marker ``cuda``; they skip without one): seeded noise is deterministic
on the device for every scheme, perturb/restore is bit-exact in every dtype, the update is summed in
float32 and cast once, the low-rank population hooks equal materialised perturbations, --fixed-length's
EOS hold gives transformers' tokens, and a tiny ES run resumes and replays bit for bit.

Each check is a plain function of (device, temporary folder) in ``CHECKS``, so
``benchmarks/gpu_check.py`` runs them with pytest (``pytest -m cuda tests/test_cuda.py``) or, where pytest
is missing, directly. ``ESFT_CHECK_DEVICE=cpu`` runs them on the CPU (the script's smoke test).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from pathlib import Path

import torch
from helpers import build_tiny_model, make_params

from esft.es import Member, NoiseScheme, ParamSet, noise_for
from esft.es import noise as noise_module
from esft.es.lowrank import factors, lowrank_trainable, vector_noise

try:
    import pytest
except ImportError:  # benchmarks/gpu_check.py runs CHECKS without pytest
    pytest = None

DEVICE = os.environ.get("ESFT_CHECK_DEVICE", "cuda")
SCHEMES = [s.value for s in NoiseScheme]  # independent, correlated, table, lowrank
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _on(t: torch.Tensor, device: str) -> bool:
    return t.device.type == torch.device(device).type


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


# -- noise ----------------------------------------------------------------------------------------


def check_noise_deterministic(scheme: str, device: str, tmp: Path) -> None:
    """Same (seed, name) -> the same float32 noise on the device, twice and from two fresh ParamSets;
    another seed (and, except for correlated, another name) -> unrelated noise."""
    if scheme == "lowrank":
        a, b = factors((512, 384), 7, "x.weight", 4, device)
        a2, b2 = factors((512, 384), 7, "x.weight", 4, device)
        assert _on(a, device) and a.dtype == torch.float32
        assert torch.equal(a, a2) and torch.equal(b, b2)
        assert not torch.equal(a, factors((512, 384), 7, "y.weight", 4, device)[0])
        assert not torch.equal(a, factors((512, 384), 8, "x.weight", 4, device)[0])
        eps = a @ b.T
        assert abs(float(eps.mean())) < 0.02 and 0.9 < float(eps.var()) < 1.1
        assert torch.equal(vector_noise(1000, 7, "x.bias", device), vector_noise(1000, 7, "x.bias", device))
    else:
        shape = (300, 5000)  # 1.5M values: table noise spans two table chunks
        a = noise_for(shape, 3, "x.weight", device, scheme)
        assert _on(a, device) and a.dtype == torch.float32
        assert torch.equal(a, noise_for(shape, 3, "x.weight", device, scheme))
        assert abs(float(a.mean())) < 0.01 and abs(float(a.std()) - 1.0) < 0.01
        other_seed = noise_for(shape, 4, "x.weight", device, scheme)
        assert not torch.equal(a, other_seed) and abs(_corr(a, other_seed)) < 0.01
        other_name = noise_for(shape, 3, "y.weight", device, scheme)
        if scheme == "correlated":  # the reference code's scheme: the bare seed for every tensor
            assert torch.equal(a, other_name)
        else:
            assert abs(_corr(a, other_name)) < 0.01
        if scheme == "table":  # the table itself is drawn deterministically: drop it, draw it again
            for key in [k for k in noise_module._tables if k[0].startswith(torch.device(device).type)]:
                del noise_module._tables[key]
            assert torch.equal(a, noise_for(shape, 3, "x.weight", device, scheme))
    perturbed = []
    for _ in range(2):  # two fresh ParamSets over the same weights perturb identically
        params = make_params(torch.float32, device)
        ps = ParamSet(params, scheme=scheme, rank=2)
        ps.perturb(Member(5, -1), 1e-2)
        perturbed.append({k: v.clone() for k, v in params.items()})
    assert all(torch.equal(perturbed[0][k], perturbed[1][k]) for k in perturbed[0])


# -- perturb, restore, update ---------------------------------------------------------------------


def check_restore_bit_exact(dtype: str, device: str, tmp: Path) -> None:
    """Every scheme: perturb then restore gives back the exact bits, also after an update."""
    for scheme in SCHEMES:
        params = make_params(DTYPES[dtype], device)
        original = {k: v.clone() for k, v in params.items()}
        ps = ParamSet(params, scheme=scheme, rank=2)
        for seed in (1, 2, 3):
            ps.perturb(Member(seed, 1 if seed % 2 else -1), sigma=1e-3)
            assert any(not torch.equal(params[k], original[k]) for k in params), scheme
            ps.restore()
            for k in params:
                assert torch.equal(params[k], original[k]), f"{scheme} {k}"
        ps.update([Member(1), Member(2)], [1.0, -1.0], 1e-2)
        after = {k: v.clone() for k, v in params.items()}
        assert any(not torch.equal(after[k], original[k]) for k in params), scheme
        ps.perturb(Member(3), 1e-3)
        ps.restore()
        for k in params:
            assert torch.equal(params[k], after[k]), f"{scheme} {k} after an update"


def check_update_fp32_cast_once(device: str, tmp: Path) -> None:
    """tests/test_params.py's bf16 case on the device: each member's step is below half a bf16 ulp at
    1.0, only their sum is not; summing in fp32 and casting once matches float64, 30 bf16 adds do not."""
    import numpy as np

    n, alpha = 30, 0.1
    params = {"w": torch.ones(8192, dtype=torch.bfloat16, device=device)}
    members = [Member(s) for s in range(n)]
    z = np.random.default_rng(0).standard_normal(n).tolist()
    ParamSet(params).update(members, z, alpha=alpha)
    exact = torch.ones(8192, dtype=torch.float64, device=device)
    naive = torch.ones(8192, dtype=torch.bfloat16, device=device)
    for m, w in zip(members, z, strict=True):
        step = alpha / n * w * noise_for((8192,), m.seed, "w", device).double()
        exact += step
        naive += step.to(torch.bfloat16)
    exact = exact.to(torch.bfloat16)
    assert float((params["w"] == exact).float().mean()) > 0.99
    assert float((naive == exact).float().mean()) < 0.8


def check_update_matches_float64(scheme: str, device: str, tmp: Path) -> None:
    """The float32 update equals the float64 sum of each member's noise drawn on the device."""
    params = make_params(torch.float32, device)
    before = {k: v.double().clone() for k, v in params.items()}
    members = [Member(11), Member(12, -1), Member(13), Member(11, -1)]
    z, alpha = [1.2, -0.3, 0.5, -1.4], 5e-2
    ParamSet(params, scheme=scheme, rank=2).update(members, z, alpha)
    for name, t in params.items():
        acc = torch.zeros_like(before[name])
        for m, w in zip(members, z, strict=True):
            if scheme != "lowrank":
                eps = noise_for(t.shape, m.seed, name, device, scheme)
            elif t.ndim == 2:
                a, b = factors(t.shape, m.seed, name, 2, device)
                eps = a @ b.T
            else:
                eps = vector_noise(t.numel(), m.seed, name, device)
            acc += w * m.sign * eps.double()
        expected = before[name] + alpha / len(members) * acc
        torch.testing.assert_close(t.double(), expected, atol=1e-6, rtol=1e-6)


def check_stochastic_rounding_unbiased(dtype: str, device: str, tmp: Path) -> None:
    """bf16/fp16 remedy 2 on the device: a step of 3% of an ulp at 1.0 vanishes with round to nearest;
    stochastic rounding keeps it on average, with seeded (repeatable) bits."""
    from esft.es.precision import stochastic_round

    target = DTYPES[dtype]
    ulp = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[target]
    x = torch.full((1_000_000,), 1.0 + 0.03 * ulp, device=device)
    assert torch.equal(x.to(target).float(), torch.ones_like(x))
    r = stochastic_round(x, target, seed=3).to(target)
    assert _on(r, device) and r.dtype == target
    moved = float((r.float() != 1.0).float().mean())
    assert abs(moved - 0.03) < 5 * (0.03 * 0.97 / x.numel()) ** 0.5, moved
    assert torch.equal(r, stochastic_round(x, target, seed=3).to(target))
    # integer hash bits: the device rounds exactly as the CPU does
    assert torch.equal(r.cpu(), stochastic_round(x.cpu(), target, seed=3).to(target))


def check_master_follows_float32(scheme: str, device: str, tmp: Path) -> None:
    """bf16/fp16 remedy 1 on the device: float32 masters of bf16 weights hold exactly the float32 run's
    values after several updates (with perturb/restore between them), the weights their rounding."""
    base = make_params(torch.bfloat16, device)
    exact = ParamSet({k: v.float() for k, v in base.items()}, scheme=scheme, rank=2)
    master = ParamSet({k: v.clone() for k, v in base.items()}, scheme=scheme, rank=2, precision="master")
    for t in range(1, 4):
        members = [Member(100 * t + i, 1 if i % 2 else -1) for i in range(4)]
        for ps in (exact, master):
            if scheme != "lowrank":
                ps.perturb(members[0], 1e-2)
                ps.restore()
            stats = ps.update(members, [0.5, -1.0, 1.5, -0.25], 1e-4)
        assert stats.step_cosine > 0.9999 and stats.lost_fraction < 1e-3
    for k in base:
        assert torch.equal(master.pristine[k], exact.params[k]), k
        assert torch.equal(master.params[k], exact.params[k].to(torch.bfloat16)), k


def check_fused_update(precision: str, device: str, tmp: Path) -> None:
    """The compiled update (es/fused.py: Triton on CUDA, C++ on the CPU) builds on the device and writes
    the eager update's bits, for both noise schemes, over three updates."""
    from esft.es import fused

    dtype = torch.float32 if precision == "float32" else torch.bfloat16
    results = {}
    previous = os.environ.get(fused.ENV)
    try:
        for setting in ("off", "on"):
            os.environ[fused.ENV] = setting
            for scheme in ("lowrank", "independent"):
                base = make_params(dtype, device)
                ps = ParamSet(
                    base, scheme=scheme, rank=2, precision="auto" if precision == "float32" else precision
                )
                for t in range(1, 4):
                    ps.update(
                        [Member(100 * t + i, 1 if i % 2 else -1) for i in range(4)],
                        [0.5, -1.0, 1.5, -0.25],
                        1e-3,
                    )
                results[setting, scheme] = (base, ps.pristine)
    finally:
        if previous is None:
            os.environ.pop(fused.ENV)
        else:
            os.environ[fused.ENV] = previous
    built = [
        k for k, v in fused.FUSED._kernels.items() if k[2] == torch.device(device).type and v is not None
    ]
    assert built, f"no fused kernel built on {device}: {fused.FUSED._kernels}"
    for scheme in ("lowrank", "independent"):
        (eager, eager_state), (fast, fast_state) = results["off", scheme], results["on", scheme]
        for k in eager:
            assert torch.equal(eager[k], fast[k]) and torch.equal(eager_state[k], fast_state[k]), (scheme, k)


# -- low-rank population batching -----------------------------------------------------------------


def _logits(engine, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    enc = engine.tokenizer(texts, return_tensors="pt", padding=True).to(engine.device)
    with torch.no_grad():
        return engine.model(**enc).logits.float(), enc["attention_mask"].bool()


def check_lowrank_forward(dtype: str, tie: bool, device: str, tmp: Path) -> None:
    """The hooked batched forward equals each member's materialised perturbation (tests/test_lowrank.py
    on the device). float32: to 1e-4. bfloat16: both are compared with the exact (float32) perturbed
    model: the hooks must be within 10% of the perturbation's effect and about as accurate (RMS error
    under 5x) as the materialised bf16 weights, which round the perturbed weights once."""
    from esft.engines.hf import HFEngine
    from esft.engines.population import PopulationHooks

    engine = HFEngine(build_tiny_model(tmp / "m", tie=tie), dtype=dtype, device=device)
    params = ParamSet(lowrank_trainable(engine.parameters()), scheme="lowrank", rank=2)
    assert all(_on(t, device) for t in params.params.values())
    prompts = ["Solve: 3 + 5", "The answer is <answer> (1 + 2)"]  # different lengths: left padding
    members = [Member(11), Member(12, -1), Member(13)]
    sigma = 0.05  # large, so a missed layer would show
    base, real = _logits(engine, prompts)
    with PopulationHooks(engine.model, params) as hooks:
        hooks.prepare(members, sigma, engine.dtype)
        batched, _ = _logits(engine, prompts * len(members))
    exact = None
    if dtype != "float32":  # the exact perturbed model: float32 weights equal to the rounded ones
        exact = HFEngine(tmp / "m", dtype="float32", device=device)
        with torch.no_grad():
            for name, t in exact.parameters().items():
                t.copy_(engine.parameters()[name].float())
        exact_params = ParamSet(lowrank_trainable(exact.parameters()), scheme="lowrank", rank=2)
    for i, m in enumerate(members):
        params.perturb(m, sigma)
        single, _ = _logits(engine, prompts)
        params.restore()
        got = batched[i * 2 : i * 2 + 2]
        effect = float((single - base)[real].abs().max())
        assert effect > 1e-3, f"the perturbation does not change the logits ({effect})"
        if exact is None:
            torch.testing.assert_close(got[real], single[real], atol=1e-4, rtol=1e-4)
        else:
            exact_params.perturb(m, sigma)
            truth, _ = _logits(exact, prompts)
            exact_params.restore()
            hooked, weights = (got - truth)[real], (single - truth)[real]
            rms = float(hooked.pow(2).mean().sqrt()), float(weights.pow(2).mean().sqrt())
            # on CPU, bf16: max error 1-2.5% of the effect, RMS 1.3-2.3x the materialised weights'
            assert float(hooked.abs().max()) < 0.1 * effect, (float(hooked.abs().max()), effect)
            assert rms[0] < 5 * rms[1], f"hooked RMS error {rms[0]:.3g}, materialised {rms[1]:.3g}"
    after, _ = _logits(engine, prompts)
    assert torch.equal(after, base)  # hooks removed, weights untouched


def check_lowrank_generate(device: str, tmp: Path) -> None:
    """generate_population == member-by-member generate with materialised noise (float32), in batches of
    two members and one member at a time."""
    from esft.engines.hf import HFEngine

    engine = HFEngine(build_tiny_model(tmp / "m"), dtype="float32", device=device, batch_size=4)
    params = ParamSet(lowrank_trainable(engine.parameters()), scheme="lowrank", rank=1)
    prompts = ["Solve: 3 + 5", "The answer"]
    members = [Member(s, sign) for s in (1, 2, 3) for sign in (1, -1)]
    groups = engine.generate_population(prompts, members, params, 0.05, 8)
    texts = set()
    for m, gens in zip(members, groups, strict=True):
        params.perturb(m, 0.05)
        ref = engine.generate(prompts, 8)
        params.restore()
        assert [g.text for g in gens] == [g.text for g in ref], m
        texts.add(tuple(g.text for g in gens))
    assert len(texts) > 1  # members really generate differently
    engine.batch_size = 1
    small = engine.generate_population(prompts, members[:2], params, 0.05, 8)
    assert [[g.text for g in gens] for gens in small] == [[g.text for g in gens] for gens in groups[:2]]


def check_fixed_length_hold(device: str, tmp: Path) -> None:
    """--fixed-length on the device: the engine's in-place EOS ban (engines/hf.py, HoldEOS) gives the
    tokens of transformers' min_new_tokens, greedy, with the 6th freely generated token as EOS."""
    from transformers import GenerationConfig

    from esft.engines.hf import HFEngine

    engine = HFEngine(build_tiny_model(tmp / "m"), dtype="float32", device=device)
    texts = ["Solve: 3 + 5", "The answer is <answer> (1 + 2)"]
    likes = engine._generate_texts(texts, 8, True)[0].token_ids[5]
    engine.eos_ids, engine.min_new_tokens = {likes}, 6
    ours = [g.token_ids for g in engine._generate_texts(texts, 8, True)]
    enc = {
        k: v.to(device)
        for k, v in engine.tokenizer(
            texts, return_tensors="pt", padding=True, return_token_type_ids=False
        ).items()
    }
    cfg = GenerationConfig(do_sample=False, max_new_tokens=8, min_new_tokens=6, eos_token_id=likes,
                           pad_token_id=engine.pad_id, temperature=None, top_p=None, top_k=None)  # fmt: skip
    ref = engine.model.generate(**enc, generation_config=cfg)[:, enc["input_ids"].shape[1] :].tolist()
    ref = [tuple(row[: row.index(likes) + 1] if likes in row else row) for row in ref]
    assert ours == ref, (ours, ref)
    assert all(likes not in row[:6] for row in ours)


# -- a whole run ----------------------------------------------------------------------------------


def check_resume_bit_identical(noise: str, precision: str, device: str, tmp: Path) -> None:
    """A tiny bf16 ES run on the device with update ``precision``: 3 iterations straight == 1 iteration,
    then resumed to 3; and replay from the seed log reproduces the final checkpoint bit for bit. No
    tracker (``report_to=none``): the run needs no tensorboard, which a bare GPU image may lack."""
    from safetensors.torch import load_file

    from esft.config import ESConfig
    from esft.replay import compare_weights, replay
    from esft.runstore import RunStore
    from esft.trainer import ESTrainer

    model = build_tiny_model(tmp / "model")
    config = ESConfig(
        model=str(model),
        task="conciseness",
        population=4,
        sigma=0.05,
        alpha=0.05,
        max_new_tokens=12,
        seed=3,
        noise=noise,
        rank=2,
        device=device,
        dtype="bfloat16",
        update_precision=precision,
        report_to=["none"],
        checkpoint_every=1,
        iterations=3,
        output=str(tmp / "straight"),
    )

    def run(iterations: int, output: str, resume: bool = False) -> Path:
        cfg = dataclasses.replace(config, iterations=iterations, output=output)
        ESTrainer(cfg, resume=resume, progress=False).train()
        return RunStore(output).checkpoints()[iterations]

    straight = run(3, str(tmp / "straight"))
    run(1, str(tmp / "resumed"))
    resumed = run(3, str(tmp / "resumed"), resume=True)
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    base = load_file(str(model / "model.safetensors"))
    assert any(not torch.equal(base[k].bfloat16(), a[k]) for k in a), "training changed nothing"
    assert set(a) == set(b)
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"resumed run differs from the straight run in {differ[0]} (+{len(differ) - 1})"
    engine, _ = replay(tmp / "straight", 3, progress=False)
    assert all(_on(t, device) for t in engine.parameters().values())
    same, diff = compare_weights(engine.parameters(), straight)
    assert same, f"replay differs from the checkpoint (max abs difference {diff:g})"


Check = Callable[[str, Path], None]
CHECKS: dict[str, Check] = {
    **{f"noise_deterministic-{s}": functools.partial(check_noise_deterministic, s) for s in SCHEMES},
    **{f"restore_bit_exact-{d}": functools.partial(check_restore_bit_exact, d) for d in DTYPES},
    "update_fp32_cast_once-bfloat16": check_update_fp32_cast_once,
    **{
        f"update_matches_float64-{s}": functools.partial(check_update_matches_float64, s)
        for s in ("independent", "table", "lowrank")
    },
    "lowrank_forward-float32": functools.partial(check_lowrank_forward, "float32", False),
    "lowrank_forward-float32-tied": functools.partial(check_lowrank_forward, "float32", True),
    "lowrank_forward-bfloat16": functools.partial(check_lowrank_forward, "bfloat16", False),
    "lowrank_generate-float32": check_lowrank_generate,
    "fixed_length_hold": check_fixed_length_hold,
    **{
        f"stochastic_rounding_unbiased-{d}": functools.partial(check_stochastic_rounding_unbiased, d)
        for d in ("bfloat16", "float16")
    },
    **{
        f"master_follows_float32-{s}": functools.partial(check_master_follows_float32, s)
        for s in ("independent", "lowrank")
    },
    **{
        f"fused_update-{p}": functools.partial(check_fused_update, p)
        for p in ("stochastic", "nearest", "master", "float32")
    },
    **{
        f"resume_bit_identical-{n}-{p}": functools.partial(check_resume_bit_identical, n, p)
        for n in ("independent", "lowrank")
        for p in ("master", "stochastic")
    },
}


if pytest is not None:
    pytestmark = [
        pytest.mark.cuda,
        pytest.mark.skipif(
            DEVICE.startswith("cuda") and not torch.cuda.is_available(),
            reason="needs a CUDA GPU (ESFT_CHECK_DEVICE=cpu runs these checks on the CPU)",
        ),
    ]

    @pytest.mark.parametrize("name", list(CHECKS))
    def test_cuda(name, tmp_path):
        CHECKS[name](DEVICE, tmp_path)
