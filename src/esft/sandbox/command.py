"""The bubblewrap command line of one sandbox: namespaces, the binds of :mod:`esft.sandbox.binds`, a
read-only /dev, the work tmpfs, a cleared environment, and PID 1's program (:mod:`esft.sandbox.zygote`,
read here as source text and run with ``python -I -S -B -c``, never imported)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from esft.sandbox.binds import _hidden_dirs, _package_paths, _system_binds, _under
from esft.sandbox.config import INSTALL_HINT, WORK, Profile, SandboxUnavailable

ZYGOTE_SOURCE = (Path(__file__).parent / "zygote.py").read_text()


def bwrap_command(profile: Profile, info_fd: int) -> list[str]:
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxUnavailable(
            f"this task runs model output as code (ARC programs, reasoning-gym graders) and needs the "
            f"bubblewrap sandbox (bwrap), not found: {INSTALL_HINT}"
        )
    cmd = [bwrap, "--die-with-parent", "--new-session", "--as-pid-1", "--info-fd", str(info_fd)]
    cmd += ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    if os.getuid() == 0:
        cmd += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        cmd += ["--unshare-user", "--disable-userns"]
    system, links = _system_binds()
    pkg_binds, _ = _package_paths(profile.packages)
    bound = [*system, *pkg_binds]
    links = tuple((lk, t) for lk, t in links if not _under(lk, bound))
    # bubblewrap makes missing parent folders 0700 (root's): make them traversable for the job's uid
    parents = {str(a) for d in [*bound, *(lk for lk, _ in links), WORK] for a in Path(d).parents}
    for d in sorted(p for p in parents if p != "/" and not _under(p, bound)):
        cmd += ["--perms", "0755", "--dir", d]
    for path in system:
        cmd += ["--ro-bind", path, path]
    for link, target in links:
        cmd += ["--symlink", target, link]
    for d in _hidden_dirs(system):
        cmd += ["--tmpfs", d]
    for p in pkg_binds:
        cmd += ["--ro-bind", p, p]
    # /dev read-only: run without root, bubblewrap's /dev (and its /dev/shm) belongs to the job's uid
    cmd += ["--dev", "/dev", "--remount-ro", "/dev"]
    cmd += ["--size", str(profile.work_mb << 20), "--tmpfs", WORK]
    if os.getuid() == 0:
        cmd += ["--chmod", "0777", WORK]
    cmd += ["--remount-ro", "/", "--chdir", WORK, "--clearenv"]
    cmd += ["--setenv", "PATH", "/nonexistent", "--setenv", "HOME", WORK, "--setenv", "TMPDIR", WORK]
    cmd += ["--setenv", "LANG", "C.UTF-8", "--setenv", "PYTHONDONTWRITEBYTECODE", "1"]
    cmd += [os.path.realpath(sys.executable), "-I", "-S", "-B", "-c", ZYGOTE_SOURCE]
    return cmd
