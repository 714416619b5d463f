"""A complete migration is complete only once the destination's images are on disk: a disk that
fills up after the verdict fails the migration cleanly (found by bench faults: the receiver died
of an uncaught ENOSPC while the sender reported success)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import require
from migrator.errors import MigratorError
from migrator.transport import RegionSpec, connect_sender, digest_bytes
from migrator.transport.receiver import Receiver

from migration_helpers import manifest
from transport_helpers import KEY, PS, Logs, MemReader, random_memory

NPAGES = 256


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A tmpfs with room for one page (the set-up's manifest) plus the image, preallocated."""
    require(os.geteuid() == 0, "needs root to mount a tmpfs")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    size = (1 + NPAGES) * PS
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "mg-test", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


async def test_full_disk_after_the_verdict_fails_the_migration(nursery, tiny_tmpfs):
    logs = Logs()
    rx = Receiver(str(tiny_tmpfs), key=KEY, log=logs, preallocate=True)
    port = await nursery.start(rx.serve, "127.0.0.1", 0)
    regions = [RegionSpec("ram", 0, NPAGES * PS)]
    mem = {"ram": random_memory(NPAGES, 3, zero_fraction=0.0)}
    async with connect_sender("127.0.0.1", port, key=KEY, regions=regions) as s:
        await s.send_pages({"ram": [(0, NPAGES)]}, MemReader(mem), 0)
        res = await s.finish({"ram": digest_bytes(mem["ram"])})
        assert res.complete                          # the pages verified ...
        with pytest.raises(MigratorError, match="could not store them: .*No space left on device"):
            await s.wait_synced(30)                  # ... but never reached the disk
    (o,) = await rx.wait_sessions(1)
    assert not o.complete and "not stored" in o.error
    with open(tiny_tmpfs / "manifest.json") as f:       # (the set-up's: no room for another)
        m = json.load(f)
    assert m["complete"] is False
    # the receiver serves on (a smaller session fits once the big image is gone)
    os.unlink(tiny_tmpfs / m["regions"][0]["image"])
    small = [RegionSpec("ram", 0, 8 * PS)]
    mem2 = {"ram": random_memory(8, 4)}
    async with connect_sender("127.0.0.1", port, key=KEY, regions=small) as s:
        await s.send_pages({"ram": [(0, 8)]}, MemReader(mem2), 0)
        assert (await s.finish({"ram": digest_bytes(mem2["ram"])})).complete
        await s.wait_synced(30)
    assert manifest(str(tiny_tmpfs))["complete"] is True


def _fill(mnt) -> None:
    """Take every free byte of the tmpfs (a ballast file)."""
    fd = os.open(mnt / "ballast", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while os.write(fd, b"\1" * PS):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)


async def test_a_commit_the_receiver_cannot_record_is_refused_in_words(nursery, tiny_tmpfs):
    """The disk fills up between SYNCED and COMMIT: the receiver cannot write its complete
    manifest, and says so (ERROR) instead of COMMITTED; the sender gets CommitRefusedError (its
    caller may resume the source: the manifest on disk does not say complete).  Found by bench
    faults: migrate kept its source paused though the destination was not complete."""
    from migrator.errors import CommitRefusedError
    logs = Logs()
    rx = Receiver(str(tiny_tmpfs), key=KEY, log=logs, preallocate=True)
    port = await nursery.start(rx.serve, "127.0.0.1", 0)
    regions = [RegionSpec("ram", 0, 8 * PS)]
    mem = {"ram": random_memory(8, 5, zero_fraction=0.0)}
    async with connect_sender("127.0.0.1", port, key=KEY, regions=regions) as s:
        await s.send_pages({"ram": [(0, 8)]}, MemReader(mem), 0)
        assert (await s.finish({"ram": digest_bytes(mem["ram"])}, commit=True)).complete
        await s.wait_synced(30)
        _fill(tiny_tmpfs)
        await s.commit()
        with pytest.raises(CommitRefusedError, match="manifest could not be written: No space left"):
            await s.wait_committed(30)
    (o,) = await rx.wait_sessions(1)
    assert not o.complete and "manifest could not be written" in o.error
    with open(tiny_tmpfs / "manifest.json") as f:      # (the set-up's: no room for another)
        assert json.load(f)["complete"] is False
    assert [n for n in os.listdir(tiny_tmpfs) if ".tmp." in n] == []     # (no half-written file)


def test_a_manifest_not_made_durable_is_replaced_by_a_failed_one(tmp_path, monkeypatch):
    """The complete manifest was renamed in place but the folder's fsync failed: it may or may
    not survive a crash, so a failed manifest is written over it, and the caller is told the
    manifest does not say complete (OSError, not ManifestUncertain)."""
    from migrator.transport import images as images_mod
    from migrator.transport.images import ImageSet, ManifestUncertain
    out = tmp_path / "out"
    out.mkdir(mode=0o700)
    ims = ImageSet(str(out), [RegionSpec("ram", 0, 4 * PS)], PS, "ab" * 8)
    ims.complete = True                       # (as a verified session before its commit)
    real, failed = os.fsync, []

    def fsync(fd):
        if fd == ims._dirfd and not failed:
            failed.append(fd)
            raise OSError(5, "Input/output error")
        return real(fd)
    monkeypatch.setattr(images_mod.os, "fsync", fsync)
    with pytest.raises(OSError, match="could not be made durable: Input/output error") as ei:
        ims.record_verdict()
    assert not isinstance(ei.value, ManifestUncertain) and failed
    with open(out / "manifest.json") as f:
        assert json.load(f)["complete"] is False
    ims.close()
