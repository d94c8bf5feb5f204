"""The fused update (es/fused.py): the compiled one-pass kernels (inductor's, and the C kernel of
es/native.py for stochastic rounding on the CPU) give the eager update's weights bit for bit in every
precision mode, statistics that agree with it (and with the exact sums) for any thread count, and an
eager update with a one-line note wherever compiling fails."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from esft.errors import ConfigError
from esft.es import fused, native
from esft.es import precision as prec
from esft.es.noise import Member
from esft.es.params import ParamSet

# inductor compiles CPU kernels with a C++ compiler; .ci/run installs one (CI never skips)
needs_compiler = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "g++")) is None and os.environ.get("CI") != "true",
    reason="no C++ compiler (g++): torch.compile cannot build the fused kernels here",
)


def _without_native(monkeypatch) -> None:
    """Stochastic rounding on the CPU through inductor's kernel instead of the C one."""
    monkeypatch.setattr(native, "stochastic_bf16", lambda: None)


MEMBERS = [Member(s, g) for s in range(3) for g in (1, -1)]
WEIGHTS = [1.0, -0.5, 0.25, 0.75, -1.25, 0.0]

# (dtype, precision): every kernel, and fp16 stochastic, which has none (its tail is the whole update)
CASES = [
    (torch.bfloat16, "stochastic"),
    (torch.bfloat16, "nearest"),
    (torch.bfloat16, "master"),
    (torch.float32, "auto"),
    (torch.float16, "stochastic"),
]


def _params(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    # 130 columns: chunks are not whole BLOCK rows, so every matrix also has an eager tail
    shapes = {"a.weight": (48, 256), "b.weight": (37, 130), "b.bias": (37,), "c.weight": (300, 128)}
    return {n: (torch.randn(s, generator=gen) * 0.02).to(dtype) for n, s in shapes.items()}


def _run(monkeypatch, setting: str, dtype, precision, scheme, alpha=1e-3):
    monkeypatch.setenv(fused.ENV, setting)
    params = _params(dtype)
    ps = ParamSet(params, scheme=scheme, rank=2, precision=precision)
    stats = [ps.update(MEMBERS, WEIGHTS, alpha) for _ in range(2)]
    return params, ps, stats


@pytest.mark.parametrize(("dtype", "precision"), CASES)
@pytest.mark.parametrize("scheme", ["lowrank", "independent"])
def test_fused_update_gives_the_eager_weights_bit_for_bit(monkeypatch, dtype, precision, scheme):
    eager, eager_ps, eager_stats = _run(monkeypatch, "off", dtype, precision, scheme)
    fast, fast_ps, fast_stats = _run(monkeypatch, "on", dtype, precision, scheme)
    assert all(torch.equal(eager[n], fast[n]) for n in eager)
    assert all(torch.equal(eager_ps.pristine[n], fast_ps.pristine[n]) for n in eager)  # masters too
    assert any(not torch.equal(_params(dtype)[n], fast[n]) for n in fast), "the update changed nothing"
    for e, f in zip(eager_stats, fast_stats, strict=True):
        assert f.changed_fraction == e.changed_fraction and f.lost_fraction == e.lost_fraction
        for field in ("update_norm", "intended_norm", "step_cosine", "param_norm"):
            assert getattr(f, field) == pytest.approx(getattr(e, field), rel=1e-5), field


@pytest.mark.parametrize("scheme", ["lowrank", "independent"])
def test_inductor_stochastic_kernel_gives_the_eager_weights_too(monkeypatch, scheme):
    """The CUDA path (and the CPU's where no C kernel builds): inductor's stochastic kernel."""
    _without_native(monkeypatch)
    own = fused.Fused()
    import esft.es.params as params_module

    monkeypatch.setattr(params_module, "FUSED", own)
    eager, _, eager_stats = _run(monkeypatch, "off", torch.bfloat16, "stochastic", scheme)
    fast, _, fast_stats = _run(monkeypatch, "on", torch.bfloat16, "stochastic", scheme)
    assert all(torch.equal(eager[n], fast[n]) for n in eager)
    assert fast_stats[-1].changed_fraction == eager_stats[-1].changed_fraction
    kernel = own._kernels[("stochastic", torch.bfloat16, "cpu")]
    assert kernel is not None and not getattr(kernel, "native", False)


@needs_compiler
def test_the_fused_kernels_ran(monkeypatch):
    """The comparison above is not eager against eager: with the setting on, the kernels are built."""
    monkeypatch.setattr(fused, "FUSED", fused.Fused())
    import esft.es.params as params_module

    monkeypatch.setattr(params_module, "FUSED", fused.FUSED)
    _run(monkeypatch, "on", torch.bfloat16, "stochastic", "lowrank")
    assert fused.FUSED._kernels and all(k is not None for k in fused.FUSED._kernels.values())
    assert fused.FUSED._kernels[("stochastic", torch.bfloat16, "cpu")].native  # the C kernel on a CPU
    monkeypatch.setattr(fused, "FUSED", fused.Fused())
    monkeypatch.setattr(params_module, "FUSED", fused.FUSED)
    _run(monkeypatch, "off", torch.bfloat16, "stochastic", "lowrank")
    assert not fused.FUSED._kernels


@needs_compiler
@pytest.mark.parametrize("kernel", ["native", "inductor"])
def test_stochastic_kernel_matches_the_eager_rounding_past_2_31(monkeypatch, kernel):
    """The hash of coordinate offset+k wraps to int32 as the eager path's does (tensors of 2**31+
    values), and a run of updates keeps the bits."""
    if kernel == "inductor":
        _without_native(monkeypatch)
    monkeypatch.setattr(fused, "FUSED", fused.Fused())
    gen = torch.Generator().manual_seed(1)
    n = 64 * fused.BLOCK
    old = (torch.randn(n, generator=gen) * 0.02).bfloat16()
    intended = torch.randn(n, generator=gen) * 1e-5
    for offset in (0, (1 << 31) - 5 * fused.BLOCK, (1 << 33) + 7):
        stream = 0xDEADBEEF_12345678 + offset
        want = prec.stochastic_round(old.float() + intended, torch.bfloat16, stream, offset)
        got = old.clone()
        sums = fused.FUSED.apply("stochastic", got, got, intended, stream, offset)
        assert sums is not None and sums.dtype == torch.float64 and sums.shape == (6,)
        sums = sums.tolist()
        assert torch.equal(got.float(), want)
        applied = want - old.float()
        assert sums[5] == int(torch.count_nonzero(applied)) and sums[4] == int(torch.count_nonzero(intended))
        assert sums[0] == pytest.approx(float(old.double().pow(2).sum()), rel=1e-6)


@needs_compiler
def test_fused_statistics_are_exact_sums_and_independent_of_threads():
    gen = torch.Generator().manual_seed(2)
    n = 4096 * fused.BLOCK
    intended = torch.randn(n, generator=gen) * 1e-5
    base = (torch.randn(n, generator=gen) * 0.02).bfloat16()
    results, rounded = [], []
    threads = torch.get_num_threads()
    try:
        for t in (1, max(2, threads), 3):
            torch.set_num_threads(t)
            o = torch.zeros(n)
            results.append(fused.FUSED.apply("float32", o, o, intended, 0, 0).tolist())
            o = base.clone()
            rounded.append((fused.FUSED.apply("stochastic", o, o, intended, 5, 0).tolist(), o))  # C kernel
    finally:
        torch.set_num_threads(threads)
    assert results[0] == results[1] == results[2]
    assert rounded[0][0] == rounded[1][0] == rounded[2][0]
    assert torch.equal(rounded[0][1], rounded[1][1]) and torch.equal(rounded[0][1], rounded[2][1])
    exact = float(intended.double().pow(2).sum())
    sq_old, sq_intended, sq_applied, dot, wanted, moved = results[0]
    assert sq_old == 0.0
    assert sq_intended == pytest.approx(exact, rel=1e-8)  # a float32 norm over 512K values misses by ~1e-5
    assert sq_applied == pytest.approx(exact, rel=1e-6) and dot == pytest.approx(exact, rel=1e-6)
    assert wanted == moved == n


def test_a_platform_that_cannot_compile_updates_eagerly_with_one_note(monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler\nsecond line")

    monkeypatch.setattr(torch, "compile", broken)
    _without_native(monkeypatch)
    own = fused.Fused()
    o = torch.zeros(4 * fused.BLOCK, dtype=torch.bfloat16)
    assert own.apply("nearest", o, o, torch.ones(o.numel()), 0, 0) is None
    assert own.apply("stochastic", o, o, torch.ones(o.numel()), 0, 0) is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "RuntimeError: no C++ compiler" in err and "updating eagerly" in err
    assert torch.equal(o, torch.zeros_like(o))


def test_a_kernel_that_disagrees_with_the_eager_path_is_not_used(monkeypatch, capsys):
    def wrong(fn, **kwargs):
        def run(o, *args):
            out = fn(o, *args)
            o.view(-1)[0] += 1  # one coordinate off
            return out

        return run

    monkeypatch.setattr(torch, "compile", wrong)
    own = fused.Fused()
    o = torch.zeros(4 * fused.BLOCK)
    assert own.apply("float32", o, o, torch.ones(o.numel()), 0, 0) is None
    assert "differs from the eager one" in capsys.readouterr().err


def test_a_kernel_that_fails_later_leaves_the_update_to_the_eager_path(monkeypatch, capsys):
    """A recompile that fails after the self-check (a new shape, a new dtype) must not stop a run: that
    kernel is dropped, the chunk is updated eagerly, and the update's bits are the eager ones."""
    real = torch.compile
    calls = {"n": 0}

    def flaky(fn, **kwargs):
        compiled = real(fn, **kwargs)

        def run(*args):
            calls["n"] += 1
            if calls["n"] > 2:  # the self-check's two calls pass
                raise RuntimeError("recompile failed")
            return compiled(*args)

        return run

    own = fused.Fused()
    monkeypatch.setattr(fused, "FUSED", own)
    import esft.es.params as params_module

    monkeypatch.setattr(params_module, "FUSED", own)
    eager, _, eager_stats = _run(monkeypatch, "off", torch.bfloat16, "stochastic", "lowrank")
    monkeypatch.setattr(torch, "compile", flaky)
    _without_native(monkeypatch)
    fast, _, fast_stats = _run(monkeypatch, "on", torch.bfloat16, "stochastic", "lowrank")
    assert all(torch.equal(eager[n], fast[n]) for n in eager)
    assert fast_stats[-1].changed_fraction == eager_stats[-1].changed_fraction
    assert own._kernels and all(k is None for k in own._kernels.values())
    err = capsys.readouterr().err
    assert err.count("fused update kernel is unavailable") == 1 and "recompile failed" in err


def test_the_setting(monkeypatch):
    monkeypatch.setenv(fused.ENV, "auto")
    assert not fused.FUSED.enabled(fused.MIN_NUMEL - 1) and fused.FUSED.enabled(fused.MIN_NUMEL)
    monkeypatch.setenv(fused.ENV, "off")
    assert not fused.FUSED.enabled(math.inf)
    monkeypatch.setenv(fused.ENV, "ON")
    assert fused.FUSED.enabled(1)
    monkeypatch.setenv(fused.ENV, "yes")
    with pytest.raises(ConfigError, match="ESFT_FUSED_UPDATE must be auto, on or off"):
        fused.FUSED.enabled(1)


@pytest.mark.parametrize("precision", ["stochastic", "master"])
def test_a_run_trained_with_the_kernels_replays_and_resumes_without_them(
    tiny_model, tmp_path, capsys, monkeypatch, precision
):
    """End to end: bf16 training through the compiled update, resumed and replayed through the eager
    one (and the other way round), gives the same checkpoint bits."""
    from safetensors.torch import load_file
    from test_e2e import train

    from esft.cli import main

    extra = ("--dtype", "bfloat16", "--noise", "lowrank", "--update-precision", precision)
    straight, mixed = tmp_path / "straight", tmp_path / "mixed"
    import esft.es.params as params_module

    own = fused.Fused()
    monkeypatch.setattr(params_module, "FUSED", own)
    monkeypatch.setenv(fused.ENV, "on")
    assert train(tiny_model, straight, 3, *extra, "--checkpoint-every", "1") == 0
    assert own.built(), "the compiled kernels did not run"
    assert train(tiny_model, mixed, 1, *extra, "--checkpoint-every", "1") == 0
    monkeypatch.setenv(fused.ENV, "off")
    assert train(tiny_model, mixed, 3, *extra, "--checkpoint-every", "1", "--resume") == 0
    a = load_file(str(straight / "checkpoints" / "iter-000003" / "model.safetensors"))
    b = load_file(str(mixed / "checkpoints" / "iter-000003" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    assert main(["replay", "--run", str(straight), "--iteration", "3", "--quiet"]) == 0
    assert "bit-identical" in capsys.readouterr().out


@needs_compiler
def test_the_c_kernel_builds_once_into_the_cache_and_is_reused(monkeypatch, tmp_path):
    monkeypatch.setenv("ESFT_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_loaded", None)
    lib, why = native.library()
    assert lib is not None and why == ""
    (built,) = (tmp_path / "kernels").glob("update-*.so")
    stamp = built.stat().st_mtime_ns
    monkeypatch.setattr(native, "_loaded", None)  # a new process: the cached build is loaded, not rebuilt
    assert native.library()[0] is not None
    assert built.stat().st_mtime_ns == stamp and len(list((tmp_path / "kernels").iterdir())) == 1


def test_without_a_c_compiler_stochastic_rounding_uses_inductor(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("ESFT_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_loaded", None)
    monkeypatch.setattr(native, "_compiler", lambda: None)
    assert native.stochastic_bf16() is None and native.library()[1] == "no C compiler (cc, gcc or clang)"
    monkeypatch.setattr(native, "_loaded", None)
    monkeypatch.setattr(native, "_compiler", lambda: shutil.which("cc") or "cc")
    monkeypatch.setattr(native, "FLAGS", [*native.FLAGS, "--no-such-flag-esft"])
    lib, why = native.library()
    assert lib is None and why.startswith("the C kernel did not build: ") and "\n" not in why
    own = fused.Fused()
    o = torch.zeros(4 * fused.BLOCK, dtype=torch.bfloat16)
    want = prec.stochastic_round(torch.full((o.numel(),), 1e-3), torch.bfloat16, 9, 0)
    if shutil.which(os.environ.get("CXX", "g++")) is not None or os.environ.get("CI") == "true":
        assert own.apply("stochastic", o, o, torch.full((o.numel(),), 1e-3), 9, 0) is not None
        assert torch.equal(o.float(), want)
        assert not getattr(own._kernels[("stochastic", torch.bfloat16, "cpu")], "native", False)
    assert capsys.readouterr().err == ""  # inductor served: nothing to tell


@needs_compiler
def test_the_c_kernel_refuses_what_it_cannot_update():
    kernel = native.stochastic_bf16()
    key = torch.zeros(3, dtype=torch.int32)
    with pytest.raises(ValueError, match="contiguous"):
        kernel(torch.zeros(2, fused.BLOCK), torch.zeros(2, fused.BLOCK), key)  # float32 weights
    with pytest.raises(ValueError, match="contiguous"):
        kernel(torch.zeros(fused.BLOCK, 2, dtype=torch.bfloat16).T, torch.zeros(2, fused.BLOCK), key)


def _c_kernel_results(n_threads: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    kernel = native.stochastic_bf16()
    gen = torch.Generator().manual_seed(3)
    rows = 3000  # not a multiple of any thread count tried
    base = (torch.randn(rows, fused.BLOCK, generator=gen) * 0.02).bfloat16()
    intended = torch.randn(rows, fused.BLOCK, generator=gen) * 1e-5
    key = fused._hash_key((1 << 31) - 7 * fused.BLOCK, 0xABCDEF_0123, "cpu")
    out, threads = [], torch.get_num_threads()
    try:
        for t in n_threads:
            torch.set_num_threads(t)
            o = base.clone()
            out.append((o, kernel(o, intended, key)))
    finally:
        torch.set_num_threads(threads)
    return out


@needs_compiler
def test_the_c_kernel_runs_on_torchs_openmp_threads_where_the_compiler_has_openmp(monkeypatch, tmp_path):
    """gcc on Linux builds with -fopenmp, and the library then uses the process's libgomp, torch's: two
    OpenMP runtimes would each keep their threads (the kernel's beside torch's spinning ones)."""
    monkeypatch.setenv("ESFT_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_loaded", None)
    maps = Path("/proc/self/maps")
    if "OpenMP" not in torch.__config__.parallel_info() or shutil.which("gcc") is None or not maps.exists():
        pytest.skip("torch without OpenMP or no gcc: the POSIX-threads build serves")

    def runtimes() -> set[str]:
        return {line.split()[-1] for line in maps.read_text().splitlines() if "gomp" in line}

    before = runtimes()
    assert native.threading() == "openmp"
    after = runtimes()
    assert after == before  # loading the kernel brought no OpenMP runtime of its own
    # the one runtime is torch's; other packages may bring theirs only under their own hashed names
    # (scikit-learn's libgomp-<hash>.so), which nothing built with -fopenmp links to
    torch_dir = os.path.realpath(Path(torch.__file__).parent)
    assert any(p.startswith(torch_dir) for p in after), after
    foreign = {p for p in after if not p.startswith(torch_dir) and not Path(p).name.startswith("libgomp-")}
    assert not foreign, after


@needs_compiler
def test_the_posix_threads_build_gives_the_openmp_builds_bits(monkeypatch, tmp_path):
    """A compiler without OpenMP builds the kernel on POSIX threads: the same weights and row sums, for
    any thread count."""
    monkeypatch.setattr(native, "_loaded", None)
    reference = _c_kernel_results((1, 2, 3))
    monkeypatch.setenv("ESFT_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_loaded", None)
    monkeypatch.setattr(native, "OPENMP", ["--no-such-flag-esft"])
    assert native.threading() == "pthreads"
    for (o, sums), (o_ref, sums_ref) in zip(_c_kernel_results((1, 2, 3)), reference, strict=True):
        assert torch.equal(o, o_ref) and torch.equal(sums, sums_ref)
    assert torch.equal(reference[0][0], reference[2][0]) and torch.equal(reference[0][1], reference[2][1])
