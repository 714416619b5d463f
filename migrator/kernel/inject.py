"""A userfaultfd for a process that does not cooperate, created inside it by ptrace injection.

A userfaultfd is bound to the mm of the process that calls userfaultfd(2), so the call has to be
made by the target.  mg_inject_uffd (csrc/inject.c) stops one of its threads, makes it execute
userfaultfd(2) at a `0f 05` of its own [vdso], copies the new fd into this process with pidfd_getfd,
closes the target's copy by an injected close(2), restores the thread exactly and detaches.  The
thread is held for tens of microseconds; the target keeps no descriptor and runs on as before.

Needs ptrace rights over the target (root, or its owner with kernel.yama.ptrace_scope 0: the
tracer is a short-lived child of this process, not an ancestor of the target).  x86-64 only.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from dataclasses import dataclass

from ..errors import TargetGoneError, UnsupportedError
from .maps import parse_maps_text
from .native import ffi, lib

__all__ = ["InjectionRefused", "Injection", "injection_refusal", "find_syscall_instruction",
           "pick_thread", "inject_userfaultfd", "inject_userfaultfd_at", "probe_injection"]

SYSCALL_INSN = b"\x0f\x05"

STAGES: dict[int, str] = {
    lib.MG_INJ_SPAWN: "start of the injector child",
    lib.MG_INJ_PIDFD: "pidfd_open",
    lib.MG_INJ_SEIZE: "PTRACE_SEIZE",
    lib.MG_INJ_INTERRUPT: "PTRACE_INTERRUPT",
    lib.MG_INJ_STOP: "waiting for the thread to stop",
    lib.MG_INJ_SAVE: "saving registers and signal mask",
    lib.MG_INJ_USERFAULTFD: "the injected userfaultfd(2)",
    lib.MG_INJ_GETFD: "pidfd_getfd",
    lib.MG_INJ_CLOSE: "the injected close(2)",
    lib.MG_INJ_RESTORE: "restoring registers and signal mask",
    lib.MG_INJ_DETACH: "PTRACE_DETACH",
    lib.MG_INJ_INJECTOR_DIED: "the injector child died without reporting",
}


class InjectionRefused(UnsupportedError):
    """Injecting into this target is not possible or not safe; the message names why."""


@dataclass(frozen=True)
class Injection:
    """A userfaultfd injected into process pid and copied into this process.

    fd is ours (O_CLOEXEC; the caller closes it); target_fd is the number it had in the target,
    closed there again before the thread resumed.  Times in seconds."""

    pid: int
    tid: int
    fd: int
    target_fd: int
    user_mode_only: bool    # the target lacked the right to a kernel-mode userfaultfd
    restarted: bool         # the thread was stopped inside a syscall, which was restarted
    signal_kept: int        # a signal sent to the thread during the injection, delivered at detach
    total_s: float          # PTRACE_SEIZE .. PTRACE_DETACH
    stop_wait_s: float      # PTRACE_INTERRUPT .. the thread stopped
    window_s: float         # injection registers in the thread .. its own registers back


def _status(pid: int, tid: int | None = None) -> dict[str, str]:
    path = f"/proc/{pid}/status" if tid is None else f"/proc/{pid}/task/{tid}/status"
    try:
        with open(path) as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        raise TargetGoneError(f"process {pid} does not exist (or exited)") from None
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


_SLEEP_SYSCALLS = {"35", "230"}      # x86-64 nanosleep, clock_nanosleep


def _asleep_in_syscall(pid: int) -> bool:
    """Whether process pid is `sleep` blocked in nanosleep/clock_nanosleep (its exec done)."""
    if _comm(pid) != "sleep":
        return False
    try:
        with open(f"/proc/{pid}/syscall") as f:
            return f.read().split(" ", 1)[0] in _SLEEP_SYSCALLS
    except OSError:
        return False


def injection_refusal(pid: int) -> str | None:
    """Why not to inject into process pid (read from /proc/PID/status), or None.

    Raises TargetGoneError if the process does not exist."""
    st = _status(pid)
    reasons = []
    if st.get("State", "")[:1] in ("Z", "X") and not _live_threads(pid):
        # (a zombie leader alone, with other threads alive, is no reason: see pick_thread)
        reasons.append(f"process {pid} is exiting (state {st['State']})")
    tracer = int(st.get("TracerPid", "0"))
    if tracer:
        reasons.append(f"process {pid} is already traced by pid {tracer} ({_comm(tracer)}); "
                       "a thread can have only one tracer")
    if st.get("Seccomp") == "2":
        reasons.append(f"process {pid} runs under a seccomp filter: an injected syscall the filter "
                       "forbids could kill it")
    if int(st.get("SigIgn", "0"), 16) & (1 << (signal.SIGTRAP - 1)):
        reasons.append(f"process {pid} ignores SIGTRAP: the injection's single-step would reset "
                       "that to the default action (a later SIGTRAP would then kill it)")
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as f:
            if f.read().strip() == "3":
                reasons.append("kernel.yama.ptrace_scope = 3: no process may be traced")
    except FileNotFoundError:
        pass
    return "; ".join(reasons) or None


def _read_mem(mem_fd: int, start: int, length: int) -> bytes:
    try:
        return os.pread(mem_fd, length, start)
    except OSError:
        return b""


def find_syscall_instruction(pid: int, tid: int | None = None) -> int:
    """The address of a `0f 05` (syscall) in the executable memory of process pid: in its [vdso],
    else in another executable mapping ([vsyscall] excepted: it faults when executed).  Read
    through thread tid if given (a zombie leader's /proc/PID/maps and mem are empty)."""
    proc = f"/proc/{pid}" if tid is None else f"/proc/{pid}/task/{tid}"
    try:
        with open(f"{proc}/maps") as f:
            text = f.read()
        mem_fd = os.open(f"{proc}/mem", os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError):
        raise TargetGoneError(f"process {pid} exited") from None
    except PermissionError:
        raise InjectionRefused(f"cannot read {proc}/maps or mem: permission denied") from None
    # the [vdso] line alone when there is one (parsing every line costs ~0.3 ms in a large process)
    vdso = [ln for ln in text.splitlines() if ln.endswith("[vdso]")]
    maps = [m for m in parse_maps_text("\n".join(vdso) if vdso else text)
            if "x" in m.perms and m.path != "[vsyscall]"]
    maps.sort(key=lambda m: m.path != "[vdso]")
    try:
        for m in maps:
            chunk = 1 << 20
            for at in range(m.start, m.end, chunk):
                # overlap by one byte so an instruction across chunks is found
                data = _read_mem(mem_fd, at, min(chunk + 1, m.end - at))
                i = data.find(SYSCALL_INSN)
                if i >= 0:
                    return at + i
    finally:
        os.close(mem_fd)
    raise InjectionRefused(f"process {pid}: no syscall instruction found in executable memory")


def _thread_state(pid: int, tid: int) -> str:
    try:
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return "X"


def _live_threads(pid: int) -> list[int]:
    """The thread ids of process pid that are not zombies, in increasing order."""
    try:
        tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except (FileNotFoundError, ProcessLookupError):
        return []
    return [tid for tid in tids if _thread_state(pid, tid) not in ("Z", "X")]


# x86-64 system calls that fail with EINTR when their thread is merely stopped and resumed (a
# ptrace stop, SIGSTOP/SIGCONT), with no signal handler involved: signal(7), "Interruption of
# system calls and library functions by stop signals".  No register restore can hide that, so a
# thread blocked in one of them is injected only when no other thread can be.
EINTR_ON_STOP = {
    232: "epoll_wait", 281: "epoll_pwait", 441: "epoll_pwait2", 65: "semop", 220: "semtimedop",
    128: "rt_sigtimedwait", 208: "io_getevents", 333: "io_pgetevents",
}


def _blocked_in(pid: int, tid: int) -> int | None:
    """The system call thread tid is blocked in (/proc/.../syscall), None if it runs or cannot
    be read."""
    try:
        with open(f"/proc/{pid}/task/{tid}/syscall") as f:
            first = f.read().split(" ", 1)[0]
    except OSError:
        return None
    return int(first) if first.lstrip("-").isdigit() and int(first) >= 0 else None


def pick_thread(pid: int) -> int:
    """The thread to inject into: the thread group leader, unless it is a zombie (it called
    pthread_exit) or blocked in a call that a stop interrupts with EINTR (EINTR_ON_STOP, e.g. an
    event loop's epoll_wait); then the live thread with the lowest id that is not; if every live
    thread is, the leader (or the first live thread): that call then returns EINTR, as after any
    ptrace stop or SIGSTOP/SIGCONT, which programs using it must handle."""
    live = _live_threads(pid)
    if not live:
        raise TargetGoneError(f"process {pid} has no live thread")
    for tid in sorted(live, key=lambda t: t != pid):       # the leader first
        if _blocked_in(pid, tid) not in EINTR_ON_STOP:
            return tid
    return pid if pid in live else live[0]


def inject_userfaultfd_at(pid: int, tid: int, syscall_ip: int, *, hold_s: float = 0.0) -> Injection:
    """mg_inject_uffd without preflight: thread tid of process pid executes userfaultfd(2) at
    syscall_ip.  hold_s (tests only): seconds to keep the injection registers in the thread.

    Raises InjectionRefused (no ptrace rights, userfaultfd refused), TargetGoneError (the process
    or thread does not exist or exited meanwhile), or OSError naming the stage that failed."""
    res = ffi.new("struct mg_inject_result *")
    r = lib.mg_inject_uffd(pid, tid, syscall_ip, int(hold_s * 1e9), res)
    if r == 0:
        return Injection(pid=pid, tid=tid, fd=res.fd, target_fd=res.target_fd,
                         user_mode_only=bool(res.user_mode_only), restarted=bool(res.restarted),
                         signal_kept=res.signal_kept,
                         total_s=res.ns_total / 1e9, stop_wait_s=res.ns_stop_wait / 1e9,
                         window_s=res.ns_window / 1e9)
    code, stage = -r, res.stage
    where = f"injecting a userfaultfd into process {pid} (thread {tid})"
    if code == errno.ESRCH:
        if stage in (lib.MG_INJ_PIDFD, lib.MG_INJ_SEIZE):
            raise TargetGoneError(f"process {pid} (thread {tid}) does not exist (or exited)")
        raise TargetGoneError(f"process {pid} (thread {tid}) exited during {STAGES[stage]}")
    if code == errno.EPERM and stage in (lib.MG_INJ_SEIZE, lib.MG_INJ_GETFD):
        raise InjectionRefused(f"no ptrace rights over {pid} (not root/owner, or already traced)")
    if code == errno.EPERM and stage == lib.MG_INJ_USERFAULTFD:
        raise InjectionRefused(f"process {pid} may not create a userfaultfd, even user-mode-only")
    if stage == lib.MG_INJ_INJECTOR_DIED:
        raise OSError(code, f"{where}: the injector child (pid {res.injector_pid}) died without "
                            "reporting; if it was killed while the thread held the injection "
                            "registers, the thread resumed with them")
    if code == errno.ETIMEDOUT and stage == lib.MG_INJ_STOP:
        raise OSError(code, f"{where}: the thread did not stop within "
                            f"{lib.MG_INJ_STOP_TIMEOUT_NS / 1e9:g} s (uninterruptible sleep?); "
                            "it was left untouched")
    raise OSError(code, f"{where}: {STAGES.get(stage, f'stage {stage}')}: {os.strerror(code)}")


def inject_userfaultfd(pid: int, *, hold_s: float = 0.0) -> Injection:
    """Create a userfaultfd inside process pid and copy it into this process (see the module).

    Checks injection_refusal first (raises InjectionRefused with its reasons), picks the thread
    (pick_thread) and the syscall instruction (find_syscall_instruction).  hold_s: tests only."""
    reason = injection_refusal(pid)
    if reason:
        raise InjectionRefused(f"will not inject into process {pid}: {reason}")
    tid = pick_thread(pid)
    return inject_userfaultfd_at(pid, tid, find_syscall_instruction(pid, tid), hold_s=hold_s)


def probe_injection() -> tuple[bool, str]:
    """Inject a userfaultfd into a throw-away child (`sleep`) and check that it grants async
    write-protect (UFFDIO_API with WP_ASYNC).  Returns (ok, detail); the detail gives the
    seize-to-detach time in µs."""
    from .uffd import UFFD_FEATURE_WP_ASYNC, Userfaultfd

    try:
        child = subprocess.Popen(["sleep", "5"], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError as e:
        return False, f"cannot start a throw-away child (sleep): {e}"
    try:
        deadline = time.monotonic() + 2.0
        # Wait until the child sleeps in its syscall.  Its comm turns "sleep" early in the exec,
        # before the new image (and its [vdso]) is mapped: reading its maps then can find no
        # syscall instruction at all.
        while not _asleep_in_syscall(child.pid):
            if time.monotonic() > deadline:
                return False, "the throw-away child (sleep) did not start"
            time.sleep(0.001)
        try:
            inj = inject_userfaultfd(child.pid)
        except (OSError, UnsupportedError, TargetGoneError) as e:
            return False, f"injection failed: {e}"
        u = Userfaultfd(inj.fd, child.pid)
        try:
            features = u.api()
        except (OSError, UnsupportedError) as e:
            return False, f"injected in {inj.total_s * 1e6:.0f} µs, but UFFDIO_API failed: {e}"
        finally:
            u.close()
        if not features & UFFD_FEATURE_WP_ASYNC:
            return False, f"injected in {inj.total_s * 1e6:.0f} µs, but no WP_ASYNC granted"
        mode = ", user-mode-only" if inj.user_mode_only else ""
        return True, (f"userfaultfd injected into a child in {inj.total_s * 1e6:.0f} µs (seize to "
                      f"detach, thread held {inj.window_s * 1e6:.0f} µs){mode}; WP_ASYNC granted")
    finally:
        child.kill()
        child.wait()
