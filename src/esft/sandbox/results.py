"""The host's reading of what a sandbox sends back: JSON (never pickle), parsed only after its nesting
is bounded, with NaN, infinities and over-long ints refused; and a job's result document."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from esft.sandbox.config import Limits, SandboxResult

MAX_INT_DIGITS = 18

_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def loads_bounded(data: bytes, max_depth: int) -> Any:
    """JSON from the sandbox, parsed only after its nesting is known to be at most ``max_depth``
    (Python's parser recurses, so deep nesting would raise RecursionError in the host). NaN,
    infinities (also a float literal too large to represent) and ints of more than MAX_INT_DIGITS
    digits are refused. Raises ValueError for anything else than such JSON."""
    depth = 0
    for m in _TOKENS.finditer(data):
        c = m.group()
        if c in (b"[", b"{"):
            depth += 1
            if depth > max_depth:
                raise ValueError(f"JSON nested deeper than {max_depth}")
        elif c in (b"]", b"}"):
            depth -= 1
    try:
        return json.loads(
            data.decode("utf-8"),
            parse_constant=_refuse_constant,
            parse_float=_finite_float,
            parse_int=_bounded_int,
        )
    except RecursionError:  # the scan above should make this impossible: still not the caller's problem
        raise ValueError("JSON nested too deeply") from None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a result")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("a non-finite number is not a result")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an int of more than {MAX_INT_DIGITS} digits is not a result")
    return int(text)


def parse_result(payload: bytes, limits: Limits) -> SandboxResult:
    """The job's result document: ``{"ok": true, "value": ...}`` or ``{"ok": false, "error": ...}``."""
    try:
        status = loads_bounded(payload, max_depth=limits.max_depth + 1)
    except ValueError as e:
        return SandboxResult(False, error=f"unreadable result: {str(e)[:200]}")
    if not isinstance(status, dict) or not isinstance(status.get("ok"), bool):
        return SandboxResult(False, error="unreadable result: not a status")
    if status["ok"]:
        return SandboxResult(True, value=status.get("value"))
    return SandboxResult(False, error=str(status.get("error", "failed"))[:300])
