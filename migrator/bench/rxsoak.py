"""Receiver soak: one long-running `migrator receive` serves hundreds of sessions, some of whose
senders are SIGKILLed at a random moment; its fds, threads and memory must come back.

Each session is a sender of its own (`python -m migrator.bench.rxsoak sender ...`, a real process
speaking to the receiver over TCP with the key: 2 channels, a region of --size random pages, END
with the commit, SYNCED, COMMIT, COMMITTED).  A share of them (--abort) is SIGKILLed at a moment
drawn uniformly over a complete session's duration (measured on the first ones): mid set-up,
mid-stream, before the verdict or the commit (the clock starts once the sender process is up).  After each session: the receiver alive, its
session ended (log), its descriptors and threads (trio's idle cached workers aside) back to the
counts after the first session, its VmRSS.  Printed: a line every --progress sessions, then the
verdict: crashes, fd/thread leaks, and RSS growth after the first 10 sessions (the target: at most
--rss-growth-mib, default 16).  Exit status 0 only without any finding.

    python -m migrator.bench rxsoak --sessions 200 --abort 0.2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from ..receiver_process import ReceiverProcess
from ..transport.auth import generate_key_file, load_key
from .faults import END_RE, SETUP_RE, Counts, process_counts, settle_counts

PAGE = 4096
SESSION_CAP_S = 60.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sessions", type=int, default=200, help="sessions (default 200)")
    p.add_argument("--abort", type=float, default=0.2, help="share of senders SIGKILLed (default 0.2)")
    p.add_argument("--size", default="16M", help="each session's region (default 16M)")
    p.add_argument("--channels", type=int, default=2, help="channels a session (default 2)")
    p.add_argument("--seed", type=int, help="random seed (default: drawn and printed)")
    p.add_argument("--settle", type=float, default=5.0,
                   help="seconds the receiver gets to return to its fd/thread counts (default 5)")
    p.add_argument("--rss-growth-mib", type=float, default=16.0,
                   help="largest VmRSS growth allowed after the first 10 sessions (default 16)")
    p.add_argument("--progress", type=int, default=20, help="a line every N sessions (default 20)")
    p.add_argument("--out", default="/dev/shm", help="where the receiver's folder goes (default /dev/shm)")
    p.add_argument("--json", metavar="FILE", help="write every session and the verdict as JSON")


def _size(text: str) -> int:
    from ..units import parse_size
    return parse_size(text)


def _session_ends(text: str) -> dict[str, str]:
    return {m.group(1): m.group(2) for m in END_RE.finditer(text)}


class _Soak:
    """The soak's state (the receiver, the sessions so far, the counts after the first one) and
    its steps: one sender run (killed or not), the receiver's session awaited, its counts."""

    def __init__(self, args: argparse.Namespace, rng: random.Random, size: int, base: str) -> None:
        self.args, self.rng, self.size = args, rng, size
        self.out_dir = os.path.join(base, "out")
        self.key_file = os.path.join(base, "key")
        # (64 hex digits: raw random bytes could start or end with white space, which a key file
        # loses; the sender then held another key than the receiver, once in ~20 runs)
        generate_key_file(self.key_file)
        self.base = base
        self.sessions: list[dict] = []
        self.baseline: Counts | None = None
        self.durations: list[float] = []
        self.crash: str | None = None

    def start(self) -> None:
        self.rx = ReceiverProcess(self.out_dir, os.path.join(self.base, "receiver.log"), self.key_file)
        self.t_start = time.monotonic()

    def sender(self, i: int) -> dict:
        """Session i's sender, SIGKILLed after a random share of a session's median duration if
        drawn to abort.  Returns the session's record."""
        args, rng, rx = self.args, self.rng, self.rx
        abort = i > 3 and rng.random() < args.abort     # (the first ones measure a session)
        kill_after = rng.uniform(0, statistics.median(self.durations)) if abort else None
        t0 = time.monotonic()
        p = subprocess.Popen([sys.executable, "-m", "migrator.bench.rxsoak", "sender", str(rx.port),
                              self.key_file, str(self.size), str(rng.randrange(1 << 30)), str(args.channels)],
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
        # (the clock starts once the sender has imported everything: the kill falls in its session)
        assert p.stdout is not None
        ready, _, _ = select.select([p.stdout], [], [], SESSION_CAP_S)
        first = p.stdout.readline() if ready else ""
        t0 = time.monotonic()
        if kill_after is not None and first == "started\n":
            try:
                p.wait(kill_after)
            except subprocess.TimeoutExpired:
                p.kill()
        try:
            output, _ = p.communicate(timeout=SESSION_CAP_S)
        except subprocess.TimeoutExpired:
            p.kill()
            output, _ = p.communicate()
        output = first + output
        took = time.monotonic() - t0
        rec = {"session": i, "aborted": abort, "kill_after_s": kill_after,
               "sender_rc": p.returncode, "sender_s": round(took, 3)}
        if not abort:
            if p.returncode != 0:
                rec["problem"] = f"a sender that was not killed failed: {output.strip()[-300:]}"
            self.durations.append(took)
        return rec

    def session_end(self, rec: dict, mark: int) -> None:
        """The receiver's session (if one was set up) ended, its verdict recorded; the images removed."""
        rx = self.rx
        deadline = time.monotonic() + SESSION_CAP_S
        while True:
            text = rx.text()[mark:]
            started = SETUP_RE.findall(text)
            ends = _session_ends(text)
            if rx.proc.poll() is not None or all(s in ends for s in started):
                break
            if time.monotonic() > deadline:
                rec["problem"] = "the receiver's session never ended"
                break
            time.sleep(0.01)
        rec["verdict"] = ",".join(ends.get(s, "?") for s in started) or "no session"
        for name in os.listdir(self.out_dir):          # (the images: 16 MiB a session on tmpfs)
            if name.endswith(".img"):
                os.unlink(os.path.join(self.out_dir, name))

    def counts(self, rec: dict) -> None:
        """The receiver's fds, threads and VmRSS: the first session's are the baseline, later
        ones must settle back to it (else a leak)."""
        rx, baseline = self.rx, self.baseline
        if baseline is None:
            baseline = self.baseline = process_counts(rx.proc.pid)
            c = baseline
        else:
            c, _ = settle_counts(rx.proc.pid, baseline, self.args.settle)
        if c is not None:
            rec.update(fds=c.fds, threads=c.threads, rss_mib=round(c.rss_kib / 1024, 1),
                       rss_anon_mib=round(c.rss_anon_kib / 1024, 1))
            if baseline is not None and c.fds > baseline.fds:
                rec["problem"] = f"fd leak: {c.fds} > {baseline.fds}"
            if baseline is not None and c.threads > baseline.threads:
                rec["problem"] = f"thread leak: {c.threads} > {baseline.threads}"

    def run_sessions(self) -> None:
        """The sessions, one after the other, until --sessions or the receiver's death."""
        args, rx, sessions = self.args, self.rx, self.sessions
        for i in range(1, args.sessions + 1):
            mark = len(rx.text())
            rec = self.sender(i)
            self.session_end(rec, mark)
            if rx.proc.poll() is not None:
                self.crash = rec["crash"] = f"the receiver exited with status {rx.proc.returncode}: " \
                                            f"{rx.text()[mark:].strip()[-500:]}"
                sessions.append(rec)
                break
            self.counts(rec)
            sessions.append(rec)
            if rec.get("problem"):
                print(f"  session {i}: PROBLEM: {rec['problem']}", flush=True)
            if i % args.progress == 0 or i == args.sessions:
                done = [s for s in sessions if "rss_mib" in s]
                print(f"[{time.monotonic() - self.t_start:5.0f} s] {i} sessions ({sum(s['aborted'] for s in sessions)} "
                      f"aborted): receiver fds {rec.get('fds')} threads {rec.get('threads')} "
                      f"rss {rec.get('rss_mib')} MiB (max {max(s['rss_mib'] for s in done):.1f})", flush=True)


def _verdict(sessions: list[dict], baseline: Counts | None, crash: str | None, limit_mib: float) -> dict:
    """The soak's verdict: counts of sessions, crashes and leaks, fds, threads and VmRSS growth
    after the first 10 sessions against limit_mib; "ok" if none."""
    rss = [s["rss_mib"] for s in sessions if "rss_mib" in s]
    after10 = rss[9] if len(rss) >= 10 else (rss[-1] if rss else 0.0)
    growth = (max(rss[9:]) - after10) if len(rss) > 10 else 0.0
    verdict = {
        "sessions": len(sessions),
        "aborted": sum(s["aborted"] for s in sessions),
        "completed": sum(s["verdict"] == "complete" for s in sessions),
        "receiver_crashes": int(crash is not None),
        "fd_leaks": sum("fd leak" in s.get("problem", "") for s in sessions),
        "thread_leaks": sum("thread leak" in s.get("problem", "") for s in sessions),
        "other_problems": sum(bool(s.get("problem")) and "leak" not in s["problem"] for s in sessions),
        "fds": {"baseline": baseline.fds if baseline else None, "last": sessions[-1].get("fds") if sessions else None},
        "threads": {"baseline": baseline.threads if baseline else None,
                    "last": sessions[-1].get("threads") if sessions else None},
        "rss_mib": {"first": rss[0] if rss else None, "after_10": after10, "max_after_10": max(rss[9:]) if len(rss) > 10 else None,
                    "last": rss[-1] if rss else None, "growth_after_10": round(growth, 1),
                    "limit": limit_mib},
    }
    ok = (not crash and not verdict["fd_leaks"] and not verdict["thread_leaks"]
          and not verdict["other_problems"] and growth <= limit_mib)
    verdict["ok"] = ok
    return verdict


def _print_verdict(verdict: dict, crash: str | None, seconds: float, seed: int) -> None:
    print(f"\n{verdict['sessions']} sessions, {verdict['aborted']} senders SIGKILLed, "
          f"{verdict['completed']} complete, in {seconds:.0f} s, seed {seed}")
    print(f"receiver crashes {verdict['receiver_crashes']}, fd leaks {verdict['fd_leaks']}, thread leaks "
          f"{verdict['thread_leaks']}, other problems {verdict['other_problems']}; fds {verdict['fds']['baseline']} -> "
          f"{verdict['fds']['last']}, threads {verdict['threads']['baseline']} -> {verdict['threads']['last']}")
    r = verdict["rss_mib"]
    print(f"VmRSS MiB: first {r['first']}, after 10 sessions {r['after_10']}, max after that {r['max_after_10']}, "
          f"last {r['last']}: growth {r['growth_after_10']} MiB (limit {r['limit']:.0f})")
    if crash:
        print(f"CRASH: {crash}")
    print("verdict: " + ("OK" if verdict["ok"] else "FINDINGS (exit status 1)"), flush=True)


def run(args: argparse.Namespace) -> int:
    seed = args.seed if args.seed is not None else random.randrange(1 << 31)
    rng = random.Random(seed)
    size = _size(args.size)
    base = tempfile.mkdtemp(prefix="migrator-rxsoak-", dir=args.out)
    os.chmod(base, 0o700)
    soak = _Soak(args, rng, size, base)
    print(f"receiver soak: {args.sessions} sessions of {args.size} on {args.channels} channel(s), "
          f"{args.abort:.0%} senders SIGKILLed, seed {seed}", flush=True)
    soak.start()
    try:
        soak.run_sessions()
    finally:
        soak.rx.stop()
        shutil.rmtree(base, ignore_errors=True)
    verdict = _verdict(soak.sessions, soak.baseline, soak.crash, args.rss_growth_mib)
    ok = verdict["ok"]
    _print_verdict(verdict, soak.crash, time.monotonic() - soak.t_start, seed)
    if args.json:
        with open(args.json, "w") as f:
            config = {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))}
            json.dump({"seed": seed, "config": config, "verdict": verdict, "sessions": soak.sessions}, f, indent=1)
            f.write("\n")
    return 0 if ok else 1


# --- the sender: a process of its own, so that it can be SIGKILLed ---------------------------

def sender_main(argv: list[str]) -> int:
    import trio

    from ..transport import RegionSpec, connect_sender, digest_bytes
    from ..transport.digest import BufferReader

    port, key_file, size, seed, channels = int(argv[0]), argv[1], int(argv[2]), int(argv[3]), int(argv[4])
    key = load_key(key_file)
    mem = bytearray(random.Random(seed).randbytes(size))
    npages = size // PAGE

    class Reader(BufferReader):
        def read(self, name: str, first: int, n: int):
            return memoryview(mem)[first * PAGE:(first + n) * PAGE]

    async def session() -> None:
        async with connect_sender("127.0.0.1", port, key=key, regions=[RegionSpec("ram", 0, size)],
                                  channels=channels) as s:
            await s.send_pages({"ram": [(0, npages)]}, Reader(), 0)
            res = await s.finish({"ram": digest_bytes(mem)}, commit=True)
            if not res.complete:
                raise SystemExit(f"not verified: {res}")
            await s.wait_synced(30)
            await s.commit()
            await s.wait_committed(30)

    print("started", flush=True)
    trio.run(session)
    print("complete", flush=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["sender"]:
        sys.exit(sender_main(sys.argv[2:]))
    sys.exit("usage: python -m migrator.bench rxsoak ...")
