"""The vLLM engine's modules each run on one side of vLLM's process boundary (no vLLM needed here). That
neither side imports the other is an import-linter contract (pyproject.toml, run by .ci/run)."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import esft.engines.vllm as vllm_pkg

PKG = Path(vllm_pkg.__file__).parent
WORKER_SIDE = {"esft.engines.vllm.worker", "esft.engines.vllm.population"}
DRIVER_SIDE = {"esft.engines.vllm.driver"}


def test_every_module_in_the_package_is_on_a_side():
    modules = {f"esft.engines.vllm.{p.stem}" for p in PKG.glob("*.py") if p.stem != "__init__"}
    assert modules == WORKER_SIDE | DRIVER_SIDE


def test_extension_name_resolves_to_the_worker_class():
    from esft.engines.vllm.driver import EXTENSION
    from esft.engines.vllm.worker import ESWorkerExtension

    module, _, name = EXTENSION.rpartition(".")
    assert getattr(importlib.import_module(module), name) is ESWorkerExtension
    methods = [m for m in vars(ESWorkerExtension) if not m.startswith("_")]
    assert methods and all(m.startswith("esft_") for m in methods)  # never shadows vLLM worker methods


def test_importing_the_worker_side_loads_neither_driver_nor_vllm():
    code = (
        "import sys, esft.engines.vllm.worker, esft.engines.vllm.population;"
        "bad = [m for m in sys.modules if m == 'vllm' or m.startswith('vllm.') "
        "or m == 'esft.engines.vllm.driver'];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_package_exports_the_engine_lazily():
    from esft.engines.vllm.driver import VLLMEngine

    assert vllm_pkg.VLLMEngine is VLLMEngine
