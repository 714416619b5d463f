"""ptrace injection of a userfaultfd into a non-cooperating process (migrator.kernel.inject), on real
processes: tests/targets/blocker.c, a multi-threaded C program whose leader blocks in a syscall while
a writer thread stores to memory in a loop and a helper thread obeys commands on stdin."""

from __future__ import annotations

import ctypes
import errno
import os
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time

import pytest

from conftest import require, require_feature
from migrator.errors import TargetGoneError
from migrator.kernel.inject import (InjectionRefused, find_syscall_instruction, inject_userfaultfd,
                                    inject_userfaultfd_at, injection_refusal, pick_thread,
                                    probe_injection)
from migrator.kernel.maps import vma_smaps
from migrator.kernel.native import PAGE_SIZE
from migrator.kernel.pagemap import (PAGE_IS_WRITTEN, PM_SCAN_CHECK_WPASYNC, PM_SCAN_WP_MATCHING,
                                     Pagemap)
from migrator.kernel.uffd import UFFD_FEATURE_WP_ASYNC, Userfaultfd, find_uffd_fds
from waiting import wait_until

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
NR = {"read": 0, "pause": 34, "nanosleep": 35, "vfork": 58, "futex": 202, "restart_syscall": 219,
      "epoll_wait": 232, "ppoll": 271, "userfaultfd": 323}
libc = ctypes.CDLL(None, use_errno=True)


@pytest.fixture(scope="module")
def blocker_bin(tmp_path_factory) -> str:
    gcc = shutil.which("gcc")
    require(gcc is not None, "needs gcc to build tests/targets/blocker.c")
    out = tmp_path_factory.mktemp("targets") / "blocker"
    subprocess.run([gcc, "-O1", "-Wall", "-Werror", "-pthread", "-o", str(out),
                    os.path.join(HERE, "targets", "blocker.c")], check=True)
    return str(out)


class Target:
    """A running blocker: its addresses, a line reader with timeouts, and its commands."""

    def __init__(self, binary: str, mode: str, *args: str):
        self.mode = mode
        self.proc = subprocess.Popen([binary, mode, *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        self._buf = b""
        ready = dict(kv.split("=") for kv in self.readline().split()[1:])
        self.pid = int(ready["pid"])
        self.anon = int(ready["anon"], 16)
        self.shm = int(ready["shm"], 16)
        self.pages = int(ready["pages"])

    def readline(self, timeout: float = 5.0) -> str:
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise AssertionError(f"target {self.mode}: no output for {timeout} s")
            chunk = os.read(fd, 4096)
            if not chunk:
                raise AssertionError(f"target {self.mode} exited: {self.proc.wait()}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def cmd(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def ask(self, line: str) -> str:
        self.cmd(line)
        return self.readline()

    def count(self) -> int:
        return int(self.ask("count").split()[1])

    def runs_on(self) -> None:
        """Returns once the target's writer thread counts on (it was not left stopped)."""
        c0 = self.count()
        wait_until(lambda: self.count() > c0, 5, f"target {self.pid}'s writer thread to count on from {c0}")

    def result(self, timeout: float = 5.0) -> dict[str, int | str]:
        line = self.readline(timeout)
        assert line.startswith("RESULT "), line
        return {k: (v if k == "data" else int(v)) for k, v in
                (kv.split("=") for kv in line.split()[1:])}

    def woken(self) -> dict[str, int | str]:
        """Wake the blocked call; its result, without the time it took."""
        self.cmd("wake")
        res = self.result()
        res.pop("ns")
        return res

    def syscall(self, tid: int | None = None) -> list[str]:
        with open(f"/proc/{self.pid}/task/{tid or self.pid}/syscall") as f:
            return f.read().split()

    def wait_syscall(self, nr: int, tid: int | None = None, timeout: float = 5.0) -> list[str]:
        """Wait until thread tid (the leader) is blocked in syscall nr (or stopped in it)."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.syscall(tid)
            if s[0] == str(nr):
                return s
            assert time.monotonic() < deadline, f"thread not in syscall {nr}: {s}"
            time.sleep(0.001)

    def status(self, key: str) -> str:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return line.split(":", 1)[1].strip()
        raise KeyError(key)

    def vmflags(self, start: int) -> list[str]:
        return vma_smaps(self.pid, start)["VmFlags"].split()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()


@pytest.fixture
def target(root, blocker_bin):
    started: list[Target] = []

    def start(mode: str, *args: str) -> Target:
        t = Target(blocker_bin, mode, *args)
        started.append(t)
        return t
    yield start
    for t in started:
        t.close()


def scan_written(pid: int, start: int, npages: int) -> list[int]:
    """Pages of [start, start + npages) written since the last scan (and re-protect them)."""
    bitmap = bytearray((npages + 7) // 8)
    with Pagemap(pid) as pm:
        n = pm.scan(start, start + npages * PAGE_SIZE, bitmap,
                    flags=PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
                    category_mask=PAGE_IS_WRITTEN, return_mask=PAGE_IS_WRITTEN)
    pages = [i for i in range(npages) if bitmap[i // 8] >> (i % 8) & 1]
    assert n == len(pages)
    return pages


def track(u: Userfaultfd, t: Target, *bases: int) -> None:
    features = u.api()
    require_feature("uffd_wp_async_anon", bool(features & UFFD_FEATURE_WP_ASYNC))
    for base in bases:
        u.register_wp(base, t.pages * PAGE_SIZE)
        u.writeprotect(base, t.pages * PAGE_SIZE)


def tgkill(pid: int, tid: int, sig: int) -> None:
    assert libc.syscall(234, pid, tid, sig) == 0, os.strerror(ctypes.get_errno())


# mode -> (the syscall the leader blocks in, the one it is in after the injection, its RESULT)
BLOCKED = {
    "read": (NR["read"], NR["read"], {"ret": 5, "errno": 0, "data": "hello", "mask_ok": 1}),
    "ppoll": (NR["ppoll"], NR["ppoll"], {"ret": 1, "errno": 0, "data": "hello", "mask_ok": 1}),
    "futex": (NR["futex"], NR["futex"], {"ret": 0, "errno": 0, "data": "-", "mask_ok": 1}),
    "futex_timeout": (NR["futex"], NR["restart_syscall"],
                      {"ret": 0, "errno": 0, "data": "-", "mask_ok": 1}),
    "nanosleep": (NR["nanosleep"], NR["restart_syscall"],
                  {"ret": 0, "errno": 0, "data": "-", "mask_ok": 1}),
}


@pytest.mark.parametrize("mode", [pytest.param(m, marks=pytest.mark.slow) if m == "nanosleep" else m
                                  for m in BLOCKED])
def test_blocked_call_completes_without_eintr(target, mode):
    """The leader, blocked in a syscall, is injected; it goes back into the same call (or into
    restart_syscall for the calls with a restart block) and completes as if nothing happened."""
    t = target(mode)
    before, after, expected = BLOCKED[mode]
    t.wait_syscall(before)
    started = time.monotonic()
    inj = inject_userfaultfd(t.pid)
    os.close(inj.fd)
    assert (inj.tid, inj.restarted, inj.user_mode_only) == (t.pid, True, False)
    assert inj.target_fd >= 0 and find_uffd_fds(t.pid) == []
    assert t.status("TracerPid") == "0"
    t.wait_syscall(after)
    t.runs_on()                       # the writer thread runs on
    if mode != "nanosleep":
        t.cmd("wake")
    res = t.result(timeout=6)
    ns = res.pop("ns")
    assert res == expected
    if mode == "nanosleep":                     # the full 3 s, counted from before the injection
        assert ns >= 3_000_000_000 and time.monotonic() - started < 3.5
    print(f"{mode}: seize-to-detach {inj.total_s * 1e6:.0f} µs, stop wait "
          f"{inj.stop_wait_s * 1e6:.0f} µs, thread held {inj.window_s * 1e6:.0f} µs")


def test_injected_uffd_tracks_exact_pages(target):
    """The copy of the injected fd write-protects the target's private anon memory and its memfd;
    PAGEMAP_SCAN reports exactly the pages written, by user stores and by the kernel (read(2)
    into a page).  Closing our copy ends the registration: no "uw" in VmFlags afterwards."""
    t = target("idle")
    u = Userfaultfd.inject(t.pid)
    assert u.injection is not None and u.injection.fd == u.fd and u.pid == t.pid
    assert Userfaultfd(-1, t.pid).injection is None
    assert os.readlink(f"/proc/self/fd/{u.fd}") == "anon_inode:[userfaultfd]"
    assert os.get_inheritable(u.fd) is False
    assert find_uffd_fds(t.pid) == []           # the target holds none
    track(u, t, t.anon, t.shm)
    assert "uw" in t.vmflags(t.anon) and "uw" in t.vmflags(t.shm)
    assert scan_written(t.pid, t.anon, t.pages) == []
    assert t.ask("write anon 0 5 63") == "OK"
    assert t.ask("write shm 7") == "OK"
    assert t.ask("kwrite anon 20") == f"OK {PAGE_SIZE}"
    assert t.ask("kwrite shm 30") == f"OK {PAGE_SIZE}"
    assert scan_written(t.pid, t.anon, t.pages) == [0, 5, 20, 63]
    assert scan_written(t.pid, t.shm, t.pages) == [7, 30]
    assert scan_written(t.pid, t.anon, t.pages) == []
    assert t.ask("write anon 5") == "OK"
    assert scan_written(t.pid, t.anon, t.pages) == [5]
    u.close()
    assert "uw" not in t.vmflags(t.anon) and "uw" not in t.vmflags(t.shm)
    assert find_uffd_fds(t.pid) == []


def test_non_root_target_gets_user_mode_only(target):
    with open("/proc/sys/vm/unprivileged_userfaultfd") as f:
        require(f.read().strip() == "0", "needs vm.unprivileged_userfaultfd = 0")
    t = target("read", "--setuid", "65534")
    assert t.status("Uid").split() == ["65534"] * 4
    t.wait_syscall(NR["read"])
    u = Userfaultfd.inject(t.pid)
    assert u.injection.user_mode_only is True
    track(u, t, t.anon)
    assert t.ask("kwrite anon 3") == f"OK {PAGE_SIZE}"
    assert t.ask("write anon 9") == "OK"
    assert scan_written(t.pid, t.anon, t.pages) == [3, 9]
    u.close()
    assert t.woken() == BLOCKED["read"][2]


TRACER = r"""
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.ptrace(0x4206, int(sys.argv[1]), None, None) != 0:   # PTRACE_SEIZE
    sys.exit(f"seize: errno {ctypes.get_errno()}")
print("SEIZED", flush=True)
sys.stdin.read()
"""


def test_already_traced_target_refused(target):
    t = target("read")
    t.wait_syscall(NR["read"])
    tracer = subprocess.Popen([sys.executable, "-c", TRACER, str(t.pid)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert tracer.stdout.readline() == "SEIZED\n"
        with open(f"/proc/{tracer.pid}/comm") as f:
            comm = f.read().strip()
        why = f"process {t.pid} is already traced by pid {tracer.pid} ({comm})"
        assert why in injection_refusal(t.pid)
        with pytest.raises(InjectionRefused, match=re.escape(why)):
            inject_userfaultfd(t.pid)
        # without the preflight, PTRACE_SEIZE itself says no
        with pytest.raises(InjectionRefused, match=f"no ptrace rights over {t.pid} "):
            inject_userfaultfd_at(t.pid, t.pid, find_syscall_instruction(t.pid))
        t.runs_on()
    finally:
        tracer.stdin.close()
        tracer.wait()
    assert t.status("TracerPid") == "0"
    assert t.woken() == BLOCKED["read"][2]


@pytest.mark.parametrize("option,reason", [
    ("--seccomp", "runs under a seccomp filter: an injected syscall the filter forbids could kill it"),
    ("--ignore-trap", "ignores SIGTRAP: the injection's single-step would reset that"),
])
def test_preflight_refusals(target, option, reason):
    t = target("idle", option)
    assert f"process {t.pid} {reason}" in injection_refusal(t.pid)
    with pytest.raises(InjectionRefused, match=re.escape(reason)):
        inject_userfaultfd(t.pid)
    assert t.status("TracerPid") == "0" and find_uffd_fds(t.pid) == []


def test_sigtrap_handler_survives(target):
    """The single-step's SIGTRAP is forced; had the injection blocked SIGTRAP, the kernel would
    have reset the target's handler to SIG_DFL and the next SIGTRAP would kill it."""
    t = target("idle")
    os.close(inject_userfaultfd(t.pid).fd)
    assert t.ask("trap") == "TRAPPED 1"


def test_nonexistent_process(root):
    p = subprocess.Popen(["true"])
    p.wait()
    with pytest.raises(TargetGoneError, match=f"process {p.pid} does not exist"):
        inject_userfaultfd(p.pid)
    with pytest.raises(TargetGoneError, match=f"process {p.pid} .* does not exist"):
        inject_userfaultfd_at(p.pid, p.pid, 0x1000)


def inject_in_thread(pid: int, hold_s: float) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run():
        try:
            out["injection"] = inject_userfaultfd(pid, hold_s=hold_s)
        except BaseException as e:       # noqa: BLE001 - handed to the test
            out["error"] = e
    th = threading.Thread(target=run)
    th.start()
    return th, out


@pytest.mark.slow
def test_target_killed_during_injection(target):
    t = target("read")
    t.wait_syscall(NR["read"])
    started = time.monotonic()
    th, out = inject_in_thread(t.pid, hold_s=1.0)
    t.wait_syscall(NR["userfaultfd"])        # stopped, holding the injection registers
    t.proc.kill()
    th.join(timeout=5)
    assert not th.is_alive() and time.monotonic() - started < 3
    assert isinstance(out.get("error"), TargetGoneError), out
    assert re.fullmatch(rf"process {t.pid} \(thread {t.pid}\) exited during .*", str(out["error"]))


@pytest.mark.slow
def test_thread_that_never_stops_times_out(target):
    """A vfork parent waits in a sleep that PTRACE_INTERRUPT cannot break: the injection gives up
    after MG_INJ_STOP_TIMEOUT_NS (3 s) and leaves the thread untouched."""
    t = target("vfork")
    t.wait_syscall(NR["vfork"])
    started = time.monotonic()
    with pytest.raises(OSError, match=r"the thread did not stop within 3 s .*left untouched") as e:
        inject_userfaultfd(t.pid)
    assert e.value.errno == errno.ETIMEDOUT and 3 <= time.monotonic() - started < 3.5
    assert t.status("TracerPid") == "0" and find_uffd_fds(t.pid) == []
    res = t.result(timeout=3)                 # the vfork child exits after 4 s
    res.pop("ns")
    assert res == {"ret": 0, "errno": 0, "data": "-", "mask_ok": 1}


def test_signal_during_injection_delivered_at_detach(target):
    """A SIGSTOP sent to the thread while it holds the injection registers is kept and delivered
    when the injection detaches: the process ends stopped; SIGCONT lets the read complete."""
    t = target("read")
    t.wait_syscall(NR["read"])
    th, out = inject_in_thread(t.pid, hold_s=0.3)
    t.wait_syscall(NR["userfaultfd"])
    tgkill(t.pid, t.pid, signal.SIGSTOP)
    th.join(timeout=5)
    inj = out["injection"]
    os.close(inj.fd)
    assert inj.signal_kept == signal.SIGSTOP
    # (the kept SIGSTOP is pending at the detach: the thread stops once it next runs)
    wait_until(lambda: t.status("State").startswith("T (stopped)"), 5, f"target {t.pid} to stop")
    assert find_uffd_fds(t.pid) == []
    os.kill(t.pid, signal.SIGCONT)
    t.wait_syscall(NR["read"])
    assert t.woken() == BLOCKED["read"][2]


def uffds_here() -> set[int]:
    out = set()
    for n in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{n}") == "anon_inode:[userfaultfd]":
                out.add(int(n))
        except OSError:
            pass
    return out


def test_injector_killed_reports_died(target):
    """What is left of the window: SIGKILL of the injector child itself while the thread holds
    the injection registers.  The caller gets the "died" error; the copy the injector had taken
    stays, unreported, in our fd table; the thread resumed with the injection registers."""
    t = target("read")
    t.wait_syscall(NR["read"])
    before = uffds_here()
    th, out = inject_in_thread(t.pid, hold_s=1.0)
    t.wait_syscall(NR["userfaultfd"])
    # the copy taken: the injector is in the hold
    wait_until(lambda: uffds_here() - before, 5, "the injector's copy of the userfaultfd in our fd table")
    os.kill(int(t.status("TracerPid")), signal.SIGKILL)
    th.join(timeout=5)
    err = out.get("error")
    assert isinstance(err, OSError) and err.errno == errno.ECHILD, out
    assert "died without reporting" in str(err)
    leaked = uffds_here() - before
    assert len(leaked) == 1
    for fd in leaked:
        os.close(fd)
    print(f"target after the injector's death: state {t.status('State')}, "
          f"syscall {t.syscall() if t.proc.poll() is None else 'exited ' + str(t.proc.poll())}")


def test_stopped_process_stays_stopped(target):
    """A process in group stop (SIGSTOP) is injected and is stopped again after the detach."""
    t = target("read")
    t.wait_syscall(NR["read"])
    os.kill(t.pid, signal.SIGSTOP)
    wait_until(lambda: t.status("State").startswith("T"), 5, f"target {t.pid} to stop")
    inj = inject_userfaultfd(t.pid)
    os.close(inj.fd)
    assert inj.restarted and inj.signal_kept == 0
    assert t.status("State").startswith("T (stopped)") and t.status("TracerPid") == "0"
    os.kill(t.pid, signal.SIGCONT)
    t.wait_syscall(NR["read"])
    assert t.woken() == BLOCKED["read"][2]


def test_bad_syscall_address_leaves_target_intact(target):
    """An address that faults (unmapped): the forced SIGSEGV is dropped, the thread restored."""
    t = target("read")
    t.wait_syscall(NR["read"])
    with pytest.raises(OSError, match="the injected userfaultfd") as e:
        inject_userfaultfd_at(t.pid, t.pid, 0x1000)
    assert e.value.errno == errno.EFAULT
    t.wait_syscall(NR["read"])
    assert find_uffd_fds(t.pid) == [] and t.status("TracerPid") == "0"
    assert t.woken() == BLOCKED["read"][2]


def test_zombie_leader_injects_another_thread(target):
    t = target("leader_exit")
    wait_until(lambda: open(f"/proc/{t.pid}/task/{t.pid}/stat").read().rpartition(")")[2].split()[0] == "Z",
               5, f"target {t.pid}'s leader to be a zombie")
    tid = pick_thread(t.pid)
    assert tid != t.pid and os.path.exists(f"/proc/{t.pid}/task/{tid}")
    u = Userfaultfd.inject(t.pid)
    assert u.injection.tid == tid
    track(u, t, t.anon)
    assert t.ask("write anon 2 3") == "OK"
    # /proc/PID/pagemap of a zombie leader has no mm (ESRCH); /proc/TID/... is the same mm
    assert scan_written(tid, t.anon, t.pages) == [2, 3]
    u.close()
    t.runs_on()


CALLER = r"""
import sys
from migrator.kernel.inject import inject_userfaultfd
inject_userfaultfd(int(sys.argv[1]), hold_s=2.0)
print("returned", flush=True)
"""
PR_SET_CHILD_SUBREAPER = 36


@pytest.mark.slow
def test_caller_killed_mid_injection(target):
    """SIGKILL to the injecting process (and its whole process group) while the target holds the
    injection registers: the injector child, in its own session, finishes, restores and detaches."""
    t = target("read")
    t.wait_syscall(NR["read"])
    # become the subreaper, so that the orphaned injector is ours to reap (and to check)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    try:
        caller = subprocess.Popen([sys.executable, "-c", CALLER, str(t.pid)], cwd=ROOT,
                                  start_new_session=True, stdout=subprocess.PIPE)
        t.wait_syscall(NR["userfaultfd"], timeout=10)
        injector = int(t.status("TracerPid"))
        assert injector not in (0, caller.pid)
        os.killpg(caller.pid, signal.SIGKILL)
        assert caller.wait() == -signal.SIGKILL and caller.stdout.read() == b""
        r = wait_until(lambda: (w := os.waitpid(injector, os.WNOHANG))[0] and w, 5,
                       f"the orphaned injector {injector} to finish")
        assert os.WIFEXITED(r[1]) and os.WEXITSTATUS(r[1]) == 0
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
    assert t.status("TracerPid") == "0" and find_uffd_fds(t.pid) == []
    t.wait_syscall(NR["read"])
    t.runs_on()
    assert t.woken() == BLOCKED["read"][2]


def test_timing_and_repeat(target):
    """20 injections into one blocked thread: each leaves it intact (printed: seize-to-detach)."""
    t = target("read")
    t.wait_syscall(NR["read"])
    runs = []
    for _ in range(20):
        inj = inject_userfaultfd(t.pid)
        os.close(inj.fd)
        runs.append(inj)
    assert find_uffd_fds(t.pid) == []
    for name in ("total_s", "stop_wait_s", "window_s"):
        us = [getattr(r, name) * 1e6 for r in runs]
        print(f"{name}: min {min(us):.0f} µs, median {statistics.median(us):.0f} µs, max {max(us):.0f} µs")
    t.wait_syscall(NR["read"])
    assert t.woken() == BLOCKED["read"][2]


def test_probe_injection(root):
    ok, detail = probe_injection()
    assert ok, detail
    assert re.fullmatch(r"userfaultfd injected into a child in \d+ µs \(seize to detach, thread "
                        r"held \d+ µs\); WP_ASYNC granted", detail), detail
    print(detail)


def test_thread_in_epoll_wait_is_not_the_one_injected(target):
    """epoll_wait fails with EINTR after any stop of its thread (signal(7)); the leader blocked in
    it is passed over for another thread, and its epoll_wait returns the event, no EINTR."""
    t = target("epoll")
    t.wait_syscall(NR["epoll_wait"])
    inj = inject_userfaultfd(t.pid)
    os.close(inj.fd)
    assert inj.tid != t.pid and os.path.exists(f"/proc/{t.pid}/task/{inj.tid}")
    assert find_uffd_fds(t.pid) == [] and t.status("TracerPid") == "0"
    assert t.woken() == {"ret": 1, "errno": 0, "data": "hello", "mask_ok": 1}


def test_epoll_wait_of_an_injected_thread_fails_with_eintr(target):
    """Why pick_thread passes over such a thread: injected anyway (no preflight), its epoll_wait
    returns EINTR, as after any ptrace stop or SIGSTOP/SIGCONT of it (signal(7))."""
    t = target("epoll")
    t.wait_syscall(NR["epoll_wait"])
    os.close(inject_userfaultfd_at(t.pid, t.pid, find_syscall_instruction(t.pid)).fd)
    res = t.result()
    res.pop("ns")
    assert res == {"ret": -1, "errno": 4, "data": "-", "mask_ok": 1}
