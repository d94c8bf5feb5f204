"""The seccomp filter, run by a small classic-BPF interpreter: every decision the filter makes for a
system call and its arguments, without a kernel (the sandbox tests check the same calls for real)."""

from __future__ import annotations

import errno
import struct

import pytest

from esft.sandbox import seccomp

ARCH = seccomp.AUDIT_ARCH_X86_64


def decide(prog: bytes, nr: int, args: tuple[int, ...] = (), arch: int = ARCH) -> str:
    """What the kernel would do: 'allow', 'kill' or the errno's name."""
    data = struct.pack("=iIQ6Q", nr, arch, 0, *(list(args) + [0] * (6 - len(args))))
    insns = [struct.unpack("=HBBI", prog[i : i + 8]) for i in range(0, len(prog), 8)]
    pc, acc = 0, 0
    for _ in range(len(insns)):  # classic BPF only jumps forward: at most one pass
        code, jt, jf, k = insns[pc]
        if code == 0x20:  # ld w abs
            acc = struct.unpack_from("=I", data, k)[0]
            pc += 1
        elif code in (0x15, 0x35):  # jeq k, jge k
            taken = acc == k if code == 0x15 else acc >= k
            pc += 1 + (jt if taken else jf)
        elif code == 0x06:  # ret k
            if k == seccomp.RET_ALLOW:
                return "allow"
            if k == seccomp.RET_KILL_PROCESS:
                return "kill"
            assert k & 0xFFFF0000 == seccomp.RET_ERRNO
            return errno.errorcode[k & 0xFFFF]
        else:
            raise AssertionError(f"unexpected instruction {code:#x}")
    raise AssertionError("fell off the program")


@pytest.fixture(scope="module")
def prog():
    p = seccomp.build_filter("x86_64")
    assert p is not None and len(p) % 8 == 0
    return p


def test_denied_calls_fail_and_ordinary_ones_pass(prog):
    for name, nr in seccomp.DENY_X86_64.items():
        assert decide(prog, nr) == "EPERM", name
    assert decide(prog, seccomp.ENOSYS_X86_64["clone3"]) == "ENOSYS"
    for nr in (0, 1, 2, 3, 9, 60, 231, 257):  # read write open close mmap exit exit_group openat
        assert decide(prog, nr) == "allow"
    assert decide(prog, 0, arch=0x40000003) == "kill"  # i386
    assert decide(prog, 0 | seccomp.X32_SYSCALL_BIT) == "kill"


def test_host_wide_and_outside_the_limits_calls_are_denied(prog):
    for name in ("sync", "syncfs", "memfd_create", "inotify_init1", "migrate_pages", "process_madvise"):
        assert decide(prog, seccomp.DENY_X86_64[name]) == "EPERM", name


@pytest.mark.parametrize("name", sorted(seccomp.SELF_ONLY_X86_64))
def test_self_only_calls_reach_only_the_caller(prog, name):
    nr, conditions = seccomp.SELF_ONLY_X86_64[name]
    args = [0] * 6
    for arg, value in conditions:
        args[arg] = value
    assert decide(prog, nr, tuple(args)) == "allow"
    for arg, value in conditions:
        for other in (1, 2, 0xFFFFFFFF, value + 7):  # PID 1, another pid, -1 (everyone), anything else
            if other == value:
                continue
            bad = list(args)
            bad[arg] = other
            assert decide(prog, nr, tuple(bad)) == "EPERM", (name, arg, other)
    # the kernel reads these as 32-bit ints: high bits set on a 0 still mean the caller
    high = list(args)
    high[conditions[0][0]] |= 1 << 40
    assert decide(prog, nr, tuple(high)) == "allow"


def test_self_only_can_be_left_unchecked(prog):
    loose = seccomp.build_filter("x86_64", self_only=False)
    nr = seccomp.SELF_ONLY_X86_64["prlimit64"][0]
    assert decide(prog, nr, (1,)) == "EPERM"
    assert decide(loose, nr, (1,)) == "allow"


def test_other_architectures_get_no_filter():
    assert seccomp.build_filter("riscv64") is None
    assert seccomp.build_filter("aarch64") is None
