"""What the sandbox can see: the interpreter, its standard library and the shared libraries it links
(bound read-only at their real paths, with the symlinks on the way recreated), the site-packages
folders those binds would expose (hidden under empty tmpfs), and the distributions a profile's
packages load. :mod:`esft.sandbox.command` turns these into bubblewrap arguments."""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import json
import os
import site
import subprocess
import sys
from pathlib import Path

from esft.errors import ConfigError


def _ldd_paths(binary: str) -> list[str]:
    try:
        out = subprocess.run(["ldd", binary], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    paths = []
    for line in out.splitlines():
        parts = line.split()
        for p in parts:
            if p.startswith("/"):
                paths.append(p)
    return paths


def _site_dirs() -> list[str]:
    dirs = set(site.getsitepackages())
    with contextlib.suppress(Exception):
        dirs.add(site.getusersitepackages())
    for p in sys.path:
        if p.endswith(("site-packages", "dist-packages")):
            dirs.add(p)
    return sorted(os.path.realpath(d) for d in dirs if os.path.isdir(d))


@functools.cache
def _package_paths(packages: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(paths to bind, sys.path entries) for what importing ``packages`` loads from site-packages.

    The imports run in a clean child interpreter, so only their own dependencies count. Each loaded
    top-level entry is bound, plus the other top-level files of its distribution (e.g. ``numpy.libs``
    with numpy's bundled shared libraries) and its metadata folder."""
    if not packages:
        return (), ()
    code = (
        "import sys, json\n"
        "before = set(sys.modules)\n"
        f"for n in {list(packages)!r}: __import__(n)\n"
        "new = [m for k, m in list(sys.modules.items()) if k not in before]\n"
        "print(json.dumps([getattr(m, '__file__', None) or '' for m in new]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=_child_env()
    )
    if out.returncode != 0:
        tail = out.stderr.strip().splitlines()[-1:] or ["no output"]  # the exception line
        raise ConfigError(f"cannot import {', '.join(packages)} for the sandbox: {tail[0]}")
    sites = _site_dirs()
    tops: dict[str, str] = {}  # top-level entry -> its site-packages folder
    for file in json.loads(out.stdout.strip().splitlines()[-1]):
        real = os.path.realpath(file) if file else ""
        for s in sites:
            if real.startswith(s + os.sep):
                tops[os.path.relpath(real, s).split(os.sep)[0]] = s
    dist_of = importlib.metadata.packages_distributions()
    binds = {os.path.join(s, top) for top, s in tops.items()}
    for top, s in tops.items():
        for dist_name in dist_of.get(top.split(".")[0], []):
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                for f in importlib.metadata.distribution(dist_name).files or []:
                    first = f.parts[0]
                    if first not in ("..", "__pycache__") and os.path.exists(os.path.join(s, first)):
                        binds.add(os.path.join(s, first))
    return tuple(sorted(binds)), tuple(sorted(set(tops.values())))


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "HOME", "VIRTUAL_ENV")}
    env.setdefault("PATH", "/usr/bin:/bin")
    return env


def _link_chain(path: str) -> tuple[list[tuple[str, str]], str]:
    """The symlinks met while resolving ``path`` as (target, link) pairs, and the real path."""
    links: list[tuple[str, str]] = []
    queue = list(Path(path).parts[1:])
    cur = "/"
    for _ in range(256):
        if not queue:
            break
        comp = queue.pop(0)
        if comp in ("", "."):
            continue
        if comp == "..":
            cur = os.path.dirname(cur)
            continue
        nxt = os.path.join(cur, comp)
        if os.path.islink(nxt):
            target = os.readlink(nxt)
            links.append((target, nxt))
            if os.path.isabs(target):
                cur, queue = "/", list(Path(target).parts[1:]) + queue
            else:
                queue = list(Path(target).parts) + queue
            continue
        cur = nxt
    return links, cur


@functools.cache
def _system_binds() -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """(read-only binds, symlinks) for the interpreter, its stdlib and the shared libraries it links.

    Everything is bound at its real path; the symlinks on the way (``/lib64`` -> ``usr/lib64``, the
    ELF interpreter's own link) are recreated, so the paths compiled into binaries still resolve."""
    wanted = [sys.executable, _stdlib()]
    for lib in _ldd_paths(os.path.realpath(sys.executable)):
        wanted.append(os.path.dirname(lib))  # the library's folder: extension modules link more from it
        wanted.append(lib)
    if os.path.exists("/etc/ld.so.cache"):
        wanted.append("/etc/ld.so.cache")
    binds: set[str] = set()
    links: dict[str, str] = {}
    for path in wanted:
        chain, real = _link_chain(path)
        for target, link in chain:
            links[link] = target
        if os.path.exists(real):
            binds.add(real)
    # a path inside another bound folder needs no bind of its own
    binds = {b for b in binds if not _under(b, [o for o in binds if o != b])}
    return tuple(sorted(binds)), tuple(sorted(links.items()))


def _stdlib() -> str:
    """The standard library folder of the base interpreter (not a venv's), lib-dynload inside it."""
    return os.path.realpath(os.path.dirname(os.__file__))


def _hidden_dirs(binds: tuple[str, ...]) -> list[str]:
    """Package folders that a system bind would expose (the base interpreter's site-packages, a
    distribution's dist-packages): each is covered by an empty tmpfs."""
    hidden = set()
    for bound in binds:
        if not os.path.isdir(bound):
            continue
        for pattern in ("site-packages", "dist-packages", "*/site-packages", "*/dist-packages"):
            hidden.update(os.path.realpath(p) for p in Path(bound).glob(pattern) if p.is_dir())
    hidden.update(s for s in _site_dirs() if _under(s, list(binds)))
    return sorted(hidden)


def _under(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)
