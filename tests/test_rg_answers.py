"""esft.tasks.rg_answers: the host-side grammar in front of reasoning-gym graders that evaluate answers.

reasoning-gym's graders run here, in the test process, only on gold answers, honest rewrites of them
and two harmless demonstrations of the threat (a local name read through string_insertion's
``eval``; ``Integral(...)`` to the integration graders); hostile answers only ever go to
``admissible``.
"""

import ast
import functools
import importlib.metadata
import json
import math
import random
import re

import pytest
import reasoning_gym
import sympy
from reasoning_gym.composite import DatasetSpec

from esft.tasks.rg_answers import EVALUATING, MAX_CHARS, admissible, host_score

# How EVALUATING was found, for reasoning-gym 0.1.25 (re-do it when the version below changes):
#   RG=.venv/lib/python3.11/site-packages/reasoning_gym
#   grep -rnE '\beval\b|\bexec\b|literal_eval|sympify|parse_expr|numexpr|parse_latex|compile\(' \
#       $RG --include=*.py | grep -v contrib/bfit
#   grep -rlnE 'sympy|numexpr|\bast\b' $RG --include=*.py
# then reading every hit, and every dataset's score_answer (printed with inspect.getsource for each
# class in reasoning_gym.factory.DATASETS) with the helpers it calls, keeping the datasets where
# answer text reaches eval / parse_expr. Hits that do not evaluate answers: bitwise_arithmetic
# (evals the generated problem; the answer goes through int(s, 0)), number_sorting (evals only the
# gold, when json.loads fails), basic_arithmetic, decimal_arithmetic, gsm_symbolic and codeio (at
# generation), propositional_logic (its own parser, also named parse_expr), advanced_geometry and
# polynomial_equations (sympy at generation; float() on answers).
SURVEYED_VERSION = "0.1.25"
FOUND = {
    "binary_matrix": "eval(answer) when it is not the gold text",
    "spiral_matrix": "eval(answer) when it is not the gold text",
    "string_insertion": '"".join(eval(answer)) when it is not the gold text',
    "n_queens": "eval(answer) when it is not one of valid_answers",
    "polynomial_multiplication": "sympy parse_expr(answer)",
    "simple_integration": "sympy parse_expr(answer, local_dict={var, C})",
    "intermediate_integration": "sympy parse_expr(answer, local_dict={var, C})",
    "countdown": "sympy parse_expr(answer)",
    "puzzle24": "sympy parse_expr(answer)",
    "composite": "forwards to metadata['source_dataset']",
}
DATASETS = sorted(EVALUATING - {"composite"})
SEEDS = (0, 1, 2)
PER_SEED = 20


def test_evaluating_is_the_surveyed_list():
    assert importlib.metadata.version("reasoning_gym") == SURVEYED_VERSION, (
        "reasoning-gym changed: re-survey its graders (see the comment above) and update EVALUATING"
    )
    assert frozenset(FOUND) == EVALUATING
    assert set(reasoning_gym.factory.DATASETS) >= EVALUATING


@functools.cache
def _dataset(name: str, seed: int):
    return reasoning_gym.create_dataset(name, size=PER_SEED, seed=seed)


@functools.cache
def _entries(name: str) -> list[dict]:
    return [e for seed in SEEDS for e in _dataset(name, seed)]  # generating is slow: once


def _grade(name: str, answer: str, entry: dict) -> float:
    """reasoning-gym's own score (called directly: only for gold answers and honest rewrites)."""
    return _dataset(name, SEEDS[0]).score_answer(answer, entry)


def _pipeline(name: str, answer: str, entry: dict) -> float:
    """What a filtered grader gives: 0 for an inadmissible answer, else reasoning-gym's score."""
    return _grade(name, answer, entry) if admissible(name, answer, entry) else 0.0


def _antiderivative(entry: dict) -> str:
    """The worked answer, integrated here with sympy's real functions."""
    x = sympy.Symbol(entry["metadata"]["variable"])
    integrand = sympy.parse_expr(entry["metadata"]["integrand"], local_dict={str(x): x})
    return f"{sympy.integrate(integrand, x)} + C"


@pytest.mark.parametrize("name", DATASETS)
def test_gold_answers_are_admitted_and_keep_their_score(name):
    for entry in _entries(name):
        gold = entry["answer"]
        if name == "intermediate_integration" and "Integral(" in gold:
            # sympy could not integrate reasoning-gym's undefined cos/sin functions and left the gold
            # unevaluated; "Integral(f, x) + C" would score 1 on any problem, so it is refused, and the
            # worked antiderivative is admitted and scores 1
            assert not admissible(name, gold, entry)
            worked = _antiderivative(entry)
            assert "Integral" not in worked
            assert _pipeline(name, worked, entry) == _grade(name, worked, entry) == 1.0, worked
            continue
        assert admissible(name, gold, entry), gold
        assert _pipeline(name, gold, entry) == _grade(name, gold, entry) == 1.0, gold


def test_gold_answers_of_other_configs_are_admitted():
    configs = {
        "simple_integration": {"min_degree": -10, "max_degree": 10, "symbols": ("X",)},
        "intermediate_integration": {"symbols": ("X",), "max_poly_degree": 6, "linear_upper_bound": 30},
        "polynomial_multiplication": {
            "allow_cross_variable_product": True,
            "allow_multivariate_polynomials": True,
            "max_degree": 8,
            "max_value": 1000,
        },
        "n_queens": {"n": 6, "min_remove": 1, "max_remove": 5},
        "binary_matrix": {"min_n": 10, "max_n": 20},
        "string_insertion": {"min_string_length": 30, "max_string_length": 60},
    }
    for name, config in configs.items():
        for entry in reasoning_gym.create_dataset(name, size=15, seed=7, **config):
            if "Integral(" not in entry["answer"]:
                assert admissible(name, entry["answer"], entry), (name, entry["answer"])


def test_composite_resolves_to_the_source_dataset():
    names = [*DATASETS, "leg_counting", "game_of_life"]
    composite = reasoning_gym.create_dataset(
        "composite", size=60, seed=3, datasets=[DatasetSpec(n, 1.0, {}) for n in names]
    )
    sources = set()
    for entry in composite:
        sources.add(entry["metadata"]["source_dataset"])
        gold = entry["answer"]
        if "Integral(" in gold:
            assert not admissible("composite", gold, entry)
            continue
        assert admissible("composite", gold, entry), gold
        assert composite.score_answer(gold, entry) == 1.0
        hostile_admitted = admissible("composite", "__import__('os')", entry)
        assert hostile_admitted == (entry["metadata"]["source_dataset"] not in EVALUATING)
    assert len(sources) >= 8
    leg = _first_entry_of("leg_counting")
    assert admissible("composite", "__import__('os').system('x')", leg)  # no eval there: not checked
    assert not admissible("composite", "1", {"answer": "1"})  # which grader? refuse
    assert not admissible("composite", "1", {"answer": "1", "metadata": {"source_dataset": "composite"}})


def test_datasets_that_do_not_evaluate_are_not_checked():
    entry = _first_entry_of("leg_counting")
    for answer in ("__import__('os').system('x')", "x" * 100_000, "\x00", "banana", "infinite"):
        assert admissible("leg_counting", answer, entry)


@pytest.mark.parametrize("name", ["complex_arithmetic", "number_sorting", "leg_counting", "countdown"])
def test_nan_and_infinities_are_refused_everywhere(name):
    """complex_arithmetic scores NaN 1.0 (min(1, exp(-nan))), number_sorting a list of NaN."""
    entry = _first_entry_of(name)
    for answer in ("nan", "NaN", "[nan, nan, nan]", "-inf", "Infinity", "1e999", "3+inf*i", "2.5E+400"):
        assert not admissible(name, answer, entry), answer
    assert admissible(name, entry["answer"], entry)


def test_nan_really_scores_on_the_graders_it_is_refused_for():
    """The control: without the check, reasoning-gym's own graders give NaN full marks here."""
    entry = _first_entry_of("complex_arithmetic")
    assert reasoning_gym.get_score_answer_fn("complex_arithmetic")("nan", entry) == 1.0


def test_game_of_life_halting_is_scored_by_its_answer():
    """Its grader compares bool(answer) == bool(gold): any non-empty answer scored 1."""
    for entry in reasoning_gym.create_dataset("game_of_life_halting", size=6, seed=1):
        gold = entry["answer"]
        wrong = "True" if gold == "False" else "False"
        assert reasoning_gym.get_score_answer_fn("game_of_life_halting")(wrong, entry) == 1.0
        assert host_score("game_of_life_halting", wrong, entry) == 0.0
        assert host_score("game_of_life_halting", "whatever", entry) == 0.0
        assert host_score("game_of_life_halting", f" {gold.lower()} ", entry) == 1.0
    assert host_score("leg_counting", "3", _first_entry_of("leg_counting")) is None


@functools.cache
def _first_entry_of(name: str) -> dict:
    return reasoning_gym.create_dataset(name, size=1, seed=0)[0]


def _first(name: str, where=lambda e: True) -> dict:
    return next(e for e in _entries(name) if where(e))


def _rows(text: str) -> list[list[str]]:
    return [row.split() for row in text.split("\n")]


def _cases():
    """(dataset, entry, honest rewrite, reasoning-gym's score for it)."""
    e = _first("binary_matrix")
    yield "binary_matrix", e, str(e["metadata"]["solution"]), 0.1
    yield "binary_matrix", e, json.dumps(e["metadata"]["solution"]).replace(" ", ""), 0.1
    yield "binary_matrix", e, "[\n" + ",\n".join(map(str, e["metadata"]["solution"])) + "\n]", 0.1
    e = _first("spiral_matrix")
    yield "spiral_matrix", e, f"  {e['answer']}\n", 1.0
    yield "spiral_matrix", e, str(e["metadata"]["solution"]), 0.1
    yield "spiral_matrix", e, str(tuple(e["metadata"]["solution"])), 0.1
    yield "spiral_matrix", e, ", ".join(map(str, e["metadata"]["solution"])), 0.1
    e = _first("string_insertion")
    yield "string_insertion", e, str(list(e["answer"])), 0.1
    yield "string_insertion", e, json.dumps(list(e["answer"])), 0.1
    yield "string_insertion", e, repr(e["answer"]), 0.1
    e = _first("n_queens")
    yield "n_queens", e, str(_rows(e["answer"])), 0.5
    yield "n_queens", e, json.dumps(_rows(e["answer"])), 0.5
    yield "n_queens", e, str(["".join(r) for r in _rows(e["answer"])]), 0.5
    e = _first("polynomial_multiplication")
    yield "polynomial_multiplication", e, e["answer"].replace(" ", ""), 1.0
    yield "polynomial_multiplication", e, re.sub(r"\*\*(\d+)", r"**(\1)", e["answer"]), 1.0
    e = _first("simple_integration")
    yield "simple_integration", e, e["answer"].replace(" + C", ""), 1.0
    yield "simple_integration", e, "  " + e["answer"].replace(" ", "") + " ", 1.0
    e = _first("intermediate_integration", lambda e: "exp(" in e["answer"])
    yield "intermediate_integration", e, e["answer"].replace("exp(", "E**("), 1.0
    e = _first("intermediate_integration", lambda e: "log(" in e["answer"])
    yield "intermediate_integration", e, e["answer"].replace("log(", "ln("), 1.0
    e = _first("intermediate_integration", lambda e: "**(3/2)" in e["answer"])
    yield "intermediate_integration", e, e["answer"].replace("**(3/2)", " ** ( 3 / 2 )"), 1.0
    for name in ("countdown", "puzzle24"):
        e = _first(name)
        yield name, e, e["answer"].replace(" ", ""), 1.0
        yield name, e, f" ( {e['answer']} )\n", 1.0


@pytest.mark.parametrize("case", list(_cases()), ids=lambda c: c[0])
def test_honest_rewrites_stay_admissible(case):
    name, entry, answer, score = case
    assert admissible(name, answer, entry), answer
    assert _pipeline(name, answer, entry) == pytest.approx(score)


def test_refused_rewrites_score_nothing_with_the_grader_either():
    e = _first("polynomial_multiplication")
    x = e["metadata"]["variables"][0]
    for answer in (e["answer"].replace("**", "^"), e["answer"].replace("*" + x, x)):
        assert not admissible("polynomial_multiplication", answer, e)
        assert _grade("polynomial_multiplication", answer, e) == 0.0
    e = _first("simple_integration")
    answer = e["answer"].replace("**", "^")
    assert not admissible("simple_integration", answer, e) and _grade("simple_integration", answer, e) == 0.0


def test_the_threat_a_bare_local_name_reads_the_gold():
    # run in this process on purpose: it only reads the grader's locals
    e = _first("string_insertion")
    for answer in ("oracle_answer", 'entry["answer"]'):
        assert _grade("string_insertion", answer, e) == 0.1  # reasoning-gym alone: partial credit
        assert _pipeline("string_insertion", answer, e) == 0.0


def test_integral_would_score_on_any_problem():
    for name in ("simple_integration", "intermediate_integration"):
        e = _first(name, lambda e: "Integral(" not in e["answer"])
        x = e["metadata"]["variable"]
        cheat = f"Integral({e['metadata']['integrand']}, {x}) + C"
        assert _grade(name, cheat, e) == 1.0  # reasoning-gym alone: full marks without integrating
        assert _pipeline(name, cheat, e) == 0.0


HOSTILE = [
    "__import__('os').system('x')",
    "open('f','w')",
    "[[1, 2], [3, 4]] if __import__('os').system('x') else 0",
    'exec("import os")',
    'eval("1")',
    'entry["answer"]',
    "entry['metadata']",
    "e",
    "answer",
    "oracle_answer",
    "self",
    "self.x",
    "entry",
    "a",
    "().__class__",
    "(1).real",
    "1 .real",
    "[1][0]",
    "__builtins__",
    "_",
    "1e999",
    "1E5",
    "0x10",
    "1j",
    "1_000",
    "inf",
    "-inf",
    "nan",
    "NaN",
    "Infinity",
    "[NaN]",
    "float('nan')",
    "float('inf')",
    "9**9**9**9",
    "(9**99)**99",
    "1" * 5000,
    "[" + "1" * 5000 + "]",
    "-" + "9" * 101,
    "1+" * 50_000 + "1",
    "x" * 100_000,
    "(" * 1000 + "1" + ")" * 1000,
    "[" * 1000 + "]" * 1000,
    "-" * 1000 + "1",
    "lambda: 0",
    "(lambda: 0)()",
    "'rm -rf /'",
    '"__import__"',
    "'''A'''",
    "f'{1}'",
    "b'A'",
    "[c for c in 'A']",
    "{'a': 1}",
    "{1}",
    "(x := 1)",
    "x = 1",
    "1; 2",
    "1 if 1 else 0",
    "not 1",
    "1 < 2",
    "1 // 2",
    "1 % 2",
    "1 & 2",
    "~1",
    "1 ^ 2",
    "import os",
    "sympify('x')",
    "S('x')",
    "Integral(1, x) + C",
    "globals()",
    "vars()",
    "breakpoint()",
    "\uff58**2",  # fullwidth x
    "\uff11+\uff11",  # fullwidth digits
    "\u0445",  # Cyrillic x
    "1\u00a0+ 1",  # no-break space
    "\u0661",  # Arabic-Indic digit one
    "\x00",
    "1\x00",
    "1\x0c+1",
    "1\\\n+1",
    "# comment",
    "1 # comment",
    "@",
    "$",
    "`1`",
    "",
    "   ",
]


@pytest.mark.parametrize("name", sorted(EVALUATING))
def test_hostile_answers_are_refused(name):
    entries = _entries_for_hostile(name)
    for entry in entries:
        for answer in HOSTILE:
            assert answer != entry["answer"]
            assert not admissible(name, answer, entry), (name, answer[:60])


def _entries_for_hostile(name: str) -> list[dict]:
    if name == "composite":  # an entry of each evaluating dataset, judged under the name "composite"
        return [_first(n) for n in DATASETS]
    return _entries(name)[:3]


@pytest.mark.parametrize(
    "name", ["polynomial_multiplication", "simple_integration", "intermediate_integration"]
)
def test_powers_stay_small(name):
    for entry in _entries(name)[:3]:
        x = entry["metadata"].get("variable") or entry["metadata"]["variables"][0]
        assert admissible(name, f"{x}**2 + {x}**(-3) + {x}**(3/2) + (2*{x} + 1)**3", entry)
        for answer in (
            f"{x}**9**9",
            f"{x}**(9**9**9)",
            f"{x}**(9**9)",
            f"{x}**1000",
            f"({x}**2)**3**2",
            f"(({x}**2)**2)**2",
            "2**(99*99)",
            f"{x}**",
            f"**{x}",
        ):
            assert not admissible(name, answer, entry), answer
    entry = _first("intermediate_integration")
    x = entry["metadata"]["variable"]
    assert admissible("intermediate_integration", f"E**(2*{x} + 1) + E**{x} + 2**{x}", entry)
    assert admissible("intermediate_integration", f"E**(-{x}**2) + C", entry)
    e = _first("polynomial_multiplication")
    y = e["metadata"]["variables"][0]
    assert not admissible("polynomial_multiplication", f"2**{y}", e)  # only literal exponents there


def test_calls_only_of_whitelisted_functions():
    e = _first("intermediate_integration")
    x = e["metadata"]["variable"]
    assert admissible("intermediate_integration", f"sin({x}) + cos(2*{x}) + log({x}, 2) + sqrt({x})", e)
    for answer in (f"sin {x}", "sin", f"{x}({x})", f"Abs({x})", f"sin({x})({x})", f"sin(({x})"):
        assert not admissible("intermediate_integration", answer, e), answer
    e = _first("simple_integration")
    assert not admissible("simple_integration", f"sin({e['metadata']['variable']})", e)


def test_length_cap_follows_the_gold():
    e = _first("countdown")
    long = "+".join(["1"] * (MAX_CHARS // 2))  # 1999 characters
    assert admissible("countdown", long, e)
    assert not admissible("countdown", long + "+1", e)


def test_no_answer_is_refused():
    e = _first("countdown")
    assert not admissible("countdown", None, e)  # type: ignore[arg-type]
    assert not admissible("countdown", "1", "not an entry")  # type: ignore[arg-type]


FRAGMENTS = [*"xXy()*/+-,[]. eEC_=j'\n", "**", "2", "10", "1.5", "99999", "'A'", "'_'", '"Q"', "sin", "exp"]
FRAGMENTS += ["log", "Integral", "if", "lambda"]
PYTHON_NODES = {ast.Expression, ast.Constant, ast.UnaryOp, ast.USub, ast.UAdd, ast.Load}
FAMILY_NODES = {
    "list": PYTHON_NODES | {ast.List, ast.Tuple},
    "arithmetic": PYTHON_NODES | {ast.BinOp, ast.Add, ast.Sub, ast.Mult, ast.Div},
    "sympy": PYTHON_NODES | {ast.BinOp, ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow, ast.Name, ast.Call},
}


@pytest.mark.parametrize("name", DATASETS)
def test_admitted_text_parses_to_harmless_python_only(name):
    """Fuzz: whatever random text is admitted, Python's parser (never run) sees only the family's
    literals and arithmetic, whitelisted names and calls of whitelisted functions."""
    family = {"countdown": "arithmetic", "puzzle24": "arithmetic"}.get(name, "list")
    family = "sympy" if "parse_expr" in FOUND[name] and family != "arithmetic" else family
    entry = _first(name)
    names = {entry["metadata"].get("variable"), *entry["metadata"].get("variables", ()), "C", "E"}
    functions = {"sin", "exp", "log"} if name == "intermediate_integration" else set()
    rnd, admitted = random.Random(name), 0
    for _ in range(8000):
        text = "".join(rnd.choice(FRAGMENTS) for _ in range(rnd.randint(1, 10)))
        if text == entry["answer"] or not admissible(name, text, entry):
            continue
        admitted += 1
        try:
            tree = ast.parse(text, mode="eval")
        except SyntaxError:
            continue  # the grader's eval fails too
        calls = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
        for node in ast.walk(tree):
            assert type(node) in FAMILY_NODES[family], (text, node)
            if isinstance(node, ast.Call):
                assert isinstance(node.func, ast.Name) and node.func.id in functions, text
                assert not node.keywords, text
            elif isinstance(node, ast.Name):
                assert node.id in (functions if id(node) in calls else names), text
            elif isinstance(node, ast.Constant):
                assert type(node.value) in (int, float, str), text
                assert not isinstance(node.value, float) or math.isfinite(node.value), text
                assert not isinstance(node.value, str) or name in ("string_insertion", "n_queens"), text
    assert admitted > 50
