"""Pulling final answers out of model output: <answer> tags, \\boxed{...}, the last number.

Model output is untrusted: every function here is linear-time string scanning with length caps, never
evaluation.
"""

from __future__ import annotations

import re

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_NUMBER_RE = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\.\d+")
MAX_ANSWER_CHARS = 2000


def last_answer_tag(text: str) -> str | None:
    """Content of the last complete <answer>...</answer>, stripped; None when there is none."""
    found = _ANSWER_RE.findall(text)
    return found[-1].strip() if found else None


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` or ``\\fbox{...}`` (braces matched), or ``\\boxed 5``.

    None when there is no complete boxed expression or its content is implausibly long.
    """
    starts = [m for m in re.finditer(r"\\(?:boxed|fbox)\s*", text)]
    for m in reversed(starts):
        i = m.end()
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, min(len(text), i + MAX_ANSWER_CHARS + 2)):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1 : j].strip()
            continue  # unbalanced or too long: try an earlier box
        if m.group(0).endswith(" ") or m.group(0).endswith("\t"):
            token = re.match(r"[^\s$]+", text[i:])
            if token:
                return token.group(0)
    return None


def normalize_number(text: str) -> float | None:
    """``'1,234.5'`` / ``'$12'`` / ``'-3'`` -> float; None when it is not a plain number."""
    t = text.strip().replace(",", "").replace("\\$", "").replace("$", "").rstrip(".")
    if t.endswith("%"):
        t = t[:-1]
    try:
        return float(t)
    except ValueError:
        return None


def last_number(text: str) -> str | None:
    """The last number in ``text`` (commas and a leading $ allowed), as written."""
    found = _NUMBER_RE.findall(text[-MAX_ANSWER_CHARS:])
    return found[-1] if found else None


def format_score(text: str, prefilled_think: bool = True) -> float:
    """The paper's format score for <think>...</think>\\n<answer>...</answer> (Countdown, Sudoku).

    1.0 for exactly that layout; else 0.1 for a think block plus 0.5 for an answer block. When the
    prompt pre-filled ``<think>``, the completion is scored as if it began with it (as the paper's code).
    """
    if prefilled_think:
        text = "<think>" + text
    if re.match(r"^<think>.*?</think>\n<answer>.*?</answer>$", text, re.DOTALL):
        return 1.0
    score = 0.0
    if re.search(r"<think>.*?</think>", text, re.DOTALL):
        score += 0.1
    if _ANSWER_RE.search(text):
        score += 0.5
    return score
