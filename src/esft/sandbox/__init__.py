"""Run untrusted code (model-written programs, graders that evaluate model text) under OS isolation.

The boundary is the operating system, provided by bubblewrap (``bwrap``), never checks inside Python:

- **Namespaces.** Each sandbox is a ``bwrap`` process with its own mount, PID, network (no interfaces
  at all), IPC, UTS and cgroup namespaces, ``--die-with-parent``, and a new session. Started as
  root, bubblewrap builds the namespaces with root's right to bind any path; the program inside then
  drops to the unprivileged ``nobody`` uid/gid, which clears every capability. (A user namespace made
  by root would map the sandbox user onto host root: exempt from RLIMIT_NPROC and owner of every root
  file.) Started by any other user, bubblewrap adds a user namespace and drops all capabilities.
- **A filesystem of almost nothing.** The root is an empty tmpfs. Read-only binds: the Python binary,
  its standard library (with its ``site-packages`` hidden under an empty tmpfs), the system library
  folders the interpreter links against, and only the packages a profile names (numpy for ARC; for
  reasoning-gym graders, the packages it imports). No home, no task data, no other site-packages,
  no /proc, a minimal /dev. The work folder ``/esft-work`` is a tmpfs capped in size.
- **One process per job.** The sandbox's PID 1 (:mod:`esft.sandbox.zygote`) runs only host-written
  code. For each job it forks; the job process sets rlimits (CPU seconds, address space, file size,
  open files, no processes, no core dumps), installs a seccomp filter (:mod:`esft.sandbox.seccomp`: no
  exec, fork, signals to others, ptrace, sockets, mounts, IPC, io_uring ...), and only then runs model
  code. Jobs cannot reach one another: PID 1 ignores their signals, the work folder is emptied after
  each job, and nothing else in the sandbox is writable.
- **The host reads bounded output.** PID 1 forwards each job's raw result (at most
  ``Limits.max_output_bytes``) behind a header line of its own, never parsing it; the host parses it
  as JSON (never pickle) only after checking its nesting depth, with NaN, infinities and ints of more
  than 18 digits refused. Each job has a wall-clock deadline that PID 1 enforces even when the job
  closed its pipe, and the host a deadline on each answer; a sandbox that misbehaves is killed with
  its whole PID namespace (PID 1 included, through a pidfd) and started afresh.
- **No job can hurt another.** The seccomp filter lets a job change limits, priority and scheduling
  only of itself (never of PID 1, which shares its uid), PID 1 compares its own state before and
  after every job, and a sandbox whose state changed, whose clean-up failed or whose job could not
  be set up is retired; a job that failed in set-up (before any model code ran) is run again once in
  a fresh sandbox, so one member's program cannot lower the others' scores.
- **Nothing outlives the host.** bubblewrap's ``--die-with-parent`` is re-armed in PID 1 after its
  uid change (which clears it), and the kernel kills every job when PID 1 dies.

If bubblewrap is missing or cannot create namespaces here, :func:`require_sandbox` raises a one-line
:class:`~esft.errors.ConfigError` that says how to install it: there is no unsandboxed fallback.

Sandboxes are started lazily, one per profile and worker, and reused across calls (starting one costs
the interpreter start-up plus the profile's imports; a job costs a ``fork``): see docs/benchmarks.md.

The package, one module per concern:

- :mod:`esft.sandbox.config`: profiles (:data:`ARC`, :data:`PLAIN`), :class:`Limits`,
  :class:`SandboxResult`, :class:`SandboxUnavailable` and the constants shared with PID 1.
- :mod:`esft.sandbox.binds`: what the sandbox can see (the interpreter, its standard library, the
  libraries it links, a profile's packages; the site-packages folders to hide).
- :mod:`esft.sandbox.command`: the bubblewrap command line, with PID 1's program as source text.
- :mod:`esft.sandbox.box`: one running sandbox and the host<->PID 1 protocol.
- :mod:`esft.sandbox.results`: bounded parsing of what a sandbox sends back.
- :mod:`esft.sandbox.pools`: :class:`SandboxPool`, the process-wide pools, :func:`require_sandbox`
  and :func:`run_untrusted`.
- :mod:`esft.sandbox.zygote`: the program PID 1 runs (standard library only, read as source text by
  :mod:`esft.sandbox.command`, never imported).
- :mod:`esft.sandbox.seccomp`: the seccomp-BPF filter each job installs.
"""

from esft.sandbox.config import (
    ARC,
    INSTALL_HINT,
    NOBODY,
    PLAIN,
    WORK,
    Limits,
    Profile,
    SandboxResult,
    SandboxUnavailable,
)
from esft.sandbox.pools import SandboxPool, close_all, pool, require_sandbox, run_untrusted

__all__ = [
    "ARC",
    "INSTALL_HINT",
    "NOBODY",
    "PLAIN",
    "WORK",
    "Limits",
    "Profile",
    "SandboxPool",
    "SandboxResult",
    "SandboxUnavailable",
    "close_all",
    "pool",
    "require_sandbox",
    "run_untrusted",
]
