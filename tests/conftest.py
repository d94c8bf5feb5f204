"""Shared fixtures: a tiny randomly initialised Qwen2-style model with a byte-level BPE tokenizer,
built in-process (no hub; the builder lives in helpers.py, which needs no pytest), and bubblewrap."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# --dtype auto follows the CPU's bf16 instructions (esft/dtypes.py); tests pin it to float32 so that they
# compute the same on every machine (the tests of the choice itself set this per test). Subprocesses
# and Ray workers inherit it.
os.environ["ESFT_CPU_FLAGS"] = ""

from helpers import CHAT_TEMPLATE, build_tiny_model, missing_dependency  # noqa: F401  (tests import them from here)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def needs_bwrap():
    """Model-written code runs only under bubblewrap: skip without it, except in CI (which installs it)."""
    if shutil.which("bwrap") is None:
        missing_dependency(
            "bubblewrap (bwrap)", ".ci/run must apt-get install bubblewrap", "apt-get install bubblewrap"
        )
