"""What a caller chooses and gets back: profiles, per-job limits, the result type, the error raised
when no sandbox can start, and the constants shared with PID 1 (:mod:`esft.sandbox.zygote`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from esft.errors import ConfigError

WORK = "/esft-work"  # the jobs' tmpfs inside the sandbox (esft.sandbox.zygote.WORK_ROOT)
NOBODY = 65534
INSTALL_HINT = (
    "install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; Fedora: dnf install bubblewrap)"
)


@dataclass
class SandboxResult:
    ok: bool
    value: Any = None
    error: str = ""
    retry: bool = False  # the sandbox failed before the job's code ran: not the job's fault


@dataclass(frozen=True)
class Limits:
    """Per-job limits. ``timeout_s`` is wall clock; ``cpu_s`` is CPU time (RLIMIT_CPU)."""

    timeout_s: float = 5.0
    cpu_s: int = 5
    memory_mb: int = 512
    file_mb: int = 16
    max_output_bytes: int = 256 * 1024  # the job's JSON result
    max_depth: int = 16  # nesting of the result
    max_items: int = 100_000  # values in the result


@dataclass(frozen=True)
class Profile:
    """What a sandbox preloads and may see: ``packages`` are import names whose distributions are
    bound read-only; ``preload`` are imported by PID 1 before the first job."""

    name: str
    packages: tuple[str, ...] = ()
    preload: tuple[str, ...] = ()
    work_mb: int = 64


ARC = Profile("arc", packages=("numpy",), preload=("numpy",))
PLAIN = Profile("plain")


class SandboxUnavailable(ConfigError):
    """bubblewrap is missing or cannot start a sandbox here."""
