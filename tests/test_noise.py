import torch

from esft.es import Member, NoiseScheme, iteration_members, noise_for
from esft.es.noise import stream_seed


def test_same_seed_same_noise():
    a = noise_for((64, 32), 123, "layer.weight")
    b = noise_for((64, 32), 123, "layer.weight")
    assert torch.equal(a, b)
    assert a.dtype == torch.float32


def test_different_seed_different_noise():
    a = noise_for((1000,), 1, "w")
    b = noise_for((1000,), 2, "w")
    assert not torch.equal(a, b)


def test_equal_shapes_get_independent_noise():
    a = noise_for((256, 256), 7, "model.layers.0.q_proj.weight")
    b = noise_for((256, 256), 7, "model.layers.1.q_proj.weight")
    assert not torch.equal(a, b)
    corr = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]
    assert abs(float(corr)) < 0.02  # 65k samples: independent streams correlate ~1/256


def test_correlated_scheme_replicates_reference_code():
    a = noise_for((16, 16), 7, "a", scheme=NoiseScheme.CORRELATED)
    b = noise_for((16, 16), 7, "b", scheme=NoiseScheme.CORRELATED)
    assert torch.equal(a, b)
    assert stream_seed(7, "x", NoiseScheme.CORRELATED) == 7


def test_noise_is_standard_normal():
    x = noise_for((200_000,), 5, "w")
    assert abs(float(x.mean())) < 0.01
    assert abs(float(x.std()) - 1.0) < 0.01


def test_members_are_a_pure_function_of_run_seed_and_iteration():
    assert iteration_members(0, 1, 30) == iteration_members(0, 1, 30)
    assert iteration_members(0, 1, 30) != iteration_members(0, 2, 30)
    assert iteration_members(0, 1, 30) != iteration_members(1, 1, 30)
    seeds = [m.seed for m in iteration_members(3, 4, 30)]
    assert len(set(seeds)) == 30


def test_antithetic_members_share_seeds_in_pairs():
    members = iteration_members(0, 1, 6, antithetic=True)
    assert [m.sign for m in members] == [1, -1] * 3
    for k in range(3):
        assert members[2 * k].seed == members[2 * k + 1].seed
    assert isinstance(members[0], Member)


def test_table_noise_is_deterministic_per_seed_and_name():
    a = noise_for((300, 5000), 3, "x.weight", scheme=NoiseScheme.TABLE)
    b = noise_for((300, 5000), 3, "x.weight", scheme=NoiseScheme.TABLE)
    c = noise_for((300, 5000), 3, "y.weight", scheme=NoiseScheme.TABLE)
    d = noise_for((300, 5000), 4, "x.weight", scheme=NoiseScheme.TABLE)
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, d)
    for other in (c, d):
        corr = torch.corrcoef(torch.stack([a.flatten(), other.flatten()]))[0, 1]
        assert abs(float(corr)) < 0.01


def test_table_noise_is_standard_normal_across_chunks():
    x = noise_for((3_000_000,), 11, "big", scheme=NoiseScheme.TABLE)  # spans several table chunks
    assert abs(float(x.mean())) < 0.01
    assert abs(float(x.std()) - 1.0) < 0.01
    chunk = 2**20
    assert not torch.equal(x[:1000], x[chunk : chunk + 1000])  # chunks come from different offsets
