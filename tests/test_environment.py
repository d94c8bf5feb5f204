"""environment.json's record of esft's own code: the version, and the commit from a git checkout."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from esft import environment


@pytest.fixture(autouse=True)
def fresh():
    environment.esft_source.cache_clear()
    yield
    environment.esft_source.cache_clear()


def fake_git(top: Path, commit: str = "0123456789ab", status: str = ""):
    def git(folder: Path, *args: str) -> str:
        if args[:1] == ("rev-parse",):
            return str(top) if args[1] == "--show-toplevel" else commit
        return status

    return git


def test_a_checkout_gives_the_commit_and_whether_src_differs(monkeypatch):
    top = Path(environment.__file__).resolve().parents[2]
    version = environment._version("esft")
    monkeypatch.setattr(environment, "_git", fake_git(top))
    assert environment.esft_source() == f"{version} (git 0123456789ab)"
    environment.esft_source.cache_clear()
    monkeypatch.setattr(environment, "_git", fake_git(top, status=" M src/esft/trainer.py"))
    assert environment.esft_source() == f"{version} (git 0123456789ab+modified)"


def test_no_git_or_another_repository_gives_the_version_alone(monkeypatch, tmp_path):
    version = environment._version("esft")
    monkeypatch.setattr(environment, "_git", fake_git(tmp_path))  # esft installed inside another repo
    assert environment.esft_source() == version
    environment.esft_source.cache_clear()

    def no_git(folder, *args):
        raise FileNotFoundError("git")

    monkeypatch.setattr(environment, "_git", no_git)
    assert environment.esft_source() == version
    environment.esft_source.cache_clear()

    def not_a_checkout(folder, *args):
        raise subprocess.CalledProcessError(128, "git")

    monkeypatch.setattr(environment, "_git", not_a_checkout)
    assert environment.esft_source() == version


def test_resume_keeps_every_earlier_source_once():
    said: list[str] = []
    now = {"esft": "0.2.0 (git c)"}
    environment.carry_source({"esft": "0.1.0 (git b)", "esft_earlier": ["0.1.0 (git a)"]}, now, said.append)
    assert now["esft_earlier"] == ["0.1.0 (git a)", "0.1.0 (git b)"]
    assert len(said) == 1 and "0.2.0 (git c)" in said[0] and "last started with 0.1.0 (git b)" in said[0]
    # back to an earlier code: it is the current one, not an earlier one; the rest stay in order
    again = {"esft": "0.1.0 (git a)"}
    environment.carry_source({**now}, again, said.append)
    assert again["esft_earlier"] == ["0.1.0 (git b)", "0.2.0 (git c)"]
    # a run recorded before esft's code was: nothing to compare, nothing said
    fresh_now = {"esft": "0.2.0 (git c)"}
    environment.carry_source({"device": "cpu"}, fresh_now, said.append)
    assert "esft_earlier" not in fresh_now and len(said) == 2


class _Broadcast:
    def __init__(self, answers: dict[int, dict]) -> None:
        self.answers = answers

    def broadcast(self, *args):
        return self.answers


def test_ray_workers_on_different_esft_code_are_refused_with_what_to_align():
    from esft.distributed.pool import WorkerPool
    from esft.errors import ConfigError

    env = {"device": "cpu", "torch": "2.13.0+cpu", "esft": "0.1.0 (git 0123456789ab)"}
    pool = object.__new__(WorkerPool)  # describe_environment needs only the workers' answers
    pool.calls = _Broadcast({0: env, 1: dict(env)})
    assert pool.describe_environment("hf", "model") == env
    pool.calls = _Broadcast({0: env, 1: {**env, "esft": "0.1.0 (git 0123456789ab+modified)"}})
    with pytest.raises(
        ConfigError,
        match=r"workers 0 and 1 .*esft '0.1.0 \(git 0123456789ab\)' vs .*\+modified.*same esft code",
    ):
        pool.describe_environment("hf", "model")
    pool.calls = _Broadcast({0: env, 1: {**env, "torch": "2.12.0+cpu"}})
    with pytest.raises(ConfigError, match="torch") as refused:
        pool.describe_environment("hf", "model")
    assert "esft code" not in str(refused.value)
