import time

import pytest

from esft.errors import DataError
from esft.tasks import load_task
from esft.tasks.extract import last_boxed, last_number
from esft.tasks.math_tasks import grade_gsm8k, grade_math

LONG = "blah " * 20_000

MATH_CASES = [
    # (completion, reference, reward)
    ("so the answer is \\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 1.0),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\dfrac12}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\frac12}", "0.5", 1.0),
    ("\\boxed{50\\%}", "\\frac{1}{2}", 1.0),
    ("\\fbox{1024}", "1024", 1.0),
    ("\\boxed 6", "6", 1.0),
    ("\\boxed{1+x^2}", "x^2+1", 1.0),
    ("\\boxed{x^2 + 2x + 1}", "x^2+2x+1", 1.0),
    ("\\boxed{5\\sqrt{2}}", "5\\sqrt{2}", 1.0),
    ("\\boxed{\\sqrt{50}}", "5\\sqrt{2}", 1.0),
    ("first \\boxed{3} then \\boxed{5}", "5", 1.0),  # the last box counts
    ("first \\boxed{5} then \\boxed{3}", "5", 0.0),
    ("\\boxed{0.51}", "\\frac{1}{2}", 0.0),  # near miss
    ("\\boxed{\\frac{1}{3}}", "\\frac{1}{2}", 0.0),
    ("\\boxed{721}", "720", 0.0),
    ("The answer is 5.", "5", 0.0),  # no box
    ("\\boxed{5", "5", 0.0),  # unbalanced
    ("\\boxed{}", "5", 0.0),
    ("", "5", 0.0),
    (LONG + "\\boxed{5}", "5", 1.0),  # very long output, boxed at the end
    (LONG, "5", 0.0),
    ("\\boxed{" + "9" * 5000 + "}", "5", 0.0),  # implausibly long answer
    ("\\boxed{\\frac{1}{2}}", "\\boxed{\\frac{1}{2}}", 1.0),  # boxed reference
]


@pytest.mark.parametrize("completion,reference,reward", MATH_CASES)
def test_math_grader_table(completion, reference, reward):
    t = time.perf_counter()
    assert grade_math(completion, reference) == reward
    assert time.perf_counter() - t < 10


GSM_REF = "They eat 6 slices.\n#### 1,200"
GSM_CASES = [
    ("The total is \\boxed{1200}.", 1.0),
    ("The total is \\boxed{1,200}", 1.0),
    ("So she has $1,200.", 1.0),  # last number
    ("1200.0", 1.0),
    ("\\boxed{\\$1200}", 1.0),  # a LaTeX dollar sign inside the box
    ("I think 1200, no wait, 1300", 0.0),
    ("\\boxed{1201}", 0.0),
    ("", 0.0),
    ("no numbers here", 0.0),
    (LONG + " 1200", 1.0),
]


@pytest.mark.parametrize("completion,reward", GSM_CASES)
def test_gsm8k_grader_table(completion, reward):
    assert grade_gsm8k(completion, GSM_REF) == reward


def test_gsm8k_negative_and_decimal_references():
    assert grade_gsm8k("it is -7 degrees", "#### -7") == 1.0
    assert grade_gsm8k("\\boxed{0.25}", "#### 0.25") == 1.0
    assert grade_gsm8k("\\boxed{.25}", "#### 0.25") == 1.0


def test_extractors():
    assert last_boxed("a \\boxed{\\frac{a}{b}} b") == "\\frac{a}{b}"
    assert last_boxed("\\boxed{{x}}") == "{x}"
    assert last_boxed("nothing") is None
    assert last_number("from 3 to -4.5 and $1,000") == "$1,000"


@pytest.mark.parametrize("name", ["math", "gsm8k"])
def test_builtin_samples_load_with_splits(name):
    task = load_task(name)
    assert task.train and task.test
    row = task.test[0]
    assert row["prompt"][0]["content"].startswith("Please reason step by step")
    ok = task.score([row], ["\\boxed{" + (row["answer"].rsplit("####", 1)[-1].strip()) + "}"])
    assert ok.total == [1.0] and task.summary(ok)["accuracy"] == 1.0


def test_math_user_file_needs_problem_and_answer(tmp_path):
    from esft.errors import DataError

    f = tmp_path / "m.jsonl"
    f.write_text('{"question": "1+1?", "answer": "2"}\n{"question": "2+2?"}\n')
    with pytest.raises(DataError, match="row 2"):
        load_task("math", data_file=str(f)).split("train")


def test_hub_dataset_rows_are_mapped(monkeypatch):
    """dataset=<name>: rows come from read_hub with the right splits; MATH solutions give the answer."""
    import esft.tasks.math_tasks as mt

    calls = []

    def fake_read_hub(name, split, config=None):
        calls.append((name, split, config))
        return [
            {"problem": "1+1?", "solution": "It is \\boxed{2}."},
            {"question": "2+2?", "answer": "#### 4"},
        ]

    monkeypatch.setattr(mt, "read_hub", fake_read_hub)
    task = load_task("math", dataset="org/math", dataset_config="cfg", test_split="validation")
    test = task.test
    assert calls == [("org/math", "validation", "cfg")]
    assert [r["answer"] for r in test] == ["2", "#### 4"]
    assert test[0]["prompt"][1]["content"] == "1+1?"
    assert task.train and calls[-1] == ("org/math", "train", "cfg")


def test_hub_dataset_without_answers_is_a_data_error(monkeypatch):
    import esft.tasks.math_tasks as mt

    monkeypatch.setattr(
        mt, "read_hub", lambda name, split, config=None: [{"problem": "x", "solution": "no box"}]
    )
    with pytest.raises(DataError, match="row 1 needs"):
        load_task("math", dataset="org/math").split("train")


def test_hub_dataset_and_file_together_is_an_error(tmp_path):
    with pytest.raises(DataError, match="not both"):
        load_task("gsm8k", dataset="openai/gsm8k", data_file=str(tmp_path / "x.jsonl"))


def test_unreachable_hub_gives_one_line_error(monkeypatch):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="cannot load the Hugging Face dataset 'openai/gsm8k'") as e:
        load_task("gsm8k", dataset="openai/gsm8k", dataset_config="main").split("train")
    assert "\n" not in str(e.value)
