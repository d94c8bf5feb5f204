"""The vLLM engine, one module per side of vLLM's process boundary.

- ``driver``: ``VLLMEngine``, in the trainer's process; it owns the ``vllm.LLM`` and reaches the
  weights only through ``collective_rpc``, with an ``esft.es.remote.RemoteParamSet``.
- ``worker``: ``ESWorkerExtension``, mixed into vLLM's worker class in vLLM's worker process; it holds
  the ES ``ParamSet`` over the live weights.
- ``population``: low-rank population batching (one LoRA adapter per member), worker side.

Nothing here imports vLLM until an engine is built: importing this package (as vLLM's worker does to
reach ``worker``) stays cheap and never loads the driver.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from esft.engines.vllm.driver import VLLMEngine

__all__ = ["VLLMEngine"]


def __getattr__(name: str) -> Any:
    if name == "VLLMEngine":
        from esft.engines.vllm.driver import VLLMEngine

        return VLLMEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
