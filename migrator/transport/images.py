"""Destination images: one raw file per source region (byte offset = page offset in the region)
and manifest.json, always replaced atomically.  Pages are written where they belong as batches
arrive (pwrite), so memory stays bounded: besides the files, 4 bytes per page of bookkeeping.

Each page keeps a stamp: 2 * (round + 1) + has_data (0 = never written, reads as zeros).  A copy
from round r is applied only if the page's stamp is from round r or older, so a page resent in a
later round is never overwritten by an older copy that arrives late on another channel.
"""

from __future__ import annotations

import array
import dataclasses
import queue
import errno
import json
import mmap
import os
import re
import threading
from dataclasses import dataclass
from typing import Any, Sequence

from ._native import ffi, lib
from ..errors import MigratorError, ProtocolError
from . import wire
from .delta import ImagePatcher
from .digest import TableDigest, page_hashes, zero_page_hash
from .wire import Batch, RegionSpec

MANIFEST = "manifest.json"
_ZERO_WRITE = 1 << 20


PREPARE_CHUNK = 1 << 20    # bytes fallocated at a time (it holds the file's lock: writes wait)

def image_name(index: int, name: str) -> str:
    """A safe file name for region #index: its name with anything odd replaced."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")[:100] or "region"
    return f"{index:03d}-{safe}.img"


# Files under the output folder are opened relative to a descriptor of the folder, never through
# a symbolic link, and created exclusively: something planted in the folder (a link to another
# file, a hard link, a FIFO) makes the receiver refuse the session naming it, never write
# through it.  The folder itself must be ours and writable by nobody else (check_out_dir).
O_CREATE_SAFE = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def check_out_dir(path: str, create: bool = True) -> None:
    """The receiver's output folder must be a directory owned by this user and not writable by
    group or others (who could plant links in it); MigratorError naming the problem."""
    if create:
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
        except OSError as e:
            raise MigratorError(f"cannot create output folder {path!r}: {e.strerror}") from None
    try:
        st = os.stat(path)
    except OSError as e:
        raise MigratorError(f"output folder {path!r}: {e.strerror}") from None
    _check_dir_stat(path, st)


def _check_dir_stat(path: str, st: os.stat_result) -> None:
    import stat as _stat
    if not _stat.S_ISDIR(st.st_mode):
        raise MigratorError(f"output folder {path!r} is not a directory")
    if st.st_uid != os.geteuid():
        raise MigratorError(f"output folder {path!r} belongs to uid {st.st_uid}, not to this user "
                            f"(uid {os.geteuid()}): use a folder of your own")
    if st.st_mode & 0o022:
        raise MigratorError(f"output folder {path!r} is writable by "
                            f"{'others' if st.st_mode & 0o002 else 'its group'} (mode "
                            f"{st.st_mode & 0o7777:o}), who could plant links in it: use a folder "
                            f"of your own, or chmod go-w it")


def open_dir(path: str) -> int:
    """A descriptor of the output folder (checked as check_out_dir does)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _check_dir_stat(path, os.fstat(fd))
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_image_file(dirfd: int, name: str) -> int:
    """The image file `name` in the folder, read-write: created if missing; if it exists, it
    must be a regular file of ours with no other link (an earlier image, perhaps mapped by a
    destination VM: then the same file is reused)."""
    import stat as _stat
    try:
        return os.open(name, os.O_RDWR | O_CREATE_SAFE, 0o600, dir_fd=dirfd)
    except FileExistsError:
        pass
    try:
        fd = os.open(name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dirfd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise MigratorError(f"{name!r} in the output folder is a symbolic link: refusing to "
                                f"write through it") from None
        raise
    try:
        st = os.fstat(fd)
        if not _stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_uid != os.geteuid():
            raise MigratorError(f"{name!r} in the output folder is not a regular file of ours with a "
                                f"single link: refusing to write it")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


class ManifestUncertain(OSError):
    """The new file may be in place (renamed) but not durable: what the folder holds is unknown."""


def write_json_atomic(path: str, obj: Any, dirfd: int | None = None) -> None:
    """Write obj as JSON to path (a name in dirfd's folder if given) through a temporary file
    created exclusively, fsynced, renamed over it; then the folder is fsynced.

    Raises:
        ManifestUncertain: the rename was done, the folder's fsync failed.
        OSError: before the rename (the old file, if any, is untouched; the temporary one gone).
    """
    own = dirfd is None
    if own:
        dirfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    name = os.path.basename(path)
    tmp = f"{name}.tmp.{os.getpid()}"
    try:
        try:
            os.unlink(tmp, dir_fd=dirfd)      # (left by a crash)
        except FileNotFoundError:
            pass
        fd = os.open(tmp, os.O_WRONLY | O_CREATE_SAFE, 0o644, dir_fd=dirfd)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(obj, f, indent=2)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=dirfd)     # (a full disk: no half-written file left)
            except OSError:
                pass
            raise
        try:
            os.fsync(dirfd)
        except OSError as e:
            raise ManifestUncertain(e.errno, e.strerror) from None
    finally:
        if own:
            os.close(dirfd)


@dataclass(frozen=True)
class Verdict:
    name: str
    verified: bool
    source_digest: str
    dest_digest: str


# an image write call's largest size on a file system with large folios: ext4 makes a folio of
# each large write, and a later 4 KiB rewrite into it walks it whole (a random rewrite cost 33 us
# after 1 MiB writes, 4-6 us after 64 KiB ones, here; round 0 itself was no slower). tmpfs here
# has no large folios: one call per run there.
WRITE_CHUNK = 64 << 10
TMPFS_MAGIC = 0x01021994


def write_chunk_for(fd: int) -> int:
    """WRITE_CHUNK, or 0 (no limit) for tmpfs."""
    t = ffi.new("uint64_t *")
    return 0 if lib.mg_fs_type(fd, t) == 0 and t[0] == TMPFS_MAGIC else WRITE_CHUNK


# bytes written into an image between two starts of its write-back: dirty pages stay well below
# the kernel's throttling limits, so a pause's writes are not held up by a round's backlog
WRITEBACK_EVERY = 64 << 20


class _Image:
    def __init__(self, path: str, region: RegionSpec, page_size: int, preallocate: bool = False,
                 dirfd: int | None = None):
        self.path = path
        self.region = region
        self.npages = region.size // page_size
        if dirfd is None:
            dirfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                self.fd = open_image_file(dirfd, os.path.basename(path))
            finally:
                os.close(dirfd)
        else:
            self.fd = open_image_file(dirfd, os.path.basename(path))
        try:
            os.ftruncate(self.fd, 0)       # (an earlier image's pages are not this session's)
            os.ftruncate(self.fd, region.size)
            if preallocate:      # allocate now, not page by page while the migration runs
                os.posix_fallocate(self.fd, 0, region.size)
            # anonymous mapping: zero pages on demand, so a huge region costs only what is touched
            self._map = mmap.mmap(-1, 4 * self.npages)
            try:
                # the XXH3-64 of every page as it is now on disk (the digest is computed from these)
                self.hash_map = mmap.mmap(-1, 8 * max(self.npages, 1))
            except BaseException:
                self._map.close()
                raise
        except BaseException:
            os.close(self.fd)          # (no descriptor left behind by a failed set-up)
            raise
        self.write_chunk = write_chunk_for(self.fd)
        self.stamps_c = ffi.from_buffer("uint32_t[]", self._map)
        self.hashes = memoryview(self.hash_map).cast("Q")
        self.hashes_c = ffi.from_buffer("uint64_t[]", self.hash_map)
        self.zero_hash = zero_page_hash(page_size)
        self.unflushed = 0          # bytes written since the last write-back was started
        self.unsettled = 0          # bytes written since the last settle()
        if self.npages:
            self.hashes[:self.npages] = array.array("Q", [self.zero_hash]) * self.npages
        self.digest = TableDigest(self.hash_map, self.npages)
        self.patcher: ImagePatcher | None = None    # delta batches' mapping (the first one makes it)

    def close(self) -> None:
        if self.patcher is not None:
            self.patcher.close()
            self.patcher = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.hashes.release()
        self.digest.close()
        ffi.release(self.stamps_c)
        ffi.release(self.hashes_c)
        self._map.close()
        self.hash_map.close()



class ImageSet:
    """The images of one session in out_dir, with the manifest describing them."""

    def __init__(self, out_dir: str, regions: Sequence[RegionSpec], page_size: int, session: str,
                 preallocate: bool = False, names: Sequence[str] | None = None):
        self.out_dir = out_dir
        self.regions = list(regions)
        self.page_size = page_size
        self.session = session
        # (names: one file name per region, chosen by the caller, e.g. where a QEMU maps it)
        self.names = list(names) if names is not None else [image_name(i, r.name) for i, r in enumerate(self.regions)]
        if len(self.names) != len(self.regions):
            raise ValueError(f"{len(self.names)} image names for {len(self.regions)} regions")
        self.status = ["receiving"] * len(self.regions)
        self.digests: list[str | None] = [None] * len(self.regions)
        self.complete = False
        self.error: str | None = None
        self._images: list[_Image] = []
        self._lock = threading.Lock()   # apply() may run in several worker threads at once
        self._closed = False
        self._preparer: threading.Thread | None = None      # see prepare()
        self._prep_stop = False
        self.bytes_prepared = 0
        self._announced = [0] * len(self.regions)     # pages PREPAREd per region (capped)
        self._dirfd = -1
        try:
            check_out_dir(out_dir)
            self._dirfd = open_dir(out_dir)
            # first the manifest (so an earlier 'complete' never survives), then the files
            self.write_manifest()
            for name, region in zip(self.names, self.regions):
                self._images.append(_Image(os.path.join(out_dir, name), region, page_size, preallocate,
                                           self._dirfd))
        except (OSError, MigratorError) as e:
            if isinstance(e, OSError):
                e = MigratorError(f"cannot create images in {out_dir!r}: {e.strerror}"
                                  f"{f' ({e.filename!r})' if e.filename else ''}")
            if self._dirfd >= 0:
                self.fail(str(e))       # (the manifest says so: never 'receiving' forever)
            self.close()
            raise e from None
        except BaseException:
            self.close()
            raise
        self.pages_written = 0
        self.pages_zeroed = 0
        self.pages_stale = 0
        self.writeback_waits = 0     # round ends that waited for an image's write-back (settle)
        # the session may send deltas: pages written whole after round 0 (the ones a guest
        # rewrites) are faulted into the images' mappings at their round's end (warm())
        self.deltas = False
        self._to_warm: list[tuple[int, tuple[int, ...]]] = []     # (region, data runs)
        self._zeros = ffi.new("uint8_t[]", max(_ZERO_WRITE, page_size))

    @property
    def region_pages(self) -> list[int]:
        return [r.size // self.page_size for r in self.regions]

    def write_manifest(self) -> None:
        write_json_atomic(os.path.join(self.out_dir, MANIFEST), {
            "complete": self.complete,
            "session": self.session,
            "page_size": self.page_size,
            "error": self.error,
            "regions": [
                {"name": r.name, "start": r.start, "end": r.end, "size": r.size,
                 "image": name, "digest": digest, "status": status}
                for r, name, digest, status in zip(self.regions, self.names, self.digests, self.status)
            ],
        }, self._dirfd if self._dirfd >= 0 else None)

    def apply(self, batch: Batch) -> None:
        """Write a validated batch (wire.check_batch passed) into its image (thread-safe).
        After close() (the session failed on another channel) a batch is refused, never
        written into unmapped tables."""
        with self._lock:
            self._check_open()
            self._apply(batch)

    def _check_open(self) -> None:
        if self._closed:
            raise MigratorError("the session's images are closed (the session ended)")

    def _apply(self, batch: Batch) -> None:
        img = self._images[batch.region]
        if batch.compression == wire.DELTA:
            self._apply_delta(img, batch)
            if not batch.zero_flat:
                return
            batch = dataclasses.replace(batch, data_flat=(), data=b"", page_hashes=b"", compression=0)
        hashes = batch.page_hashes if batch.page_hashes else page_hashes(batch.data, self.page_size)
        if self.deltas and batch.round_no and batch.data_flat:
            self._to_warm.append((batch.region, batch.data_flat))
        n_data, n_zero = len(batch.data_flat) // 2, len(batch.zero_flat) // 2
        data_runs = ffi.new("uint64_t[]", batch.data_flat)
        zero_runs = ffi.new("uint64_t[]", batch.zero_flat)
        st = ffi.new("struct mg_apply_stats *")
        # (buffers released at once: see framing.FrameStream._bulk)
        with ffi.from_buffer(batch.data) as data, ffi.from_buffer("uint64_t[]", hashes) as hs:
            r = lib.mg_apply_batch(
                img.fd, img.write_chunk, img.stamps_c, img.hashes_c, img.npages, data, hs,
                data_runs, n_data, zero_runs, n_zero,
                batch.round_no, img.zero_hash, self.page_size, self._zeros, len(self._zeros), st)
        if r < 0:
            img.digest.touch_all()      # (a batch refused part-way may have changed pages)
        else:
            img.digest.touch_c(data_runs, n_data)
            img.digest.touch_c(zero_runs, n_zero)
        self.pages_written += st.written
        self.pages_zeroed += st.zeroed
        self.pages_stale += st.stale
        img.unflushed += st.written * self.page_size
        img.unsettled += st.written * self.page_size
        if img.unflushed >= WRITEBACK_EVERY and r >= 0:
            img.unflushed = 0
            self._worker_locked()
            self._prep_jobs.put((img, 0, 0))        # (a write-back start, off this thread)
        if r < 0:
            what = "a page run outside the region" if r == -errno.EINVAL else os.strerror(-r)
            raise MigratorError(f"writing image {self.names[batch.region]!r}: {what}")

    def _apply_delta(self, img: _Image, batch: Batch) -> None:
        """Patch the image with a delta batch's data pages, then prove them with the batch hash."""
        what = f"BATCH of region #{batch.region}, round {batch.round_no}"
        if img.patcher is None:
            img.patcher = ImagePatcher(img.fd, img.region.size)
        hashes = img.patcher.apply(what, img.npages, img.stamps_c, img.hashes_c, batch.data,
                                   batch.data_flat, batch.round_no, self.page_size)
        data_runs = ffi.new("uint64_t[]", batch.data_flat)
        img.digest.touch_c(data_runs, len(batch.data_flat) // 2)
        n = len(hashes) // 8
        self.pages_written += n
        img.unflushed += n * self.page_size
        img.unsettled += n * self.page_size
        got = wire.batch_digest(batch.region, batch.round_no, batch.data_flat, batch.zero_flat, (),
                                self.page_size, hashes)
        if got != batch.digest:
            raise ProtocolError(f"{what}: its deltas, applied to the image, give other pages than "
                                f"the sender's (batch hash mismatch): the image is not a copy")

    def warm(self, now: bool) -> None:
        """At a round's end (before its acknowledgement): with now (the sender cached the
        round's pages: RoundEnd.warm), map the pages the round wrote whole after round 0 into
        the images' mappings for delta batches, so a later round's deltas, the pause's, do not
        fault them in one by one (1.5-2 us a page here); else forget them.
        The pages are written already (a fault cannot need new space: no SIGBUS on a full file
        system)."""
        with self._lock:
            self._check_open()
            todo, self._to_warm = self._to_warm, []
            if not now:
                return
            for region, flat in todo:
                img = self._images[region]
                if img.patcher is None:
                    img.patcher = ImagePatcher(img.fd, img.region.size)
                img.patcher.populate(flat, self.page_size)

    def settle(self) -> None:
        """At a round's end, before its acknowledgement: wait until the pages of an image that
        took at least WRITEBACK_EVERY bytes since the last settle are written back (blocking).
        A large round (round 0) is then acknowledged once the disk has it, and the pause does
        not inherit its backlog (the kernel would throttle the pause's writes); a small round
        does not wait.  The stop-and-copy's round end (RoundEnd.final) never calls it: what the
        rounds left unsettled, the pause's pages included, is made durable after the verdict,
        outside the pause.  Nothing to do on tmpfs."""
        with self._lock:
            self._check_open()
            for img in self._images:
                if img.unsettled >= WRITEBACK_EVERY:
                    img.unsettled = img.unflushed = 0
                    self.writeback_waits += 1
                    lib.mg_writeback(img.fd, 1)     # (best effort, as in _apply)

    def refresh_digests(self) -> None:
        """Bring the images' digests up to date (blocking: after a round's acknowledgement), so
        that the verification hashes only the pages of the rounds since."""
        with self._lock:
            if not self._closed:
                for img in self._images:
                    img.digest.refresh()

    def verify(self, source_digests: Sequence[str]) -> list[Verdict]:
        """Digest the images from their per-page hashes and compare (blocking: run it in a
        thread).  A mismatch is written to the manifest at once; a complete verdict by sync(),
        once the image files are on disk."""
        out = []
        with self._lock:
            self._check_open()
            for i, (img, src) in enumerate(zip(self._images, source_digests)):
                got = img.digest.digest()       # (the leaves changed since the last refresh)
                self.digests[i] = got
                self.status[i] = "verified" if got == src else "mismatch"
                out.append(Verdict(img.region.name, got == src, src, got))
        self.complete = all(v.verified for v in out)
        if not self.complete:
            bad = [v.name for v in out if not v.verified]
            self.error = f"digest mismatch in {', '.join(bad)}"
            self.write_manifest()
        return out

    def sync(self, record: bool = True) -> None:
        """Flush the image files to disk, then (record) write the verdict into the manifest
        (after the verdict went out: not part of the downtime).  So the manifest says complete
        only once the images it vouches for are on disk; writing it earlier, inside the pause,
        would also wait for the file system to commit the images' data (ext4's ordered mode).
        Without record, the manifest waits for record_verdict() (the sender's COMMIT)."""
        with self._lock:
            self._check_open()
            for img in self._images:
                os.fsync(img.fd)
        if record:
            self.write_manifest()

    def record_verdict(self) -> None:
        """Write the manifest with the verdict (complete, once the sender committed).

        Raises:
            OSError: it could not be written, and the manifest on disk does not say complete
                (the sender may resume its source).
            ManifestUncertain: it may say complete, or not (the sender must not resume).
        """
        with self._lock:
            self._check_open()
        try:
            self.write_manifest()
        except ManifestUncertain as e:
            # the complete manifest may be in place without being durable: a failed one over it
            reason = f"the manifest could not be made durable: {e.strerror}"
            self.complete = False
            self.error = reason
            self.write_manifest()          # (ManifestUncertain again: nothing more to do)
            raise OSError(e.errno, reason) from None

    def fail(self, reason: str) -> None:
        """Mark the session failed on disk (never complete)."""
        self.complete = False
        self.error = reason
        self.status = ["failed" if s == "receiving" else s for s in self.status]
        try:
            self.write_manifest()
        except OSError:
            pass

    def prepare(self, region: int, runs_flat: Sequence[int]) -> None:
        """Allocate (fallocate) pages of a region's image that are about to get data (a PREPARE,
        checked by wire.check_batch), in a thread of its own beside the stream: the writes
        then find their pages allocated.  Best effort: a failure only ends the preparing.
        A session may announce each page of a region once in all (ProtocolError beyond that),
        so the work a peer can queue is one pass over its regions."""
        ps = self.page_size
        pages = sum(runs_flat[1::2])
        # under the lock: close() (another channel failed the session) may run meanwhile, from
        # the event loop; after it no thread may start and no job may reach a closed file
        with self._lock:
            self._check_open()
            img = self._images[region]
            self._announced[region] += pages
            if self._announced[region] > img.npages:
                raise ProtocolError(f"PREPARE announces {self._announced[region]} pages of region "
                                    f"{img.region.name!r} in all, which holds {img.npages}")
            self._worker_locked()
            for first, count in zip(runs_flat[0::2], runs_flat[1::2]):
                for off in range(first * ps, (first + count) * ps, PREPARE_CHUNK):
                    self._prep_jobs.put((img, off, min(PREPARE_CHUNK, (first + count) * ps - off)))

    def _worker_locked(self) -> None:
        """Start the thread of background file work (PREPARE's fallocate, write-back starts),
        under self._lock."""
        if self._preparer is None:
            self._prep_jobs: queue.Queue = queue.Queue()
            self._preparer = threading.Thread(target=self._prepare_loop, name="image-prepare", daemon=True)
            self._preparer.start()

    def _prepare_loop(self) -> None:
        while True:
            job = self._prep_jobs.get()
            try:
                if job is None:
                    return
                if self._prep_stop:
                    continue
                img, offset, length = job
                if length == 0:
                    # a write-back start: sync_file_range over a file of scattered dirty pages
                    # can wait on the disk's queue for 0.4 s here, so never in a writer
                    lib.mg_writeback(img.fd, 0)     # (best effort: only the timing of writes changes)
                    continue
                try:
                    os.posix_fallocate(img.fd, offset, length)
                    self.bytes_prepared += length
                except OSError:        # (no room, or a file system without it: writes allocate)
                    self._prep_stop = True
            finally:
                self._prep_jobs.task_done()

    def wait_prepared(self) -> None:
        """Until every PREPARE so far is done (tests)."""
        if self._preparer is not None:
            self._prep_jobs.join()

    def _stop_preparing(self) -> None:
        with self._lock:
            preparer, self._preparer = self._preparer, None
            self._prep_stop = True
            if preparer is not None:
                self._prep_jobs.put(None)
        if preparer is not None:
            preparer.join()         # (not under the lock: a fallocate may take a while)

    def close(self) -> None:
        """Free the images.  Safe while other channels' writer threads are inside apply() or
        prepare(): it waits for the batch being written, and later batches are refused."""
        with self._lock:
            self._closed = True     # (from now on apply() and prepare() refuse)
        self._stop_preparing()      # (before its file descriptors go)
        with self._lock:
            for img in self._images:
                img.close()
            self._images = []
            if self._dirfd >= 0:
                os.close(self._dirfd)
                self._dirfd = -1
