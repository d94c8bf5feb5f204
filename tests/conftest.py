"""Shared fixtures: a tiny randomly initialised Qwen2-style model with a byte-level BPE tokenizer,
built in-process (no hub; the builder lives in helpers.py, which needs no pytest), and bubblewrap."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from helpers import CHAT_TEMPLATE, build_tiny_model  # noqa: F401  (tests import them from here)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def needs_bwrap():
    """Model-written code runs only under bubblewrap: skip without it, except in CI (which installs it)."""
    if shutil.which("bwrap") is None:
        if os.environ.get("CI"):
            pytest.fail("bubblewrap (bwrap) is missing in CI: .ci/run must apt-get install bubblewrap")
        pytest.skip("needs bubblewrap (apt-get install bubblewrap)")
