"""reasoning-gym graders evaluate answer text (eval, sympy's parse_expr). esft grades every answer in
the sandbox: a hostile answer runs nothing and writes nothing on the host, for every dataset in the
registry, and honest answers keep the scores reasoning-gym gives them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.usefixtures("needs_bwrap")


def _payloads(target: str) -> list[str]:
    return [
        f"__import__('os').system('touch {target}-system')",
        f"__import__('pathlib').Path('{target}-pathlib').touch()",
        f"open('{target}-open', 'w').write('x')",
        f"[[1, 2], [3, 4]] if __import__('os').system('touch {target}-list') else 0",
        f"exec(\"import os; os.system('touch {target}-exec')\")",
    ]


def _entries() -> dict[str, dict]:
    import reasoning_gym
    import reasoning_gym.factory as factory
    from reasoning_gym.composite import DatasetSpec

    out = {}
    for name in sorted(factory.DATASETS):
        if name == "composite":
            specs = [DatasetSpec("spiral_matrix", 1.0, {}), DatasetSpec("leg_counting", 1.0, {})]
            out[name] = reasoning_gym.create_dataset(name, size=1, seed=3, datasets=specs)[0]
        else:
            out[name] = reasoning_gym.create_dataset(name, size=1, seed=3)[0]
    return out


@pytest.fixture(scope="module")
def entries():
    return _entries()


def test_control_the_graders_do_execute_answers(tmp_path):
    """Without esft's sandbox, reasoning-gym's own grader runs the payload (so the test below means
    something). Run in a throwaway subprocess pointed at tmp_path."""
    target = str(tmp_path / "ran")
    code = (
        "import reasoning_gym\n"
        "e = reasoning_gym.create_dataset('spiral_matrix', size=1, seed=3)[0]\n"
        "f = reasoning_gym.get_score_answer_fn('spiral_matrix')\n"
        f"f({_payloads(target)[0]!r}, e)\n"
    )
    subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert os.path.exists(target + "-system")


def test_hostile_answers_run_nothing_on_the_host_for_every_dataset(entries, tmp_path):
    import reasoning_gym

    from esft.tasks import rgym

    target = str(tmp_path / "pwned")
    tmp_before = set(os.listdir("/tmp"))
    assert len(entries) >= 100  # the whole registry
    mismatched = []
    for name, entry in entries.items():
        payloads = _payloads(target) + _payloads("/tmp/esft-rg-pwned")
        scores = rgym.score_answers(name, [entry["answer"], *payloads], [entry] * (1 + len(payloads)))
        grader_name = entry["metadata"]["source_dataset"] if name == "composite" else name
        expected = float(reasoning_gym.get_score_answer_fn(grader_name)(entry["answer"], entry))
        if abs(scores[0] - expected) > 1e-9:
            mismatched.append((name, scores[0], expected))
        assert all(0.0 <= s <= 1.0 for s in scores)
        assert not os.listdir(tmp_path), f"{name}: an answer wrote on the host"
    assert not mismatched, f"honest answers scored differently in the sandbox: {mismatched}"
    new = {n for n in set(os.listdir("/tmp")) - tmp_before if n.startswith("esft-rg")}
    assert not new


def test_rg_task_scores_through_the_sandbox(tmp_path):
    from esft.tasks import load_task

    task = load_task("rg:spiral_matrix", train_size=3, test_size=1, seed=1)
    row = task.train[0]
    target = str(tmp_path / "x")
    completions = [
        f" ok </think>\n<answer>{row['answer']}</answer>",
        f" ok </think>\n<answer>{_payloads(target)[0]}</answer>",
    ]
    scores = task.score([row, row], completions)
    assert scores.parts["answer"] == [1.0, 0.0]
    assert scores.failures == 0
    assert not os.listdir(tmp_path)


_WRITE_ALL = (
    "import os\n"
    "for fd in range(3, 64):\n"
    "    try:\n"
    '        os.write(fd, b\'{"ok": true, "value": 1.0}\')\n'
    "    except OSError:\n"
    "        pass\n"
    "os._exit(0)\n"
)
_PATCH_DUMPS = 'import json\njson.dumps = lambda *a, **k: \'{"ok": true, "value": VALUE}\'\n'
FORGE = {
    "fake result on the pipe": f"exec({_WRITE_ALL!r})",
    "replace json.dumps": f"exec({_PATCH_DUMPS.replace('VALUE', '1.0')!r})",
    "return 1e999": f"exec({_PATCH_DUMPS.replace('VALUE', '1e999')!r})",
    "gold from the grader's frame": "__import__('sys')._getframe(1).f_locals['entry']['answer']",
    "gold from a local": "entry['answer']",
    "infinity": "1e999",
}


def _forge_scores(name: str, entry: dict) -> dict[str, float]:
    from esft.tasks import rgym

    scores = rgym.score_answers(name, list(FORGE.values()), [entry] * len(FORGE))
    return dict(zip(FORGE, scores, strict=True))


@pytest.mark.parametrize("name", ["countdown", "spiral_matrix"])
def test_control_forged_answers_score_without_the_host_check(entries, name, monkeypatch):
    """Without the host's grammar check, an answer that a grader evaluates forges its own score in the
    sandbox (so the test below means something)."""
    from esft.tasks import rg_answers

    monkeypatch.setattr(rg_answers, "admissible", lambda *a: True)
    scores = _forge_scores(name, entries[name])
    assert scores["fake result on the pipe"] == 1.0 and scores["replace json.dumps"] == 1.0, scores
    assert scores["return 1e999"] == 0.0  # the host refuses a non-finite result by itself


def test_forged_answers_score_exactly_zero_on_every_evaluating_dataset(entries):
    from esft.tasks import rg_answers

    for name in sorted(rg_answers.EVALUATING):
        scores = _forge_scores(name, entries[name])
        assert scores == dict.fromkeys(FORGE, 0.0), (name, scores)


def test_hostile_answers_score_exactly_zero(entries, tmp_path):
    """The payloads of the test above score 0, not merely a number in [0, 1], on every dataset whose
    grader evaluates answers (elsewhere they are just wrong text)."""
    from esft.tasks import rg_answers, rgym

    payloads = _payloads(str(tmp_path / "pwned"))
    for name in sorted(rg_answers.EVALUATING):
        assert rgym.score_answers(name, payloads, [entries[name]] * len(payloads)) == [0.0] * len(payloads)
    assert not os.listdir(tmp_path)
