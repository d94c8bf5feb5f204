import pytest
import torch
import transformers
from helpers import transformers_major
from safetensors.torch import load_file

from esft.bench import format_table, run_bench
from esft.cli import main
from esft.engines import HFEngine
from esft.engines.base import Sampling, completion
from esft.engines.hf import hold_eos_in_generate
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
    assert "machine=" in out and " threads" in out  # every speed figure names its machine
    assert load_file(str(tiny_model / "model.safetensors"))  # the model folder is untouched


def test_fixed_length_gives_every_mode_identical_token_work(tiny_model):
    engine = HFEngine(tiny_model)
    rows = run_bench(engine, load_task("conciseness"), 3, 2, 5, ["table", "lowrank"], fixed_length=True)
    assert [r.tokens for r in rows] == [3 * 2 * 5] * 3


def _eos_at(tokens: list[int], most: int = 5) -> tuple[int, int]:
    """(k, token): the latest position k <= ``most`` whose token the row has not generated before, so
    that taking that token as EOS stops the row at its (k+1)th token (5 with this transformers' tiny
    model; a random model of another version may repeat itself sooner)."""
    for k in range(min(most, len(tokens) - 1), 0, -1):
        if tokens[k] not in tokens[:k]:
            return k, tokens[k]
    pytest.fail(f"the tiny model's completion repeats its first token throughout: {tokens}")


def test_fixed_length_holds_eos_exactly_as_transformers_min_new_tokens(tiny_model):
    """The engine bans EOS in place (hf.HoldEOS) instead of through transformers' min_new_tokens, which
    rewrites the whole vocabulary's scores every step: the same tokens, greedy and sampled."""
    engine = HFEngine(tiny_model, dtype="float32", device="cpu")
    texts = ["Solve: 3 + 5", "The answer is <answer> (1 + 2)", "abc"]
    free = engine._generate_texts(texts, 8, True)
    # "EOS" := the (k+1)th token row 0 generates freely: the hold (k+1 tokens before any EOS) must ban it
    k, likes = _eos_at(list(free[0].token_ids))
    engine.eos_ids = {likes}
    engine.min_new_tokens = k + 1
    enc = engine.tokenizer(texts, return_tensors="pt", padding=True, return_token_type_ids=False)
    for sampling in (None, Sampling(samples=2, temperature=1.0, seed=3)):
        if sampling is not None:
            torch.manual_seed(sampling.seed)
        ours = engine._generate_texts(texts, 8, True, sampling)
        if sampling is not None:
            torch.manual_seed(sampling.seed)
        kwargs = {"do_sample": False} if sampling is None else {"do_sample": True, "num_return_sequences": 2}
        ref = engine.model.generate(
            **enc, **kwargs, max_new_tokens=8, min_new_tokens=k + 1, pad_token_id=engine.pad_id,
            eos_token_id=[likes], top_k=None, top_p=None, temperature=None if sampling is None else 1.0,
        )  # fmt: skip
        ref_rows = [
            completion(engine.tokenizer, {likes}, row) for row in ref[:, enc["input_ids"].shape[1] :].tolist()
        ]
        assert [g.token_ids for g in ours] == [g.token_ids for g in ref_rows]
        assert all(g.num_tokens >= k + 2 for g in ours)  # k+1 tokens, then EOS at the earliest
    engine.min_new_tokens = 0
    assert engine._generate_texts(texts, 8, True)[0].num_tokens == k + 1  # without the hold: EOS there


def test_hold_eos_in_generate_gives_what_min_new_tokens_gives(tiny_model):
    """TRL calls generate itself: the wrapped generate holds EOS the same way, greedy and sampled, with
    the call's own generation config (TRL's)."""
    from transformers import GenerationConfig

    engine = HFEngine(tiny_model, dtype="float32", device="cpu")
    model = engine.model
    enc = engine.tokenizer(
        ["Solve: 3 + 5", "abc"], return_tensors="pt", padding=True, return_token_type_ids=False
    )
    new = slice(enc["input_ids"].shape[1], None)
    base = {"max_new_tokens": 8, "top_k": None, "top_p": None, "pad_token_id": engine.pad_id}
    greedy = {**base, "do_sample": False, "temperature": None}
    free = model.generate(**enc, generation_config=GenerationConfig(**greedy, eos_token_id=engine.pad_id))
    k, likes = _eos_at(free[0, new].tolist())  # as EOS: row 0 would stop at its (k+1)th token unheld
    sampled = {**base, "do_sample": True, "temperature": 1.0, "num_return_sequences": 3}
    want = {}
    for name, cfg in (("greedy", greedy), ("sampled", sampled)):
        torch.manual_seed(5)
        want[name] = model.generate(
            **enc, generation_config=GenerationConfig(**cfg, eos_token_id=likes, min_new_tokens=k + 1)
        )
    hold_eos_in_generate(model, k + 1)
    for name, cfg in (("greedy", greedy), ("sampled", sampled)):
        torch.manual_seed(5)
        got = model.generate(**enc, generation_config=GenerationConfig(**cfg, eos_token_id=likes))
        assert torch.equal(got, want[name])
        assert (got[:, new][:, : k + 1] != likes).all()


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


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_greedy_loop_gives_transformers_tokens(tiny_model, dtype, monkeypatch):
    """The engine's greedy loop (engines/greedy.py: no float32 copy of the logits) against transformers'
    own loop (ESFT_GREEDY_LOOP=off): the same tokens with left padding, EOS stops (the tiny model's free
    completions end early), the --fixed-length hold, several members' noise (population hooks) and
    a processor that needs the float32 copy (a repetition penalty)."""
    from esft.engines.greedy import greedy_kwargs
    from esft.es import ParamSet, iteration_members
    from esft.es.lowrank import lowrank_trainable

    texts = ["Solve: 3 + 5", "The answer is <answer> (1 + 2)", "abc", "<think> reasoning"]

    def run(engine):
        got = [g.token_ids for g in engine._generate_texts(texts, 12, True)]
        engine.min_new_tokens = 12
        got += [g.token_ids for g in engine._generate_texts(texts, 12, True)]
        engine.min_new_tokens = 0
        params = ParamSet(lowrank_trainable(engine.parameters()), scheme="lowrank")
        members = iteration_members(7, 0, 4)
        got += [
            g.token_ids for m in engine.generate_population(texts[:2], members, params, 0.05, 12) for g in m
        ]
        enc = engine.tokenizer(texts, return_tensors="pt", padding=True, return_token_type_ids=False)
        ours = engine.model.generate(**enc, do_sample=False, max_new_tokens=12, repetition_penalty=1.3,
                                     pad_token_id=engine.pad_id, **engine._greedy)  # fmt: skip
        return got, ours

    fast = HFEngine(tiny_model, dtype=dtype, device="cpu")
    if transformers_major() < 5 and not fast._greedy:
        pytest.skip(
            f"transformers {transformers.__version__} runs no callable decoding loop: the engine uses its own"
        )
    assert fast._greedy == greedy_kwargs(fast.model) != {}  # this transformers runs the loop
    monkeypatch.setenv("ESFT_GREEDY_LOOP", "off")
    plain = HFEngine(tiny_model, dtype=dtype, device="cpu")
    assert plain._greedy == {}
    # "EOS" := row 0's 6th free token, so that row stops early while the others go on
    likes = plain._generate_texts(texts, 12, True)[0].token_ids[5]
    plain.eos_ids = fast.eos_ids = {likes}
    (want, want_penalised), (got, got_penalised) = run(plain), run(fast)
    assert got == want
    assert torch.equal(got_penalised, want_penalised)
    assert len(want[0]) == 6 and max(len(t) for t in want[:4]) == 12  # a stop at EOS, beside longer rows
    assert len({tuple(t) for t in want[8:]}) > 1  # the members' noise changed some completions
