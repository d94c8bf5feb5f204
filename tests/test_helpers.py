"""The shared rule for a missing optional dependency (tests/helpers.py): skip, except in CI, which fails."""

from __future__ import annotations

import json

import pytest
from helpers import import_or_skip, missing_dependency

NOWHERE = "esft_test_no_such_module"


def test_a_missing_dependency_skips_outside_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=f"needs {NOWHERE} .*No module named.*pip install it"):
        import_or_skip(NOWHERE, "CI must install it", "pip install it")
    with pytest.raises(pytest.skip.Exception, match=r"needs chromium \(apt-get install chromium\)"):
        missing_dependency("chromium", "CI must install it", "apt-get install chromium")


def test_a_missing_dependency_fails_in_ci(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=f"{NOWHERE} .* is missing in CI: CI must install it"):
        import_or_skip(NOWHERE, "CI must install it", "pip install it")
    with pytest.raises(pytest.fail.Exception, match="chromium is missing in CI: CI must install it"):
        missing_dependency("chromium", "CI must install it", "apt-get install chromium")


def test_an_installed_module_is_returned(monkeypatch):
    monkeypatch.setenv("CI", "true")
    assert import_or_skip("json", "", "") is json
