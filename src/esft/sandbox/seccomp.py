"""A seccomp-BPF filter for model-written code: the system calls honest Python never needs fail.

Pure function of the architecture; :mod:`esft.sandbox.zygote` installs the bytes in each job's process
(after ``fork``, before the model's code runs; ``PR_SET_NO_NEW_PRIVS`` first, as the kernel requires).
A filter cannot be removed once installed, by the process or by anything it starts.

Denied with EPERM: creating processes or threads and exec'ing programs; signals, ptrace and memory
access to other processes; sockets; namespaces, mounts and chroot; device nodes and FIFOs; extended
attributes; SysV and POSIX IPC (they outlive a job inside the sandbox's IPC namespace); io_uring
(its requests bypass seccomp); kernel keyrings, BPF, perf, userfaultfd, modules, kexec, reboot, clock
and hostname changes, file handles (``open_by_handle_at`` walks out of a mount); host-wide writeback
(``sync``, ``syncfs``); memory outside the job's address-space limit (``memfd_create``: a memfd's
pages count against no rlimit of the job); inotify and fanotify instances (a per-user budget shared
with the host's processes of the same uid); page migration of other processes. ``clone3`` answers
ENOSYS so libc does not retry it. A foreign architecture or the x32 ABI kills the process.

**Self only.** The calls that change a process's limits or scheduling outlive the job when aimed at
another process, and a job shares its uid with the sandbox's PID 1: ``prlimit64`` on PID 1, say,
would make every later job fail its own ``setrlimit`` and score 0, which under z-scored rewards pays
like raising one's own score. These calls are allowed only on the caller itself (a pid argument of 0;
``setpriority`` and ``ioprio_set`` only for "this process"), see :data:`SELF_ONLY_X86_64`; anything
else fails with EPERM. The zygote also compares its own limits and scheduling before and after each
job and retires a sandbox whose state changed, whatever the route.

Syscall numbers are x86_64's; on other machines :func:`build_filter` returns ``None`` and the sandbox
relies on its other layers (namespaces, an unprivileged uid, rlimits), as docs/tasks.md says.
"""

from __future__ import annotations

import errno
import platform
import struct

AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000

# x86_64 numbers (linux/arch/x86/entry/syscalls/syscall_64.tbl)
DENY_X86_64 = {
    # processes, threads, programs
    "clone": 56,
    "fork": 57,
    "vfork": 58,
    "execve": 59,
    "execveat": 322,
    # other processes
    "kill": 62,
    "tkill": 200,
    "tgkill": 234,
    "rt_sigqueueinfo": 129,
    "rt_tgsigqueueinfo": 297,
    "pidfd_send_signal": 424,
    "pidfd_open": 434,
    "pidfd_getfd": 438,
    "ptrace": 101,
    "process_vm_readv": 310,
    "process_vm_writev": 311,
    "kcmp": 312,
    # network and local sockets
    "socket": 41,
    "socketpair": 53,
    # namespaces, mounts
    "unshare": 272,
    "setns": 308,
    "mount": 165,
    "umount2": 166,
    "pivot_root": 155,
    "chroot": 161,
    "open_tree": 428,
    "move_mount": 429,
    "fsopen": 430,
    "fsconfig": 431,
    "fsmount": 432,
    "fspick": 433,
    "mount_setattr": 442,
    "name_to_handle_at": 303,
    "open_by_handle_at": 304,
    # special files and attributes
    "mknod": 133,
    "mknodat": 259,
    "setxattr": 188,
    "lsetxattr": 189,
    "fsetxattr": 190,
    "removexattr": 197,
    "lremovexattr": 198,
    "fremovexattr": 199,
    # IPC that outlives the process
    "shmget": 29,
    "shmat": 30,
    "shmctl": 31,
    "semget": 64,
    "semop": 65,
    "semctl": 66,
    "msgget": 68,
    "msgsnd": 69,
    "msgrcv": 70,
    "msgctl": 71,
    "semtimedop": 220,
    "mq_open": 240,
    "mq_unlink": 241,
    "mq_timedsend": 242,
    "mq_timedreceive": 243,
    "mq_notify": 244,
    "mq_getsetattr": 245,
    # kernel interfaces
    "io_uring_setup": 425,
    "io_uring_enter": 426,
    "io_uring_register": 427,
    "bpf": 321,
    "perf_event_open": 298,
    "userfaultfd": 323,
    "keyctl": 250,
    "add_key": 248,
    "request_key": 249,
    "init_module": 175,
    "finit_module": 313,
    "delete_module": 176,
    "kexec_load": 246,
    "kexec_file_load": 320,
    "reboot": 169,
    "swapon": 167,
    "swapoff": 168,
    "acct": 163,
    "settimeofday": 164,
    "clock_settime": 227,
    "clock_adjtime": 305,
    "adjtimex": 159,
    "sethostname": 170,
    "setdomainname": 171,
    "iopl": 172,
    "ioperm": 173,
    "quotactl": 179,
    "syslog": 103,
    "vhangup": 153,
    "personality": 135,
    # host-wide cost, memory outside the job's limits, per-user budgets, other processes' pages
    "sync": 162,
    "syncfs": 306,
    "memfd_create": 319,
    "memfd_secret": 447,
    "inotify_init": 253,
    "inotify_init1": 294,
    "fanotify_init": 300,
    "migrate_pages": 256,
    "move_pages": 279,
    "process_madvise": 440,
    "process_mrelease": 448,
}

# Allowed only when every (argument index, value) holds on the argument's low 32 bits (the kernel
# reads these arguments as 32-bit ints); EPERM otherwise.
PRIO_PROCESS, IOPRIO_WHO_PROCESS = 0, 1
SELF_ONLY_X86_64: dict[str, tuple[int, tuple[tuple[int, int], ...]]] = {
    "prlimit64": (302, ((0, 0),)),  # pid 0: the caller (glibc's setrlimit/getrlimit use it so)
    "sched_setparam": (142, ((0, 0),)),
    "sched_setscheduler": (144, ((0, 0),)),
    "sched_setaffinity": (203, ((0, 0),)),
    "sched_setattr": (314, ((0, 0),)),
    "setpriority": (141, ((0, PRIO_PROCESS), (1, 0))),  # not a process group or a user: PID 1 is both
    "ioprio_set": (251, ((0, IOPRIO_WHO_PROCESS), (1, 0))),
}
ENOSYS_X86_64 = {"clone3": 435}

_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_RET_K = 0x06
RET_ALLOW = 0x7FFF0000
RET_KILL_PROCESS = 0x80000000
RET_ERRNO = 0x00050000
_ARGS_OFFSET = 16  # struct seccomp_data: int nr; u32 arch; u64 instruction_pointer; u64 args[6]


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def build_filter(machine: str | None = None, self_only: bool = True) -> bytes | None:
    """The filter program (``struct sock_filter[]`` bytes) for this machine, or None if unsupported.

    ``self_only=False`` leaves the calls of :data:`SELF_ONLY_X86_64` unchecked (tests use it to show
    that the zygote's own state check still retires a sandbox a job changed)."""
    if (machine or platform.machine()) != "x86_64":
        return None
    rules = [(nr, errno.EPERM) for nr in DENY_X86_64.values()]
    rules += [(nr, errno.ENOSYS) for nr in ENOSYS_X86_64.values()]
    checked = list(SELF_ONLY_X86_64.values()) if self_only else []
    n = len(rules) + len(checked)
    allow = 4 + n  # index of each return instruction
    ret_eperm, ret_enosys, ret_kill = allow + 1, allow + 2, allow + 3
    # after the returns, one block per checked call: load each argument, compare, allow at the end
    blocks, block_at = [], []
    for _, conditions in checked:
        block_at.append(ret_kill + 1 + len(blocks))
        for i, (arg, value) in enumerate(conditions):
            pc = ret_kill + 1 + len(blocks)
            fail = ret_kill + 1 + len(blocks) + 2 * (len(conditions) - i) + 1  # this block's EPERM
            blocks.append(_insn(_LD_W_ABS, 0, 0, _ARGS_OFFSET + 8 * arg))  # low 32 bits (little endian)
            blocks.append(_insn(_JEQ_K, 0, fail - (pc + 1) - 1, value))
        blocks.append(_insn(_RET_K, 0, 0, RET_ALLOW))
        blocks.append(_insn(_RET_K, 0, 0, RET_ERRNO | errno.EPERM))
    prog = [
        _insn(_LD_W_ABS, 0, 0, 4),  # seccomp_data.arch
        _insn(_JEQ_K, 0, ret_kill - 2, AUDIT_ARCH_X86_64),
        _insn(_LD_W_ABS, 0, 0, 0),  # seccomp_data.nr
        _insn(_JGE_K, ret_kill - 4, 0, X32_SYSCALL_BIT),
    ]
    for i, (nr, err) in enumerate(rules):
        pc = 4 + i
        target = ret_eperm if err == errno.EPERM else ret_enosys
        prog.append(_insn(_JEQ_K, target - pc - 1, 0, nr))
    for i, (nr, _) in enumerate(checked):
        pc = 4 + len(rules) + i
        prog.append(_insn(_JEQ_K, block_at[i] - pc - 1, 0, nr))
    prog += [
        _insn(_RET_K, 0, 0, RET_ALLOW),
        _insn(_RET_K, 0, 0, RET_ERRNO | errno.EPERM),
        _insn(_RET_K, 0, 0, RET_ERRNO | errno.ENOSYS),
        _insn(_RET_K, 0, 0, RET_KILL_PROCESS),
        *blocks,
    ]
    assert all(0 <= b[2] <= 255 and 0 <= b[3] <= 255 for b in prog)  # BPF jumps: 8-bit, forward
    return b"".join(prog)
