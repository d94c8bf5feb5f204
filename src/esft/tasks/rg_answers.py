"""Host-side grammar check on answers before reasoning-gym graders that evaluate them see them.

Nine of reasoning-gym's graders (0.1.25) run the answer text as code: ``eval`` in binary_matrix,
spiral_matrix, string_insertion and n_queens (their fallback for answers written as Python lists);
sympy's ``parse_expr`` (itself ``eval``) in polynomial_multiplication, simple_integration,
intermediate_integration, countdown and puzzle24. ``composite`` forwards to the entry's
``metadata["source_dataset"]``. The sandbox (:mod:`esft.sandbox`) stops such an answer from reaching
the host, but not the grader's own process: evaluated there, it can forge its score (write a fake
result to the result pipe, patch ``json.dumps``, return ``1e999``) or read the gold answer from the
grader's frame (an answer ``entry["answer"]``, or a bare local name such as ``oracle_answer``, which
string_insertion's ``"".join(eval(answer))`` turns into the gold string).

So :func:`admissible` checks each answer on the host, before it is sent: an answer to an evaluating
dataset that does not match that dataset's strict grammar scores 0 and is never graded. The check is a
hand-written tokenizer and recursive-descent parser: the answer is never evaluated, compiled or given
to ``ast.literal_eval`` here. Every grammar is ASCII only (no fullwidth lookalikes, no NUL), at
most 2,000 characters (or 3x the gold answer, when that is longer), at most 16 nested brackets, and
numbers are plain decimals of at most 100 digits (no ``1e999``, ``0x``, ``1j``, ``1_0``). There are
no attribute dots, underscores, keywords or quotes outside string literals, and no names but the ones
each family needs; ``inf`` and ``nan`` are names and so refused (they are never right answers):

- **Python lists** (binary_matrix, spiral_matrix, string_insertion, n_queens): an answer equal to the
  gold (for spiral_matrix after ``strip``; for n_queens any of ``metadata["valid_answers"]``) is
  admitted as is, since the grader returns before its ``eval``. Otherwise: ints, string literals
  (only for string_insertion and n_queens, holding only characters of the gold answer, such as
  ``'A'`` or ``'_'``), lists and tuples of them. No names, calls, operators or subscripts.
- **Arithmetic** (countdown, puzzle24): numbers, ``+ - * /`` and parentheses. No ``**`` or ``^``
  (which sympy reads as XOR).
- **Sympy expressions** (polynomial_multiplication, simple_integration, intermediate_integration):
  numbers, the task's variables (``metadata["variable"]`` or ``["variables"]``), ``+ - * / **`` and
  parentheses; the integration tasks add the constant ``C``, and intermediate_integration the
  functions sin, cos, tan, exp, log, ln, sqrt, asin, acos, atan and Euler's ``E``. Only those
  functions may be called, and nothing else. A power's exponent is a small literal (at most 3 digits,
  e.g. ``2``, ``-3``, ``(3/2)``), or, for intermediate_integration (``E**(2*x)``), an expression in
  the variable; no towers (``9**9**9``), a number's power never raised again, and at most two
  powers nested. ``Integral`` is not admitted: ``Integral(<integrand>, x) + C`` would score 1 on
  every problem. (intermediate_integration builds some sin/cos integrands from undefined sympy
  functions that sympy cannot integrate, leaving about one gold answer in eight in that form: those
  are refused too, while the worked antiderivative is admitted.)

Honest answers keep their scores: the tests check that every evaluating dataset's gold answers (and
common rewrites: spacing, lists for the list graders, ``E**(x)`` for ``exp(x)``) are admitted and
graded as before. A refused answer scores 0 where countdown and puzzle24 give 0.01 to an answer they
cannot parse; rewrites refused here (``x^2``, ``2x``) score 0 with reasoning-gym too.
"""

from __future__ import annotations

import builtins
import keyword
import re
import string

MAX_CHARS = 2_000  # an answer longer than this (and than 3x its gold) is refused
MAX_DEPTH = 16  # nested brackets
MAX_DIGITS = 100  # digits in one number
MAX_EXPONENT_DIGITS = 3  # digits in a literal exponent
MAX_POWER_DEPTH = 2  # powers nested inside powers

_PY_LISTS = frozenset({"binary_matrix", "spiral_matrix", "string_insertion", "n_queens"})
_ARITHMETIC = frozenset({"countdown", "puzzle24"})
_SYMPY = frozenset({"polynomial_multiplication", "simple_integration", "intermediate_integration"})
EVALUATING: frozenset[str] = _PY_LISTS | _ARITHMETIC | _SYMPY | {"composite"}

_FUNCTIONS = {
    "intermediate_integration": frozenset(
        {"sin", "cos", "tan", "exp", "log", "ln", "sqrt", "asin", "acos", "atan"}
    ),
}
_CONSTANTS = {
    "simple_integration": frozenset({"C"}),
    "intermediate_integration": frozenset({"C", "E"}),
}
_GENERAL_EXPONENT = frozenset({"intermediate_integration"})  # E**(2*x + 1)

_SPACE = frozenset(" \t\r\n")
_DIGITS = frozenset(string.digits)
_LETTERS = frozenset(string.ascii_letters)
_ALNUM = _LETTERS | _DIGITS
_OPERATORS = frozenset("+-*/()[],")
_STRING_SAFE = frozenset(string.ascii_letters + string.digits + " _")  # inert inside a literal
_VARIABLE = re.compile(r"[A-Za-z][A-Za-z0-9]{0,7}")
_NOT_VARIABLES = frozenset(dir(builtins)) | frozenset(keyword.kwlist) | {"oo", "zoo", "nan", "inf"}


class _Reject(Exception):
    """The answer is outside the grammar."""


# NaN and infinities are never right answers, but some graders that do not evaluate answers still
# reward them: complex_arithmetic's min(1, exp(-distance)) is 1.0 for a NaN distance, and
# number_sorting accepts a list of NaN of the right length. Refused for every dataset (no gold
# answer of any dataset contains such a word or literal).
_NON_FINITE = re.compile(r"(?i)\b(nan|inf|infinity)\b|\d[eE][+-]?\d{3,}")


def source_dataset(dataset: str, entry: dict) -> str | None:
    """The dataset whose grader scores ``entry`` (``composite`` forwards to the entry's source)."""
    if dataset != "composite":
        return dataset
    metadata = entry.get("metadata") if isinstance(entry, dict) else None
    source = metadata.get("source_dataset") if isinstance(metadata, dict) else None
    return source if isinstance(source, str) and source != "composite" else None


def host_score(dataset: str, answer: str, entry: dict) -> float | None:
    """The score for graders esft replaces on the host, else None. game_of_life_halting's grader
    compares ``bool(answer) == bool(gold)``: every non-empty answer scores 1, so it is scored here
    by the answer itself (True or False, case and surrounding space ignored)."""
    if source_dataset(dataset, entry) == "game_of_life_halting":
        gold = str(entry.get("answer", "")).strip().lower()
        return 1.0 if isinstance(answer, str) and answer.strip().lower() == gold != "" else 0.0
    return None


def admissible(dataset: str, answer: str, entry: dict) -> bool:
    """True when ``answer`` may be sent to ``dataset``'s grader: for graders that do not evaluate
    answers, any answer without NaN or infinities; for those that do, only an answer that matches the
    dataset's grammar."""
    if not isinstance(answer, str) or not isinstance(entry, dict):
        return False
    source = source_dataset(dataset, entry)
    if source is None:
        return False  # cannot tell which grader will run: refuse
    dataset = source
    if _NON_FINITE.search(answer):
        return False
    if dataset not in EVALUATING:
        return True
    gold = entry.get("answer")
    gold = gold if isinstance(gold, str) else ""
    metadata = entry.get("metadata")
    metadata = metadata if isinstance(metadata, dict) else {}
    if dataset in _PY_LISTS and _graded_before_eval(dataset, answer, gold, metadata):
        return True
    if len(answer) > max(MAX_CHARS, 3 * len(gold)):
        return False
    try:
        if dataset in _PY_LISTS:
            strings = None
            if dataset in ("string_insertion", "n_queens"):
                strings = frozenset(gold) & _STRING_SAFE
            _ListParser(_tokenize(answer, strings)).parse()
        elif dataset in _ARITHMETIC:
            _ArithmeticParser(_tokenize(answer, None)).parse()
        else:
            _SympyParser(
                _tokenize(answer, None),
                variables=_variables(metadata),
                constants=_CONSTANTS.get(dataset, frozenset()),
                functions=_FUNCTIONS.get(dataset, frozenset()),
                general_exponent=dataset in _GENERAL_EXPONENT,
            ).parse()
    except _Reject:
        return False
    return True


def _graded_before_eval(dataset: str, answer: str, gold: str, metadata: dict) -> bool:
    """The grader's own exact-match test, which returns before it reaches ``eval``."""
    if dataset == "spiral_matrix":
        return answer.strip() == gold.strip() != ""
    if dataset == "n_queens":
        valid = metadata.get("valid_answers")
        return isinstance(valid, list) and any(isinstance(v, str) and v == answer for v in valid)
    return answer == gold != ""


def _variables(metadata: dict) -> frozenset[str]:
    """The task's variable names, as the generator recorded them (only plain, harmless names)."""
    names = metadata.get("variables")
    names = list(names) if isinstance(names, list | tuple) else []
    if isinstance(metadata.get("variable"), str):
        names.append(metadata["variable"])
    return frozenset(
        n
        for n in names
        if isinstance(n, str) and _VARIABLE.fullmatch(n) and not {n, n.lower()} & _NOT_VARIABLES
    )


def _tokenize(text: str, strings: frozenset[str] | None) -> list[tuple[str, str]]:
    """(kind, text) tokens: "num" (plain decimal), "name", "str" (a quoted literal of ``strings``'
    characters, only when ``strings`` is given) or an operator; anything else raises _Reject."""
    tokens: list[tuple[str, str]] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in _SPACE:
            i += 1
        elif c in _DIGITS:
            j = i
            while j < n and text[j] in _DIGITS:
                j += 1
            if j + 1 < n and text[j] == "." and text[j + 1] in _DIGITS:
                j += 1
                while j < n and text[j] in _DIGITS:
                    j += 1
            if j - i - ("." in text[i:j]) > MAX_DIGITS:
                raise _Reject
            tokens.append(("num", text[i:j]))
            i = j
        elif c in _LETTERS:
            j = i
            while j < n and text[j] in _ALNUM:
                j += 1
            tokens.append(("name", text[i:j]))
            i = j
        elif c == "*" and text.startswith("**", i):
            tokens.append(("**", "**"))
            i += 2
        elif c in _OPERATORS:
            tokens.append((c, c))
            i += 1
        elif c in "'\"" and strings is not None:
            j = i + 1
            while j < n and text[j] != c:
                if text[j] not in strings:
                    raise _Reject
                j += 1
            if j >= n:
                raise _Reject  # unterminated
            tokens.append(("str", text[i + 1 : j]))
            i = j + 1
        else:
            raise _Reject  # ".", "_", "=", "^", quotes, backslashes, non-ASCII, control characters
    return tokens


class _Parser:
    def __init__(self, tokens: list[tuple[str, str]]):
        self.tokens = tokens
        self.pos = 0
        self.depth = 0

    def peek(self) -> str:
        return self.tokens[self.pos][0] if self.pos < len(self.tokens) else "end"

    def take(self, kind: str) -> str:
        if self.peek() != kind:
            raise _Reject
        self.pos += 1
        return self.tokens[self.pos - 1][1]

    def enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _Reject

    def parse(self) -> None:
        if not self.tokens:
            raise _Reject
        self.top()
        if self.peek() != "end":
            raise _Reject

    def top(self) -> None:
        raise NotImplementedError


class _ListParser(_Parser):
    """item (',' item)* [','], where item := ['+'|'-'] int | str | '[' items ']' | '(' items ')'."""

    def top(self) -> None:
        self.items("end")

    def items(self, close: str) -> None:
        while self.peek() != close:
            self.item()
            if self.peek() != close:
                self.take(",")

    def item(self) -> None:
        kind = self.peek()
        if kind in ("[", "("):
            self.take(kind)
            self.enter()
            close = "]" if kind == "[" else ")"
            self.items(close)
            self.take(close)
            self.depth -= 1
            return
        if kind in ("+", "-"):
            self.take(kind)
            kind = "num"
        if kind == "str":
            self.take("str")
            return
        if "." in self.take("num"):
            raise _Reject  # the list graders hold ints


class _ArithmeticParser(_Parser):
    """expr := term (('+'|'-') term)*; term := unary (('*'|'/') unary)*;
    unary := ('+'|'-') unary | num | '(' expr ')'."""

    def top(self) -> None:
        self.expr()

    def expr(self) -> None:
        self.term()
        while self.peek() in ("+", "-"):
            self.take(self.peek())
            self.term()

    def term(self) -> None:
        self.unary()
        while self.peek() in ("*", "/"):
            self.take(self.peek())
            self.unary()

    def unary(self) -> None:
        self.enter()
        kind = self.peek()
        if kind in ("+", "-"):
            self.take(kind)
            self.unary()
        elif kind == "(":
            self.take("(")
            self.expr()
            self.take(")")
        else:
            self.take("num")
        self.depth -= 1


class _SympyParser(_Parser):
    """Python's expression grammar cut down to numbers, whitelisted names and calls, + - * / ** and
    parentheses. Each rule returns (mentions a variable, powers nested)."""

    def __init__(
        self,
        tokens: list[tuple[str, str]],
        variables: frozenset[str],
        constants: frozenset[str],
        functions: frozenset[str],
        general_exponent: bool,
    ):
        super().__init__(tokens)
        self.variables = variables
        self.constants = constants
        self.functions = functions
        self.general_exponent = general_exponent

    def top(self) -> None:
        self.expr()

    def expr(self) -> tuple[bool, int]:
        var, powers = self.term()
        while self.peek() in ("+", "-"):
            self.take(self.peek())
            v, p = self.term()
            var, powers = var or v, max(powers, p)
        return var, powers

    def term(self) -> tuple[bool, int]:
        var, powers = self.unary()
        while self.peek() in ("*", "/"):
            self.take(self.peek())
            v, p = self.unary()
            var, powers = var or v, max(powers, p)
        return var, powers

    def unary(self) -> tuple[bool, int]:
        self.enter()
        if self.peek() in ("+", "-"):
            self.take(self.peek())
            out = self.unary()
        else:
            out = self.power()
        self.depth -= 1
        return out

    def power(self) -> tuple[bool, int]:
        var, powers = self.primary()
        if self.peek() != "**":
            return var, powers
        self.take("**")
        if self.small_exponent():
            exp_powers = 0
        else:
            if not self.general_exponent:
                raise _Reject
            if self.peek() in ("+", "-"):
                self.take(self.peek())
            exp_var, exp_powers = self.primary()
            if not exp_var:
                raise _Reject  # a numeric exponent must be a small literal
        if not var and powers:
            raise _Reject  # (9**99)**99: a number's power raised again
        powers = max(powers, exp_powers) + 1
        if powers > MAX_POWER_DEPTH or self.peek() == "**":
            raise _Reject  # towers: 9**9**9
        return var, powers

    def small_exponent(self) -> bool:
        """Consume ['+'|'-'] num, or '(' ['+'|'-'] num ['/' num] ')', of short numbers, if next."""
        start = self.pos
        parens = self.peek() == "("
        if parens:
            self.take("(")
        if self.peek() in ("+", "-"):
            self.take(self.peek())
        if self.peek() == "num" and len(self.take("num")) <= MAX_EXPONENT_DIGITS:
            if parens and self.peek() == "/":
                self.take("/")
                ok = self.peek() == "num" and len(self.take("num")) <= MAX_EXPONENT_DIGITS
            else:
                ok = True
            if ok and (not parens or self.peek() == ")"):
                if parens:
                    self.take(")")
                return True
        self.pos = start
        return False

    def primary(self) -> tuple[bool, int]:
        self.enter()
        kind = self.peek()
        if kind == "num":
            self.take("num")
            out = (False, 0)
        elif kind == "(":
            self.take("(")
            out = self.expr()
            self.take(")")
        else:
            name = self.take("name")
            if name in self.functions:
                self.take("(")
                out = self.expr()
                if self.peek() == ",":  # log(x, 2)
                    self.take(",")
                    v, p = self.expr()
                    out = (out[0] or v, max(out[1], p))
                self.take(")")
            elif name in self.variables:
                out = (True, 0)
            elif name in self.constants:
                out = (False, 0)
            else:
                raise _Reject
        self.depth -= 1
        return out
