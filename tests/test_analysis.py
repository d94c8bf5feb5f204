"""esft analyze: every analysis on synthetic checkpoints with known answers (tiny model, CPU, fast).

A checkpoint is the tiny base model with a known delta written into its safetensors file; a fake run
folder (config.yaml + checkpoints) stands in for a training run, so nothing here trains.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shutil
from math import comb
from pathlib import Path

import pytest
import torch
from helpers import build_tiny_model
from safetensors.torch import load_file, save_file

from esft.analysis import cli as analysis_cli
from esft.analysis.cosine import update_cosine
from esft.analysis.forgetting import StageMatrix, evaluate_stages
from esft.analysis.interpolate import Interpolator, barrier, interpolate, lambda_grid
from esft.analysis.kl import Scored, completion_logprobs, kl_drift
from esft.analysis.passk import coverage, pass_at_k
from esft.analysis.randomwalk import RandomWalk, from_config, from_seedlog, growth
from esft.analysis.weights import histogram_edges, update_stats
from esft.engines import Sampling, build_engine
from esft.errors import ConfigError
from esft.evaluate import evaluate
from esft.runstore import RunStore
from esft.tasks import load_task
from esft.tasks.base import RewardPart, Task, answer_accuracy

DOWN0 = "model.layers.0.mlp.down_proj.weight"  # (32, 64)
Q1 = "model.layers.1.self_attn.q_proj.weight"  # (32, 32)


def variant(base: Path, dest: Path, edit) -> Path:
    """A copy of model folder ``base`` whose tensors ``edit(dict)`` changed in place."""
    shutil.copytree(base, dest)
    tensors = load_file(base / "model.safetensors")
    edit(tensors)
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def fake_run(root: Path, base: Path, checkpoints: dict[int, Path], **config) -> Path:
    """A run folder as the trainers leave it: config.yaml (with model_path) and HF checkpoints."""
    store = RunStore(root)
    store.write_config(
        {
            "task": "conciseness",
            "alpha": 1e-3,
            "population": 4,
            "sigma": 1e-3,
            "iterations": max(checkpoints, default=0),
            "max_new_tokens": 6,
            "dtype": "float32",
            "device": "cpu",
            "model_path": str(base),
            **config,
        }
    )
    for it, folder in checkpoints.items():
        store.save_checkpoint(it, lambda tmp, f=folder: _copy_into(f, tmp), {})
    return root


def _copy_into(src: Path, dest: Path) -> None:
    for f in src.iterdir():
        shutil.copy2(f, dest / f.name)


def add_const(name: str, c: float, every: int = 1):
    """Edit: add ``c`` to every ``every``-th coordinate of tensor ``name``."""

    def edit(t):
        flat = t[name].view(-1)
        flat[::every] += c

    return edit


@pytest.fixture(scope="module")
def models(tiny_model, tmp_path_factory):
    """Checkpoints of the tiny model with known deltas."""
    root = tmp_path_factory.mktemp("analysis")
    gen = torch.Generator().manual_seed(1)
    delta = torch.randn(32, 64, generator=gen) * 1e-2
    other = torch.randn(32, 32, generator=gen) * 1e-2

    def plus(t):
        t[DOWN0] += delta

    def minus(t):
        t[DOWN0] -= delta

    def ortho(t):
        t[Q1] += other

    def known(t):  # 1.5e-3 on all of DOWN0, -4e-3 on every 4th coordinate of Q1
        add_const(DOWN0, 1.5e-3)(t)
        add_const(Q1, -4e-3, every=4)(t)

    def big(t):  # a large random update of every matrix: changes greedy outputs
        g = torch.Generator().manual_seed(2)
        for name, x in t.items():
            if x.ndim == 2:
                t[name] = x + torch.randn(x.shape, generator=g) * 0.2

    return {
        "base": tiny_model,
        "plus": variant(tiny_model, root / "plus", plus),
        "plus2": variant(tiny_model, root / "plus2", plus),
        "minus": variant(tiny_model, root / "minus", minus),
        "ortho": variant(tiny_model, root / "ortho", ortho),
        "known": variant(tiny_model, root / "known", known),
        "big": variant(tiny_model, root / "big", big),
        "root": root,
    }


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="esft")
    analysis_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["analyze", *argv])


def has_e_task() -> Task:
    """A task with a 1/0 answer part: the completion contains the letter e."""
    rows = [{"prompt": p} for p in ("Solve: 3 + 5", "The answer is", "reasoning", "think")]

    def answer(prompts, completions, **kw):
        return [float("e" in c) for c in completions]

    return Task("has_e", lambda split: rows, [RewardPart("answer", answer)], metrics=answer_accuracy)


# -- weights -------------------------------------------------------------------------------------


def test_known_delta_gives_known_norms_sparsity_and_breakdown(models):
    base = load_file(models["base"] / "model.safetensors")
    stats = update_stats(models["base"], models["known"])
    total = sum(t.numel() for t in base.values())
    base_norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in base.values()))
    want = math.sqrt(2048 * 1.5e-3**2 + 256 * 4e-3**2)
    assert stats.total.numel == total
    assert stats.total.norm == pytest.approx(want, rel=1e-4)
    assert stats.total.base_norm == pytest.approx(base_norm, rel=1e-9)
    assert stats.total.relative_norm == pytest.approx(want / base_norm, rel=1e-4)
    assert stats.tau == 1e-6
    assert stats.total.sparsity == (total - 2048 - 256) / total
    assert stats.total.max_abs == pytest.approx(4e-3, rel=1e-4)
    # per layer: layer 0 holds the down_proj change, layer 1 the q_proj change, the rest is untouched
    assert stats.layers["layers.0"].norm == pytest.approx(1.5e-3 * math.sqrt(2048), rel=1e-4)
    assert stats.layers["layers.1"].norm == pytest.approx(4e-3 * math.sqrt(256), rel=1e-4)
    assert stats.layers["embed"].norm == 0 and stats.layers["lm_head"].norm == 0
    assert stats.layers["norm"].sparsity == 1.0
    assert list(stats.layers) == ["embed", "layers.0", "layers.1", "norm", "lm_head"]
    # per module type: q = 2 weights of 32x32 + 2 biases of 32, a quarter of one weight changed
    q = stats.modules["q"]
    assert q.numel == 2 * 1024 + 2 * 32 and q.sparsity == (q.numel - 256) / q.numel
    assert stats.modules["down"].norm == pytest.approx(1.5e-3 * math.sqrt(2048), rel=1e-4)
    assert stats.modules["down"].sparsity == 0.5  # one of two down_proj matrices changed
    for kind in ("k", "v", "o", "gate", "up", "norm", "embed", "lm_head"):
        assert stats.modules[kind].norm == 0, kind
    assert sum(m.numel for m in stats.modules.values()) == total
    # histogram over the changed tensors: 768 zeros, 2048 at 1.5e-3, 256 at 4e-3
    hist = stats.histogram
    assert stats.changed_tensors == [DOWN0, Q1] and stats.changed_numel == 2048 + 1024
    assert hist.total == 3072 and hist.counts[0] == 768

    def bin_of(x):
        return next(i for i, (lo, hi) in enumerate(hist.bins()) if lo <= x < hi)

    assert hist.counts[bin_of(1.5e-3)] == 2048 and hist.counts[bin_of(4e-3)] == 256
    # tau is settable: 2e-3 counts the 1.5e-3 changes as unchanged, not the 4e-3 ones
    assert update_stats(models["base"], models["known"], tau=2e-3).total.sparsity == (total - 256) / total


def test_histogram_edges_are_log_spaced():
    edges = histogram_edges(2)
    assert edges[0] == pytest.approx(1e-10) and edges[-1] == pytest.approx(10.0)
    ratios = {round(b / a, 9) for a, b in itertools.pairwise(edges)}
    assert ratios == {round(10**0.5, 9)}


def test_random_walk_derivation_matches_simulation():
    """ES steps alpha/N sum z_n eps_n with z independent of eps: ||delta|| ~ alpha sqrt(T d / N)."""
    gen = torch.Generator().manual_seed(0)
    alpha, n, t_iters, d = 1e-2, 10, 20, 20_000
    theta = torch.zeros(d, dtype=torch.float64)
    rows = []
    for t in range(1, t_iters + 1):
        r = torch.randn(n, generator=gen, dtype=torch.float64)
        z = (r - r.mean()) / r.std(unbiased=False)
        eps = torch.randn(n, d, generator=gen, dtype=torch.float64)
        theta += alpha / n * (z[:, None] * eps).sum(0)
        rows.append(
            {"iteration": t, "members": [[s, 1] for s in range(n)], "weights": z.tolist(), "alpha": alpha}
        )
    config = {"alpha": alpha, "population": n}
    walk = from_config(config, t_iters)
    assert walk.variance == pytest.approx(alpha**2 * t_iters / n)
    assert walk.expected_norm(d) == pytest.approx(alpha * math.sqrt(t_iters * d / n))
    assert float(theta.norm()) == pytest.approx(walk.expected_norm(d), rel=0.03)
    # the seed log's exact sum equals the closed form for z-scores (sum z^2 = N)
    assert from_seedlog(rows, t_iters, config).variance == pytest.approx(walk.variance, rel=1e-9)
    assert from_seedlog(rows, t_iters + 1, config) is None  # the log does not cover T + 1
    # antithetic pair: one noise draw with coefficient w+ - w-; a flat iteration adds nothing
    pair = [{"iteration": 1, "members": [[7, 1], [7, -1]], "weights": [1.0, -1.0], "alpha": 0.5}]
    assert from_seedlog(pair, 1, {"alpha": 0.5, "population": 2}).variance == pytest.approx(
        (0.5 / 2) ** 2 * 4
    )
    flat = [{"iteration": 1, "members": [[1, 1], [2, 1]], "weights": [0.0, 0.0], "alpha": 0.5}]
    assert from_seedlog(flat, 1, {"alpha": 0.5, "population": 2}).variance == 0
    assert from_config({"trainer": "grpo", "alpha": 1.0, "population": 2}, 3) is None
    # expected histogram shares are |N(0, s^2)| bin probabilities: they sum to 1
    s = RandomWalk(alpha, n, t_iters, walk.variance, "config")
    edges = histogram_edges(4)
    probs = [s.bin_probability(lo, hi) for lo, hi in zip([0.0, *edges], [*edges, math.inf], strict=True)]
    assert sum(probs) == pytest.approx(1.0, abs=1e-12)
    sd = math.sqrt(walk.variance)
    assert s.bin_probability(0, sd) == pytest.approx(0.6826894921, rel=1e-9)


def test_growth_across_checkpoints(models, tmp_path):
    run = fake_run(tmp_path / "run", models["base"], {1: models["plus"], 2: models["known"]})
    result = growth(RunStore(run), models["base"])
    d = 2048 + 1024  # tensors changed in any checkpoint: DOWN0 and Q1
    assert result.trained_numel == d
    norms = {p.iteration: p.norm for p in result.points}
    assert norms[2] == pytest.approx(math.sqrt(2048 * 1.5e-3**2 + 256 * 4e-3**2), rel=1e-4)
    for p in result.points:
        assert p.expected_config == pytest.approx(1e-3 * math.sqrt(p.iteration * d / 4))
        assert p.expected_seedlog is None and p.ratio == pytest.approx(p.norm / p.expected_config)


# -- cosine --------------------------------------------------------------------------------------


def test_cosine_same_opposite_and_orthogonal_updates(models):
    base = models["base"]
    same = update_cosine(base, models["plus"], models["plus2"])
    assert same.total.cosine == 1.0
    assert same.layers["layers.0"].cosine == 1.0 and math.isnan(same.layers["layers.1"].cosine)
    opposite = update_cosine(base, models["plus"], models["minus"])
    assert opposite.total.cosine == pytest.approx(-1.0, abs=1e-6)
    assert opposite.modules["down"].cosine == pytest.approx(-1.0, abs=1e-6)
    ortho = update_cosine(base, models["plus"], models["ortho"])
    assert ortho.total.cosine == 0.0  # disjoint tensors: the dot product is exactly 0
    assert ortho.total.row()["norm_a"] == pytest.approx(same.total.row()["norm_a"])
    assert math.isnan(ortho.layers["layers.0"].cosine) and math.isnan(ortho.layers["layers.1"].cosine)


def test_mismatched_base_is_a_one_line_error(models, tmp_path):
    tied = build_tiny_model(tmp_path / "tied", tie=True)  # no lm_head tensor: other names

    def reshape(t):
        t[DOWN0] = t[DOWN0][:, :32].contiguous()

    narrow = variant(models["base"], tmp_path / "narrow", reshape)
    for bad in (tied, narrow):
        with pytest.raises(ConfigError) as e:
            update_cosine(bad, models["plus"], models["minus"])
        assert "\n" not in str(e.value) and "base" in str(e.value)
    with pytest.raises(ConfigError) as e:
        analysis_cli.run(parse(["cosine", str(models["plus"]), str(models["minus"]), "--base", str(tied)]))
    assert "\n" not in str(e.value)
    # runs recorded with different bases are refused unless --base says which one to use
    run_a = fake_run(tmp_path / "a", models["base"], {1: models["plus"]})
    run_b = fake_run(tmp_path / "b", tied, {1: models["minus"]})
    with pytest.raises(ConfigError, match="different bases") as e:
        analysis_cli.run(parse(["cosine", str(run_a), str(run_b), "--quiet"]))
    assert "\n" not in str(e.value)


# -- KL ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engines(models):
    base = build_engine("hf", str(models["base"]), dtype="float32", device="cpu")
    big = build_engine("hf", str(models["big"]), dtype="float32", device="cpu")
    return base, big


def test_kl_of_a_model_with_itself_is_exactly_zero(engines, models):
    base, _ = engines
    twin = build_engine("hf", str(models["base"]), dtype="float32", device="cpu")
    prompts = [r["prompt"] for r in load_task("conciseness").split("test")[:3]]
    for other in (base, twin):  # the same engine, and a second copy of the same weights
        est = kl_drift(base, other, prompts, 6, Sampling(2, 1.0, 1.0, seed=3))
        assert est.sequences == 6 and est.tokens > 0
        assert est.per_token_k1 == 0.0 and est.per_token_k3 == 0.0
        assert est.per_sequence_k1 == 0.0 and est.per_sequence_k3 == 0.0


def test_kl_from_a_changed_model_is_positive_and_seeded(engines):
    base, big = engines
    prompts = [r["prompt"] for r in load_task("conciseness").split("test")[:3]]
    est = kl_drift(big, base, prompts, 6, Sampling(2, 1.0, 1.0, seed=0))
    assert est.per_token_k3 > 0 and est.per_sequence_k3 > 0
    again = kl_drift(big, base, prompts, 6, Sampling(2, 1.0, 1.0, seed=0))
    assert again.per_token_k1 == est.per_token_k1 and again.per_token_k3 == est.per_token_k3
    with pytest.raises(ConfigError):
        kl_drift(big, base, prompts, 6, Sampling(1, 1.0, 0.9, 0))


# -- KL against exact enumeration ----------------------------------------------------------------
# An 8-token vocabulary and 3 new tokens leave 1 + 7 + 49 + 343 completions per prompt (EOS ends one
# early), so the exact KL between the two models' completion distributions is a finite sum. The
# sampled estimates must land within 4.5 standard errors of it, the standard errors also computed
# exactly from the enumeration; the alternatives a bug would estimate instead (the other direction,
# the untempered distributions) lie more than 10 standard errors away, so each check can fail.

SMALL_VOCAB = ["<pad>", "<eos>", "<unk>", "a", "b", "c", "d", "e"]
SMALL_EOS = 1
SMALL_PROMPTS = ["a b c", "e"]
SMALL_NEW = 3
SMALL_SAMPLES = 3000  # per prompt
# Settings a model's generation_config.json may carry; sampled KL must ignore every one of them (each
# truncates or reshapes the distribution, so the samples would not come from p_ft at temperature T).
HOSTILE_GENERATION = {
    "do_sample": True,
    "temperature": 0.3,
    "top_k": 2,
    "top_p": 0.5,
    "min_p": 0.3,
    "typical_p": 0.5,
    "epsilon_cutoff": 0.2,
    "eta_cutoff": 0.2,
    "repetition_penalty": 3.0,
}


def small_vocab_model(path: Path, seed: int, scale: float) -> Path:
    """A random one-layer Qwen2 over SMALL_VOCAB (word-level tokenizer), weights N(0, scale^2) so the
    next-token distributions are far from uniform and depend on the context."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(SMALL_VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(SMALL_VOCAB), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        initializer_range=scale, eos_token_id=SMALL_EOS, pad_token_id=0, bos_token_id=None,
        tie_word_embeddings=False,
    )  # fmt: skip
    model = Qwen2ForCausalLM(config)
    for key, value in {"eos_token_id": SMALL_EOS, "pad_token_id": 0, **HOSTILE_GENERATION}.items():
        setattr(model.generation_config, key, value)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def small_engines(tmp_path_factory):
    """Engines A and B over SMALL_VOCAB: B is A with every matrix perturbed and a flatter lm_head, so
    KL(A || B) and KL(B || A) differ clearly."""
    root = tmp_path_factory.mktemp("small_vocab")
    a = small_vocab_model(root / "a", seed=1, scale=0.3)

    def edit(t):
        g = torch.Generator().manual_seed(5)
        for name, x in t.items():
            if x.ndim == 2:
                t[name] = x + torch.randn(x.shape, generator=g) * 0.3 * x.std()
        t["lm_head.weight"] *= 0.3

    b = variant(a, root / "b", edit)
    return tuple(build_engine("hf", str(p), dtype="float32", device="cpu") for p in (a, b))


@torch.inference_mode()
def next_token_logprobs(engine, ids: list[list[int]], temperature: float) -> torch.Tensor:
    """log softmax(logits / T) of the token after each (unpadded, equal-length) row, float64."""
    logits = engine.model(torch.tensor(ids)).logits[:, -1].double()
    return torch.log_softmax(logits / temperature, dim=-1)


def enumerate_completions(p, q, prompt: str, max_new: int, temperature: float) -> dict[str, torch.Tensor]:
    """Every completion y of ``prompt`` (up to ``max_new`` tokens, ending at EOS) with p(y) and the sums
    over its tokens of l_t = log p - log q, of k3_t = expm1(-l_t) + l_t and of l_t under the untempered
    distributions; p and q are engines, both at ``temperature``."""
    ids = p.tokenizer(prompt)["input_ids"]
    zero = torch.zeros(1, dtype=torch.float64)
    frontier = {"tokens": [[]], "logp": zero, "k1": zero, "k3": zero, "raw": zero}
    done = []
    for depth in range(max_new):
        rows = [ids + h for h in frontier["tokens"]]
        lp, lq = next_token_logprobs(p, rows, temperature), next_token_logprobs(q, rows, temperature)
        l1 = next_token_logprobs(p, rows, 1.0) - next_token_logprobs(q, rows, 1.0)
        ratio = lp - lq
        grown = {
            "logp": frontier["logp"][:, None] + lp,
            "k1": frontier["k1"][:, None] + ratio,
            "k3": frontier["k3"][:, None] + torch.expm1(-ratio) + ratio,
            "raw": frontier["raw"][:, None] + l1,
        }
        vocab = lp.shape[1]
        stop = torch.zeros(vocab, dtype=torch.bool)
        stop[SMALL_EOS] = True
        if depth == max_new - 1:
            stop[:] = True
        done.append({k: v[:, stop].reshape(-1) for k, v in grown.items()} | {"len": depth + 1})
        frontier = {k: v[:, ~stop].reshape(-1) for k, v in grown.items()}
        frontier["tokens"] = [
            h + [v] for h in [r[len(ids) :] for r in rows] for v in range(vocab) if v != SMALL_EOS
        ]
    out = {k: torch.cat([d[k] for d in done]) for k in ("logp", "k1", "k3", "raw")}
    out["len"] = torch.cat([torch.full((d["logp"].numel(),), float(d["len"])) for d in done]).double()
    out["p"] = out.pop("logp").exp()
    assert abs(float(out["p"].sum()) - 1.0) < 1e-9  # every completion is there
    return out


def exact_kl(p, q, prompts: list[str], samples: int, temperature: float) -> dict[str, float]:
    """The exact values kl_drift(p, q, prompts, SMALL_NEW, Sampling(samples, T)) estimates, and the
    standard errors of its estimates with ``samples`` completions per prompt."""
    per = [enumerate_completions(p, q, x, SMALL_NEW, temperature) for x in prompts]
    mean = lambda e, x: float((e["p"] * x).sum())  # noqa: E731
    var = lambda e, x: mean(e, (x - mean(e, x)) ** 2)  # noqa: E731
    n = len(prompts) * samples
    seq = sum(mean(e, e["k1"]) for e in per) / len(prompts)  # E[k3 sum] is the same KL
    length = sum(mean(e, e["len"]) for e in per) / len(prompts)
    tok = seq / length
    # the per-token estimate is a ratio (sum of l) / (sum of lengths): delta method
    ratio_var = sum(var(e, e["k1"] - tok * e["len"]) for e in per) * samples
    ratio_var3 = sum(var(e, e["k3"] - tok * e["len"]) for e in per) * samples
    return {
        "seq": seq,
        "tok": tok,
        "seq_k1_se": math.sqrt(sum(var(e, e["k1"]) for e in per) * samples) / n,
        "seq_k3_se": math.sqrt(sum(var(e, e["k3"]) for e in per) * samples) / n,
        "tok_k1_se": math.sqrt(ratio_var) / (n * length),
        "tok_k3_se": math.sqrt(ratio_var3) / (n * length),
        "seq_untempered": sum(mean(e, e["raw"]) for e in per) / len(prompts),
        "check_k3": sum(mean(e, e["k3"]) for e in per) / len(prompts),
    }


def assert_estimates(est, exact: dict[str, float], wrong: list[float]) -> None:
    """k1 and k3, per sequence and per token, within 4.5 exact standard errors of the exact KL, and
    every value in ``wrong`` (per sequence) more than 10 standard errors from it."""
    assert est.sequences == len(SMALL_PROMPTS) * SMALL_SAMPLES
    assert exact["check_k3"] == pytest.approx(exact["seq"], rel=1e-9)  # E[k3] = KL, token by token
    assert abs(est.per_sequence_k1 - exact["seq"]) < 4.5 * exact["seq_k1_se"]
    assert abs(est.per_sequence_k3 - exact["seq"]) < 4.5 * exact["seq_k3_se"]
    assert abs(est.per_token_k1 - exact["tok"]) < 4.5 * exact["tok_k1_se"]
    assert abs(est.per_token_k3 - exact["tok"]) < 4.5 * exact["tok_k3_se"]
    # the reported standard error is the estimator's own (k3's heavy tail makes its sample s.e. erratic)
    assert est.per_sequence_k1_se == pytest.approx(exact["seq_k1_se"], rel=0.15)
    for other in wrong:
        assert abs(other - exact["seq"]) > 10 * max(exact["seq_k1_se"], exact["seq_k3_se"])


def test_kl_estimates_match_the_exact_kl_in_both_directions(small_engines):
    a, b = small_engines
    sampling = Sampling(SMALL_SAMPLES, 1.0, 1.0, seed=0)
    ab = exact_kl(a, b, SMALL_PROMPTS, SMALL_SAMPLES, 1.0)
    ba = exact_kl(b, a, SMALL_PROMPTS, SMALL_SAMPLES, 1.0)
    # samples come from the first engine: kl_drift(A, B) is KL(A || B), never KL(B || A)
    assert_estimates(kl_drift(a, b, SMALL_PROMPTS, SMALL_NEW, sampling, batch_size=500), ab, [ba["seq"]])
    assert_estimates(kl_drift(b, a, SMALL_PROMPTS, SMALL_NEW, sampling, batch_size=500), ba, [ab["seq"]])


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_kl_at_a_temperature_is_the_kl_of_the_tempered_distributions(small_engines, temperature):
    a, b = small_engines
    exact = exact_kl(a, b, SMALL_PROMPTS, SMALL_SAMPLES, temperature)
    sampling = Sampling(SMALL_SAMPLES, temperature, 1.0, seed=1)
    est = kl_drift(a, b, SMALL_PROMPTS, SMALL_NEW, sampling, batch_size=500)
    # wrong: the KL at T = 1; at T = 2 also tempered samples scored by the untempered models (at T = 0.5
    # that value happens to lie within 1 standard error of the right one)
    wrong = [exact_kl(a, b, SMALL_PROMPTS, SMALL_SAMPLES, 1.0)["seq"]]
    assert_estimates(est, exact, wrong + ([exact["seq_untempered"]] if temperature > 1 else []))


def test_completion_logprobs_read_token_t_from_the_logits_at_t_minus_1(small_engines):
    """Teacher forcing in a left-padded batch (prompts and completions of different lengths) gives each
    completion token the log-prob its prefix predicts, as one unpadded forward per prefix does; the
    logits one position late or early give clearly different values, so a shift cannot pass."""
    a, _ = small_engines
    items = [
        Scored(0, [3, 4, 5], [6, 7, 3, 1]),
        Scored(1, [7], [4]),
        Scored(2, [5, 5], [0, 6, 2]),  # pad and unk are ordinary tokens inside a completion
    ]
    for temperature in (1.0, 0.5):

        def at(seq: list[int], t: int, prefix: int, temperature: float = temperature) -> float:
            """log p(seq[t]) from the logits after seq[:prefix]."""
            return float(next_token_logprobs(a, [seq[:prefix]], temperature)[0, seq[t]])

        got = completion_logprobs(a.model, items, a.pad_id, temperature, batch_size=3)
        late, early = [], []
        for it, lp in zip(items, got, strict=True):
            seq = it.prompt_ids + it.completion_ids
            positions = range(len(it.prompt_ids), len(seq))
            assert lp.dtype == torch.float64 and lp.shape == (len(it.completion_ids),)
            assert lp.tolist() == pytest.approx([at(seq, t, t) for t in positions], abs=1e-5)
            late += [abs(at(seq, t, t + 1) - at(seq, t, t)) for t in positions]
            early += [abs(at(seq, t, t - 1) - at(seq, t, t)) for t in positions if t > 1]
        assert max(late) > 0.1 and max(early) > 0.1


# -- interpolation -------------------------------------------------------------------------------


def test_lambda_grid_and_barrier():
    assert lambda_grid(5, -0.5, 1.5) == [-0.5, 0.0, 0.5, 1.0, 1.5]
    assert lambda_grid(2) == [0.0, 1.0] and lambda_grid(3, 0.2, 0.8) == [0.0, 0.2, 0.5, 0.8, 1.0]
    assert barrier([0.0, 0.5, 1.0], [0.0, -1.0, 2.0]) == (2.0, 0.5)  # line at 0.5 is 1: a drop of 2
    assert barrier([-0.5, 0.0, 1.0, 1.5], [5.0, 1.0, 1.0, 5.0]) == (None, None)  # no interior point
    with pytest.raises(ConfigError):
        lambda_grid(1)


def test_interpolation_sets_exact_weights(engines, models):
    base, _ = engines
    interp = Interpolator(base, models["base"], models["known"])
    original = base.parameters()[DOWN0].clone()
    interp.set(0.5)
    assert torch.allclose(base.parameters()[DOWN0], original + 0.75e-3, atol=1e-7)
    interp.set(1.0)
    assert torch.equal(base.parameters()[DOWN0], load_file(models["known"] / "model.safetensors")[DOWN0])
    interp.set(-1.0)
    assert torch.allclose(base.parameters()[DOWN0], original - 1.5e-3, atol=1e-7)
    interp.set(0.0)
    assert torch.equal(base.parameters()[DOWN0], original)


def test_interpolation_between_identical_models_is_flat(engines, models):
    base, _ = engines
    task = load_task("conciseness")
    lambdas = lambda_grid(5, -0.5, 1.5)
    result = interpolate(
        base, models["base"], models["base"], task, lambdas, limit=2, max_new_tokens=6,
        kl_sampling=Sampling(1, 1.0, 1.0, 0),
    )  # fmt: skip
    rewards = [p.summary["reward"] for p in result.points]
    assert [p.lam for p in result.points] == lambdas and len(set(rewards)) == 1
    assert result.barriers()["reward"] == {"drop": 0.0, "lambda": 0.5}
    assert all(p.kl.per_token_k1 == 0.0 and p.kl.per_token_k3 == 0.0 for p in result.points)


# -- pass@k --------------------------------------------------------------------------------------


def test_pass_at_k_hand_values_and_brute_force():
    # n = 5, c = 2: 1 - C(3, k) / C(5, k)
    assert [pass_at_k(5, 2, k) for k in range(1, 6)] == pytest.approx([0.4, 0.7, 0.9, 1.0, 1.0])
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                labels = [1] * c + [0] * (n - c)
                subsets = list(itertools.combinations(labels, k))
                brute = sum(any(s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)
                assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), abs=1e-12)
    assert pass_at_k(2000, 3, 1000) == pytest.approx(1 - comb(1997, 1000) / comb(2000, 1000), rel=1e-9)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_coverage_counts_distinct_correct_answers():
    def s(index, completion, ok):
        return {"index": index, "completion": completion, "reward": float(ok), "parts": {"answer": float(ok)}}

    samples = [
        s(0, "so <answer>3</answer>", True),
        s(0, "hence <answer> 3 </answer>", True),
        s(0, "<answer>4</answer>", True),
        s(0, "no idea", False),
        *(s(1, "x", False) for _ in range(4)),
    ]
    cov = coverage("m", samples, 4)
    assert cov.pass_at[1] == pytest.approx((3 / 4 + 0) / 2)
    assert cov.pass_at[2] == pytest.approx((1 - comb(1, 2) / comb(4, 2) + 0) / 2)
    assert cov.correct_samples == 3 and cov.solved_prompts == 1
    assert cov.distinct_correct_answers == 2 and cov.distinct_answer_share == pytest.approx(2 / 3)
    assert cov.distinct_completion_share == 1.0 and cov.distinct_answers_per_solved == 2
    no_answer = [{**x, "parts": {"length": -1.0}} for x in samples]
    with pytest.raises(ConfigError, match="correct-reward"):
        coverage("m", no_answer, 4)
    assert coverage("m", no_answer, 4, threshold=1.0).correct_samples == 3


def test_coverage_agrees_with_evaluate_pass_and_mean_at_n(engines):
    base, _ = engines
    summary, samples = evaluate(
        base, has_e_task(), "test", max_new_tokens=6, sampling=Sampling(4, 1.0, 1.0, 0)
    )
    cov = coverage("base", samples, 4)
    assert cov.pass_at[4] == pytest.approx(summary["pass@4"])
    assert cov.pass_at[1] == pytest.approx(summary["mean@4"])  # pass@1 = mean of c/n over prompts


# -- forgetting ----------------------------------------------------------------------------------


def test_forgetting_matrix_matches_direct_evaluation(models, tmp_path):
    run = fake_run(tmp_path / "run", models["base"], {1: models["known"], 2: models["big"]})
    store = RunStore(run)
    tasks = [load_task("conciseness"), has_e_task()]
    engine = build_engine("hf", str(models["base"]), dtype="float32", device="cpu")
    stages = [("base", None)] + [(f"iter-{i}", f) for i, f in store.checkpoints().items()]
    matrix = evaluate_stages(engine, stages, tasks, limit=2, max_new_tokens=6)
    assert matrix.stages == ["base", "iter-1", "iter-2"] and matrix.tasks == ["conciseness", "has_e"]
    assert matrix.metric == {"conciseness": "reward", "has_e": "accuracy"}
    for label, folder in [("base", models["base"]), ("iter-1", models["known"]), ("iter-2", models["big"])]:
        direct = build_engine("hf", str(folder), dtype="float32", device="cpu")
        for task in tasks:
            summary, _ = evaluate(direct, task, "test", limit=2, max_new_tokens=6, progress=False)
            key = "accuracy" if task.name == "has_e" else "reward"
            assert matrix.values[label][task.name] == summary[key], (label, task.name)
    values = matrix.values
    for t in matrix.tasks:
        assert matrix.forgetting()[t] == max(values["base"][t], values["iter-1"][t]) - values["iter-2"][t]


def test_forgetting_definition():
    m = StageMatrix(["base", "A", "B"], ["a", "b"])
    m.values = {"base": {"a": 0.1, "b": 0.5}, "A": {"a": 0.9, "b": 0.4}, "B": {"a": 0.6, "b": 0.7}}
    assert m.forgetting() == pytest.approx({"a": 0.3, "b": -0.2})
    assert m.change() == pytest.approx({"a": 0.5, "b": 0.2})


# -- CLI -----------------------------------------------------------------------------------------


def test_cli_weights_growth_kl_interpolate_and_json(models, tmp_path, capsys):
    run = fake_run(tmp_path / "run", models["base"], {1: models["plus"], 2: models["known"]})
    seedlog = RunStore(run)
    for t in (1, 2):  # z-scores of 4 members: sum z^2 = 4 = N
        seedlog.append_seedlog(
            {
                "iteration": t,
                "members": [[s, 1] for s in range(4)],
                "weights": [1.0, -1.0, 1.0, -1.0],
                "alpha": 1e-3,
            }
        )
    args = parse(["weights", str(run), "--quiet"])
    assert args.analysis == "weights" and args.tau is None
    assert analysis_cli.run(args) == 0
    out = capsys.readouterr().out
    assert "tau = 1e-06" in out and "per module type" in out and "random walk" in out
    data = json.loads((run / "analysis" / "weights-run@2.json").read_text())
    assert data["tau"] == 1e-6 and data["changed_numel"] == 3072
    assert data["random_walk"]["source"] == "seedlog"
    assert data["random_walk"]["variance"] == pytest.approx(2 * 1e-6 / 4)
    assert data["total"]["norm"] == pytest.approx(math.sqrt(2048 * 1.5e-3**2 + 256 * 4e-3**2), rel=1e-4)

    # RUN@ITER, --checkpoint and --json; RUN@0 is the base itself (a zero update)
    out_json = tmp_path / "w1.json"
    assert (
        analysis_cli.run(parse(["weights", f"{run}@1", "--tau", "0.5", "--json", str(out_json), "--quiet"]))
        == 0
    )
    assert json.loads(out_json.read_text())["total"]["sparsity"] == 1.0
    assert (
        analysis_cli.run(
            parse(["weights", str(run), "--checkpoint", "0", "--json", str(out_json), "--quiet"])
        )
        == 0
    )
    assert json.loads(out_json.read_text())["total"]["norm"] == 0.0
    with pytest.raises(ConfigError, match="no checkpoint 7"):
        analysis_cli.run(parse(["weights", f"{run}@7", "--quiet"]))
    with pytest.raises(ConfigError, match="--base"):
        analysis_cli.run(parse(["weights", str(models["plus"]), "--quiet"]))

    assert analysis_cli.run(parse(["growth", str(run), "--quiet"])) == 0
    growth_json = json.loads((run / "analysis" / "growth-run.json").read_text())
    assert [p["iteration"] for p in growth_json["points"]] == [1, 2]
    assert growth_json["points"][1]["expected_seedlog"] == pytest.approx(1e-3 * math.sqrt(2 * 3072 / 4))

    argv = [
        "kl",
        str(run),
        "--task",
        "conciseness",
        "--limit",
        "2",
        "--quiet",
        "--json",
        str(tmp_path / "kl.json"),
    ]
    assert analysis_cli.run(parse(argv)) == 0
    kl = json.loads((tmp_path / "kl.json").read_text())["tasks"]["conciseness"]
    assert kl["sequences"] == 2 and kl["per_token_k3"] >= 0 and "k3" in kl["estimator"]
    assert "k1/token" in capsys.readouterr().out

    argv = ["interpolate", str(run), "--points", "3", "--range", "-0.5", "1.5", "--limit", "2", "--quiet"]
    assert analysis_cli.run(parse(argv)) == 0
    interp = json.loads((run / "analysis" / "interpolate-base-run@2-conciseness.json").read_text())
    assert [p["lambda"] for p in interp["points"]] == [-0.5, 0.0, 0.5, 1.0, 1.5]
    assert interp["points"][1]["kl"]["per_token_k3"] == 0.0  # lambda = 0 is the first endpoint itself
    assert "reward" in interp["barriers"]


def test_cli_forgetting_sequential_and_passk(models, tmp_path, capsys):
    run_a = fake_run(tmp_path / "a", models["base"], {1: models["known"]})
    ckpt_a = RunStore(run_a).checkpoints()[1]
    run_b = fake_run(tmp_path / "b", ckpt_a, {1: models["big"]})

    assert analysis_cli.run(parse(["forgetting", str(run_a), "--limit", "2", "--quiet"])) == 0
    forgetting = json.loads((run_a / "analysis" / "forgetting-a.json").read_text())
    assert forgetting["stages"] == ["base", "iter-1"] and forgetting["tasks"] == ["conciseness"]

    argv = ["sequential", str(run_a), str(run_b), "--tasks", "conciseness", "--limit", "2", "--quiet"]
    assert analysis_cli.run(parse(argv)) == 0
    out = capsys.readouterr().out
    assert "note:" not in out  # b started from a's final checkpoint
    seq = json.loads((run_b / "analysis" / "sequential-a@1-b@1.json").read_text())
    assert seq["stages"] == ["base", "a@1", "b@1"]
    values = seq["values"]
    assert values["a@1"]["conciseness"] == forgetting["values"]["iter-1"]["conciseness"]
    assert seq["forgetting"]["conciseness"] == pytest.approx(
        max(values["base"]["conciseness"], values["a@1"]["conciseness"]) - values["b@1"]["conciseness"]
    )

    argv = [
        "passk",
        f"{run_a}@0",
        str(run_a),
        "--samples",
        "3",
        "--limit",
        "2",
        "--correct-reward",
        "-30",
        "--quiet",
    ]
    assert analysis_cli.run(parse(argv)) == 0
    passk = json.loads((run_a / "analysis" / "passk-conciseness-a@0-a@1.json").read_text())
    assert [m["model"] for m in passk["models"]] == ["a@0", "a@1"]
    assert list(passk["models"][0]["pass_at"]) == ["1", "2", "3"]
    for m in passk["models"]:
        assert m["pass_at"]["1"] <= m["pass_at"]["2"] <= m["pass_at"]["3"]
    with pytest.raises(ConfigError, match="correct-reward"):
        analysis_cli.run(parse(["passk", str(run_a), "--samples", "2", "--limit", "1", "--quiet"]))


def test_a_runs_checkpoint_and_task_are_found_once_for_analyze_and_eval(tmp_path):
    """``sources.run_checkpoint`` and ``sources.build_task`` serve ``esft analyze`` and ``esft eval``."""
    from esft.analysis.sources import build_task, run_checkpoint

    store = RunStore(tmp_path / "run")
    store.write_config({"task": "conciseness", "reward_weights": [2.0], "max_new_tokens": 7})
    with pytest.raises(ConfigError) as e:
        run_checkpoint(store)
    assert str(e.value) == f"{store.root} has no checkpoints yet"
    for it in (2, 4):
        store.save_checkpoint(it, lambda folder: None, {})
    assert run_checkpoint(store) == (4, store.checkpoint_dir(4))
    assert run_checkpoint(store, 2) == (2, store.checkpoint_dir(2))
    with pytest.raises(ConfigError) as e:
        run_checkpoint(store, 3)
    assert str(e.value) == f"{store.root} has no checkpoint 3; available: 2, 4"
    with pytest.raises(ConfigError) as e:
        run_checkpoint(store, 3, zero_is_base=True)
    assert str(e.value) == f"{store.root} has no checkpoint 3; available: 2, 4 (0 = the base)"

    config = store.read_config()
    task = build_task(None, [config])  # the run's task, weights and completion limit
    assert (task.name, [p.weight for p in task.rewards], task.max_new_tokens) == ("conciseness", [2.0], 7)
    assert [p.weight for p in build_task("conciseness", [config], reward_weights=[3.0]).rewards] == [3.0]
    rewards = tmp_path / "r.py"
    rewards.write_text("def one(completions, **kw):\n    return [1.0] * len(completions)\n")
    own = build_task(None, [config], reward=[f"{rewards}:one"])  # --reward replaces rewards and weights
    assert [(p.name, p.weight) for p in own.rewards] == [("one", 1.0)]
    other = build_task("countdown", [config])  # another task: nothing of the run's
    assert other.max_new_tokens == load_task("countdown").max_new_tokens
    with pytest.raises(ConfigError, match="--task is required"):
        build_task(None, [{}])


def test_cosine_of_a_bf16_and_a_float32_run_takes_each_update_from_its_own_rounded_base(models, tmp_path):
    """A bf16 ES checkpoint beside a float32 GRPO one: the bf16 run started from the base rounded to
    bf16, so its frozen tensors have no update; the base's rounding must not count as one."""
    gen = torch.Generator().manual_seed(5)
    delta = torch.randn(32, 64, generator=gen) * 0.05

    def bf16_plus(t):  # every tensor stored in bf16 (as a bf16 run saves it), DOWN0 moved
        for name in t:
            t[name] = t[name].to(torch.bfloat16)
        t[DOWN0] = (t[DOWN0].float() + delta).to(torch.bfloat16)

    def f32_plus(t):
        t[DOWN0] += delta

    a = variant(models["base"], tmp_path / "bf16", bf16_plus)
    b = variant(models["base"], tmp_path / "f32", f32_plus)
    result = update_cosine(models["base"], a, b)
    assert math.isnan(result.layers["layers.1"].cosine)  # untouched in both: no update on either side
    assert result.layers["layers.1"].row()["norm_a"] == 0.0 and result.modules["q"].row()["norm_a"] == 0.0
    assert result.total.cosine > 0.99  # the same step, up to bf16's rounding of it
    bf16_step = (
        load_file(a / "model.safetensors")[DOWN0].float()
        - load_file(models["base"] / "model.safetensors")[DOWN0].to(torch.bfloat16).float()
    )
    assert result.total.row()["norm_a"] == pytest.approx(float(bf16_step.double().norm()), rel=1e-6)
