"""bench/_frames.py: the warm-up the stream benchmarks run before each session writes real fresh
memory (it shows in the process's peak RSS) and gives it back at once (it leaves none behind)."""

from migrator.bench._frames import warm_frames


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"{field} missing from /proc/self/status")


def test_warm_frames_writes_the_memory_and_releases_it():
    size = 64 << 20
    with open("/proc/self/clear_refs", "w") as f:     # reset VmHWM to the current RSS
        f.write("5")
    rss0 = _status_kib("VmRSS")
    assert _status_kib("VmHWM") < rss0 + 1024
    secs_per_gib = warm_frames(size)
    assert secs_per_gib > 0
    # every page was written (the peak grew by the size, less what the interpreter itself may
    # have freed meanwhile: 1 MiB), and none of it is still held
    assert _status_kib("VmHWM") >= rss0 + (size >> 10) - 1024
    assert _status_kib("VmRSS") < rss0 + (8 << 10)


def test_warm_frames_of_nothing_costs_nothing():
    assert warm_frames(0) == 0.0
