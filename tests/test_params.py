import numpy as np
import pytest
import torch
from helpers import make_params

from esft.es import Member, ParamSet, noise_for


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_perturb_then_restore_is_bit_exact(dtype):
    params = make_params(dtype)
    original = {k: v.clone() for k, v in params.items()}
    ps = ParamSet(params)
    for seed in (1, 2, 3):
        ps.perturb(Member(seed, 1 if seed % 2 else -1), sigma=1e-3)
        assert any(not torch.equal(params[k], original[k]) for k in params)
        ps.restore()
        for k in params:
            assert torch.equal(params[k], original[k]), k


def test_perturbation_is_sigma_eps_in_place():
    params = make_params(torch.float32)
    live = params["a.weight"]
    base = live.clone()
    ps = ParamSet(params)
    ps.perturb(Member(9, -1), sigma=0.01)
    eps = noise_for(base.shape, 9, "a.weight")
    assert live.data_ptr() == params["a.weight"].data_ptr()
    torch.testing.assert_close(live, base - 0.01 * eps, rtol=0, atol=1e-7)
    ps.restore()


@pytest.mark.parametrize(
    "pairs,z",
    [
        ([(11, 1), (12, -1), (13, 1), (14, 1)], [1.2, -0.3, 0.5, -1.4]),
        ([(11, 1), (11, -1), (13, 1), (13, -1)], [1.2, -0.3, 0.5, 0.5]),  # antithetic: one draw per pair
    ],
)
def test_update_matches_naive_float64(pairs, z):
    params = make_params(torch.float32)
    before = {k: v.double().clone() for k, v in params.items()}
    ps = ParamSet(params)
    members = [Member(s, sign) for s, sign in pairs]
    alpha = 5e-2
    stats = ps.update(members, z, alpha)
    for name, t in params.items():
        expected = before[name].clone()
        acc = torch.zeros_like(expected)
        for m, w in zip(members, z, strict=True):
            acc += w * m.sign * noise_for(t.shape, m.seed, name).double()
        expected += alpha / len(members) * acc
        np.testing.assert_allclose(t.double().numpy(), expected.numpy(), rtol=1e-6, atol=1e-7)
    assert stats.update_norm > 0
    assert stats.update_ratio == pytest.approx(stats.update_norm / stats.param_norm)


def test_update_keeps_pristine_in_sync_for_exact_restore():
    params = make_params(torch.bfloat16)
    ps = ParamSet(params)
    ps.update([Member(1), Member(2)], [1.0, -1.0], 1e-2)
    after = {k: v.clone() for k, v in params.items()}
    ps.perturb(Member(3), 1e-3)
    ps.restore()
    for k in params:
        assert torch.equal(params[k], after[k])


def test_bf16_update_is_accumulated_in_fp32_and_cast_once():
    # Each member's step is below half a bf16 ulp at 1.0; only their sum is not. Summing in fp32 and
    # casting once matches the exact float64 result; 30 separate bf16 adds lose most of it.
    n, alpha = 30, 0.1
    params = {"w": torch.ones(8192, dtype=torch.bfloat16)}
    members = [Member(s) for s in range(n)]
    z = np.random.default_rng(0).standard_normal(n).tolist()
    ParamSet(params).update(members, z, alpha=alpha)
    exact = torch.ones(8192, dtype=torch.float64)
    naive = torch.ones(8192, dtype=torch.bfloat16)
    for m, w in zip(members, z, strict=True):
        step = alpha / n * w * noise_for((8192,), m.seed, "w").double()
        exact += step
        naive += step.to(torch.bfloat16)
    exact = exact.to(torch.bfloat16)
    ours_match = (params["w"] == exact).float().mean()
    naive_match = (naive == exact).float().mean()
    assert ours_match > 0.99
    assert naive_match < 0.8


def test_zero_weights_leave_parameters_unchanged():
    params = make_params(torch.float32)
    original = {k: v.clone() for k, v in params.items()}
    stats = ParamSet(params).update([Member(1), Member(2)], [0.0, 0.0], 1.0)
    assert stats.update_norm == 0
    for k in params:
        assert torch.equal(params[k], original[k])


def test_misuse_is_refused():
    ps = ParamSet(make_params(torch.float32))
    ps.perturb(Member(1), 1e-3)
    with pytest.raises(RuntimeError):
        ps.perturb(Member(2), 1e-3)
    with pytest.raises(RuntimeError):
        ps.update([Member(1)], [1.0], 1e-3)
    ps.restore()
    with pytest.raises(ValueError):
        ParamSet({})


@pytest.mark.parametrize("scheme", ["independent", "table", "correlated"])
def test_every_scheme_restores_exactly_and_updates_like_naive(scheme):
    params = make_params(torch.bfloat16)
    original = {k: v.clone() for k, v in params.items()}
    ps = ParamSet(params, scheme=scheme)
    ps.perturb(Member(5, -1), 1e-2)
    ps.restore()
    assert all(torch.equal(params[k], original[k]) for k in params)
    members, z = [Member(1), Member(2, -1)], [0.7, -0.7]
    ps.update(members, z, 0.5)
    for name, t in params.items():
        acc = sum(
            w * m.sign * noise_for(t.shape, m.seed, name, scheme=scheme).double()
            for m, w in zip(members, z, strict=True)
        )
        expected = (original[name].double() + 0.5 / 2 * acc).to(torch.bfloat16)
        assert (t != expected).float().mean() < 0.01
