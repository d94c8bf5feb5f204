"""Low-rank (EGGROLL) noise: factors, the update, and population-batched forwards that must equal
member-by-member perturbation of the weights."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from conftest import build_tiny_model
from helpers import transformers_major
from torch import nn

from esft.engines import population
from esft.engines.hf import HFEngine
from esft.engines.population import PopulationHooks
from esft.errors import ConfigError
from esft.es import Member, ParamSet, native
from esft.es.lowrank import factors, lowrank_trainable
from esft.es.noise import stream_seed


def test_factors_are_deterministic_unit_variance_and_name_keyed():
    a, b = factors((256, 384), seed=7, name="w", rank=4)
    a2, b2 = factors((256, 384), seed=7, name="w", rank=4)
    assert torch.equal(a, a2) and torch.equal(b, b2)
    assert a.shape == (256, 4) and b.shape == (384, 4)
    eps = a @ b.T
    assert abs(float(eps.mean())) < 0.02
    assert 0.9 < float(eps.var()) < 1.1
    other, _ = factors((256, 384), seed=7, name="v", rank=4)
    assert not torch.equal(a, other)


def test_lowrank_trainable_drops_norm_scales_but_keeps_biases():
    params = {
        "l.weight": torch.zeros(3, 4),
        "l.bias": torch.zeros(3),
        "norm.weight": torch.zeros(4),
        "conv.weight": torch.zeros(2, 2, 2),
    }
    assert set(lowrank_trainable(params)) == {"l.weight", "l.bias"}


def test_update_equals_naive_float64_sum():
    torch.manual_seed(0)
    params = {"w": torch.randn(6, 5), "b": torch.randn(6)}
    ps = ParamSet({k: v.clone() for k, v in params.items()}, scheme="lowrank", rank=2)
    members = [Member(1), Member(2, -1), Member(3)]
    weights = [0.5, -1.0, 1.5]
    ps.update(members, weights, alpha=0.1)
    for name, base in params.items():
        acc = torch.zeros(base.shape, dtype=torch.float64)
        for m, w in zip(members, weights, strict=True):
            if base.ndim == 2:
                a, b = factors(base.shape, m.seed, name, 2)
                eps = (a @ b.T).double()
            else:
                gen = torch.Generator().manual_seed(stream_seed(m.seed, name))
                eps = torch.empty(base.numel()).normal_(generator=gen).double()
            acc += w * m.sign * eps
        expected = base.double() + 0.1 / 3 * acc
        torch.testing.assert_close(ps.params[name].double(), expected, atol=1e-6, rtol=0)


def test_factors_held_from_a_population_forward_give_the_same_update_and_are_dropped(monkeypatch):
    """The hooks' prepare() hands its factors to the update (not drawn twice); the update is bit for bit
    the one that draws its own, and holds nothing afterwards."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 4)).to(torch.bfloat16)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    members = [Member(21), Member(22, -1), Member(23)]
    rewards = [0.5, -1.0, 1.5]
    fresh = ParamSet({n: t.clone() for n, t in weights.items()}, scheme="lowrank", precision="stochastic")
    fresh.update(members, rewards, alpha=0.3)

    params = ParamSet(dict(model.named_parameters()), scheme="lowrank", precision="stochastic")
    with torch.no_grad(), PopulationHooks(model, params) as hooks:
        hooks.prepare(members[:2], 0.01, torch.bfloat16)  # generated in two batches
        hooks.prepare(members[2:], 0.01, torch.bfloat16)
    held = params._held["0.weight"]
    assert set(held) == {21, 22, 23} and set(params._held) == {"0.weight", "2.weight"}
    drawn = []
    monkeypatch.setattr("esft.es.params.factors", lambda *a, **k: drawn.append(a) or factors(*a, **k))
    params.update(members, rewards, alpha=0.3)
    assert drawn == [] and params._held == {}  # every factor came from the forward's draws
    for name, t in params.params.items():
        assert torch.equal(t, fresh.params[name])
    params.update(members, rewards, alpha=0.3)  # nothing held: drawn afresh
    assert len(drawn) == 2 * len(members)
    with torch.no_grad(), PopulationHooks(model, params) as hooks:
        hooks.prepare(members, 0.01, torch.bfloat16)
    with PopulationHooks(model, params):  # a new population forward: no update came, nothing piles up
        assert params._held == {}


def test_perturb_restore_is_bit_exact_with_lowrank():
    torch.manual_seed(1)
    t = torch.randn(8, 8).bfloat16()
    before = t.clone()
    ps = ParamSet({"w": t}, scheme="lowrank", rank=3)
    ps.perturb(Member(5, -1), 1e-2)
    assert not torch.equal(t, before)
    ps.restore()
    assert torch.equal(t, before)


def _logits(engine: HFEngine, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    enc = engine.tokenizer(texts, return_tensors="pt", padding=True, return_token_type_ids=False)
    with torch.no_grad():
        return engine.model(**enc).logits, enc["attention_mask"]


# the hook's two forms: two matmuls over all members (a prefill, from MATMUL_ROWS rows per member) and
# the per-member products (a decode step); each test's prompts give about 20 rows per member
FORMS = {"matmul": 1, "per-member": 10**6}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("tie", [False, True])
def test_population_forward_equals_member_by_member(tmp_path, tie, form, monkeypatch):
    monkeypatch.setattr(population, "MATMUL_ROWS", FORMS[form])
    engine = HFEngine(build_tiny_model(tmp_path / "m", tie=tie), dtype="float32", device="cpu")
    params = ParamSet(lowrank_trainable(engine.parameters()), scheme="lowrank", rank=2)
    assert any(n.endswith(".bias") for n in params.params)  # Qwen2 q/k/v biases are perturbed too
    prompts = ["Solve: 3 + 5", "The answer is <answer> (1 + 2)"]  # different lengths: left padding
    members = [Member(11), Member(12, -1), Member(13)]
    sigma = 0.05  # large, so a missed layer would show
    base, mask = _logits(engine, prompts)
    with PopulationHooks(engine.model, params) as hooks:
        hooks.prepare(members, sigma, torch.float32)
        batched, _ = _logits(engine, prompts * len(members))
    for i, m in enumerate(members):
        params.perturb(m, sigma)
        single, _ = _logits(engine, prompts)
        params.restore()
        got = batched[i * 2 : i * 2 + 2]
        real = mask.bool()
        assert (single - base)[real].abs().max() > 1e-3  # the perturbation matters
        torch.testing.assert_close(got[real], single[real], atol=2e-5, rtol=1e-4)
    after, _ = _logits(engine, prompts)
    assert torch.equal(after, base)  # hooks removed, weights untouched


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("arch", ["gemma", "gemma2", "gemma3"])
def test_population_forward_equals_materialised_on_gemma_with_the_embedding_trained(
    tmp_path, arch, form, monkeypatch
):
    """Gemma scales its embedding lookup by sqrt(hidden) inside the module: the members' noise rows
    must be scaled too, or batched members see noise 8x too small (hidden 64) and differ from the
    materialised perturbation that the update applies."""
    monkeypatch.setattr(population, "MATMUL_ROWS", FORMS[form])
    model = build_tiny_model(tmp_path / "m", arch=arch, tie=True, hidden_size=64, intermediate_size=96)
    engine = HFEngine(model, dtype="float32", device="cpu")
    emb = engine.model.get_input_embeddings()
    if transformers_major() >= 5 or arch == "gemma3":
        # the scale inside the module, the case the hooks must handle (transformers 4 scaled gemma and
        # gemma2 in the model's forward, after the hook, where the noise rows are scaled with the lookup)
        assert type(emb).__name__.endswith("ScaledWordEmbedding")
    params = ParamSet(lowrank_trainable(engine.parameters()), scheme="lowrank", rank=1)
    assert any("embed_tokens" in n for n in params.params)  # the embedding is trained
    prompts = ["Solve: 3 + 5", "The answer is <answer> (1 + 2)"]
    members = [Member(21), Member(22, -1)]
    sigma = 0.05
    base, mask = _logits(engine, prompts)
    with PopulationHooks(engine.model, params) as hooks:
        hooks.prepare(members, sigma, torch.float32)
        batched, _ = _logits(engine, prompts * len(members))
    real = mask.bool()
    for i, m in enumerate(members):
        params.perturb(m, sigma)
        single, _ = _logits(engine, prompts)
        params.restore()
        assert (single - base)[real].abs().max() > 1e-3
        torch.testing.assert_close(batched[i * 2 : i * 2 + 2][real], single[real], atol=1e-4, rtol=1e-4)
    groups = engine.generate_population(prompts, members, params, sigma, 6)
    for m, gens in zip(members, groups, strict=True):
        params.perturb(m, sigma)
        ref = engine.generate(prompts, 6)
        params.restore()
        assert [g.token_ids for g in gens] == [g.token_ids for g in ref]


def test_an_embedding_forward_that_is_not_a_scaled_lookup_is_refused():
    class Shifted(nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) + 1.0

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = Shifted(10, 4)

    model = M()
    params = ParamSet({"embed.weight": model.embed.weight.data}, scheme="lowrank")
    with pytest.raises(ConfigError, match="freeze it"):
        PopulationHooks(model, params)


def test_generate_population_matches_member_by_member_generate(tiny_model):
    engine = HFEngine(tiny_model, dtype="float32", device="cpu", batch_size=4)  # 2 members per call
    params = ParamSet(lowrank_trainable(engine.parameters()), scheme="lowrank", rank=1)
    prompts = ["Solve: 3 + 5", "The answer"]
    members = [Member(s, sign) for s in (1, 2, 3) for sign in (1, -1)]
    timer: dict[str, float] = {}
    groups = engine.generate_population(prompts, members, params, 0.05, 8, timer)
    assert len(groups) == len(members) and timer["generate"] > 0 and timer["noise"] > 0
    texts = set()
    for m, gens in zip(members, groups, strict=True):
        params.perturb(m, 0.05)
        ref = engine.generate(prompts, 8)
        params.restore()
        assert [g.text for g in gens] == [g.text for g in ref]
        texts.add(tuple(g.text for g in gens))
    assert len(texts) > 1  # members really generate differently
    engine.batch_size = 1  # more prompts than a batch: one member at a time, prompts in slices
    small = engine.generate_population(prompts, members[:2], params, 0.05, 8)
    assert [[g.text for g in gens] for gens in small] == [[g.text for g in gens] for gens in groups[:2]]


def test_layers_other_than_linear_and_embedding_are_refused():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.raw = nn.Parameter(torch.zeros(3, 3))

    model = Odd()
    params = ParamSet(dict(model.named_parameters()), scheme="lowrank")
    with pytest.raises(ConfigError, match="raw"):
        PopulationHooks(model, params)


def test_a_perturbation_hook_that_never_runs_is_an_error():
    """A forward that reads a layer's weight without calling the layer (as LoRA wrappers do with
    base_layer.forward) skips its hook: members would generate without that noise. It must raise."""

    class Bypass(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.other = nn.Linear(3, 3)

        def forward(self, x):
            return self.lin(x) + nn.functional.linear(x, self.other.weight, self.other.bias)

    model = Bypass()
    params = ParamSet(dict(model.named_parameters()), scheme="lowrank", rank=1)
    members = [Member(1, 1), Member(2, 1)]
    with PopulationHooks(model, params) as hooks:
        hooks.prepare(members, 0.1, torch.float32)
        model(torch.ones(2, 3))
        with pytest.raises(RuntimeError, match="other"):
            hooks.check_fired()
        hooks.prepare(members, 0.1, torch.float32)
        model.lin(torch.ones(2, 3))
        model.other(torch.ones(2, 3))
        hooks.check_fired()  # both ran


needs_cc = pytest.mark.skipif(
    shutil.which("gcc") is None and shutil.which("cc") is None and os.environ.get("CI") != "true",
    reason="no C compiler: the population hooks use torch's addcmul_",
)


def _outer_kernel():
    kernel = native.outer_add_bf16()
    if kernel is None and os.environ.get("CI") != "true":  # CI's gcc has OpenMP: there it must build
        pytest.skip(f"no OpenMP build of the C kernels here ({native.threading() or native.library()[1]})")
    assert kernel is not None
    return kernel


@needs_cc
@pytest.mark.parametrize("cols", [5, 4096, 4100, 9000])  # under, at and over the kernel's 4096-value spans
def test_the_c_outer_add_is_torchs_addcmul_bit_for_bit_at_any_thread_count(cols):
    kernel = _outer_kernel()
    gen = torch.Generator().manual_seed(cols)
    out = torch.randn(3, 2, cols, generator=gen).bfloat16()
    coef = torch.randn(3, 2, 1, generator=gen).bfloat16()
    a = (torch.randn(3, 1, cols, generator=gen) * 1e-2).bfloat16()
    out[0, 0, :4], coef[0, 0], a[0, 0, :4] = 3e-39, 1e-20, 1e-19  # sums below bf16's normal range
    want = out.clone().addcmul_(coef, a)
    threads = torch.get_num_threads()
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            got = out.clone()
            kernel(got, coef, a)
            assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    finally:
        torch.set_num_threads(threads)


def test_without_openmp_the_hooks_keep_torchs_addcmul(monkeypatch):
    monkeypatch.setattr(native, "_outer", None)
    monkeypatch.setattr(native, "threading", lambda: "pthreads")
    assert native.outer_add_bf16() is None


@needs_cc
def test_bf16_decode_corrections_through_the_c_kernel_give_torchs_logits(tmp_path, monkeypatch):
    """The rank-1 decode correction (rows per member below MATMUL_ROWS) through native.outer_add_bf16:
    the population's bf16 logits equal those of torch's addcmul_, bit for bit, and the kernel ran."""
    monkeypatch.setattr(population, "MATMUL_ROWS", 10**6)  # every forward takes the element-wise form
    monkeypatch.setattr(population, "OUTER_MIN_COLS", 1)  # and the C kernel, whatever the tiny widths
    engine = HFEngine(build_tiny_model(tmp_path / "m"), dtype="bfloat16", device="cpu")
    params = ParamSet(lowrank_trainable(engine.parameters()), scheme="lowrank", rank=1)
    prompts = ["Solve: 3 + 5", "The answer is <answer> (1 + 2)"]
    members = [Member(11), Member(12, -1), Member(13)]
    calls = []
    kernel = _outer_kernel()
    monkeypatch.setattr(native, "outer_add_bf16", lambda: lambda *a: calls.append(1) or kernel(*a))
    logits = {}
    for form in ("c", "torch"):
        with PopulationHooks(engine.model, params) as hooks:
            if form == "torch":
                hooks._outer = None
            hooks.prepare(members, 0.05, torch.bfloat16)
            logits[form], _ = _logits(engine, prompts * len(members))
    assert calls  # the C kernel served the first pass
    assert torch.equal(logits["c"], logits["torch"])
