/*
 * migrator page-stream fast path (module migrator._stream_c, with pages.h): the loops of the
 * sender and the receiver that Python cannot run fast, with the policy (batch sizes, which round
 * wins, errors) left to Python.
 *   - mg_sock_io: send or receive a whole buffer on a non-blocking socket;
 *   - mg_pack_pages: the source side of a batch: zero pages become zero runs, the other pages
 *     are copied out (a snapshot) and hashed while hot in cache; given the hashes of what the
 *     destination holds, only the pages that differ from them (a final round, fused with its
 *     scan for changes);
 *   - mg_apply_batch: the destination side: write a checked batch into its image, page stamps
 *     deciding whether a copy is newer than what the image holds.
 * Functions return >= 0 on success and -errno on failure; no global state.
 */
#ifndef MIGRATOR_STREAM_H
#define MIGRATOR_STREAM_H
#include <stdint.h>

#include "delta.h"

#define MG_IO_DONE 0       /* all bytes moved */
#define MG_IO_AGAIN 1      /* timeout_ms passed: the caller checks whether to go on, and calls again */
#define MG_IO_EOF 2        /* receiving: the peer closed the connection */

/* Move len bytes of buf through the non-blocking socket fd (send if sending, else receive),
 * waiting with poll() when it would block, for at most about timeout_ms per call (so a caller
 * notices a stop request even while data keeps flowing).  *done counts the bytes moved (start it
 * at 0; a call after MG_IO_AGAIN resumes where the last one stopped).  Returns MG_IO_DONE,
 * MG_IO_AGAIN or MG_IO_EOF, or -errno. */
int mg_sock_io(int fd, uint8_t *buf, uint64_t len, int sending, int timeout_ms, uint64_t *done);

/* A batch being packed by mg_pack_pages.  The caller owns every array and sets the capacities;
 * the counters start at 0.  With known set, a page whose XXH3-64 equals known[page] (page
 * numbers of the region) is skipped unless its bit in force is set, and known[page] is set for
 * every page taken. */
struct mg_pack {
    uint8_t *out;            /* data pages, packed: out_cap pages */
    uint64_t *hashes;        /* XXH3-64 of each packed page: out_cap entries */
    uint64_t out_cap;
    uint64_t out_pages;
    uint64_t *data_runs;     /* (first, count) pairs: run_cap pairs */
    uint64_t *zero_runs;     /* (first, count) pairs: run_cap pairs */
    uint64_t run_cap;
    uint64_t n_data_runs;
    uint64_t n_zero_runs;
    uint64_t zero_pages;
    uint64_t zero_cap;       /* zero pages a batch may mark */
    uint64_t *known;         /* NULL, or the hash of every page of the region as the destination has it */
    uint64_t zero_hash;      /* with known or stable: the XXH3-64 of a zero page */
    const uint8_t *force;    /* with known: NULL, or a bitmap of region pages (bit page % 8 of
                                byte page / 8) to take even if unchanged */
    uint64_t skipped;        /* with known: pages skipped, the same as known */
    int stable;              /* the source does not change while packed (paused), so a page is
                                hashed where it lies, and its hash is its copy's: not hashed twice */
    int nocopy;              /* with stable: data pages are not copied to out (the caller sends
                                them from where they lie, by data_runs) */
    struct mg_delta_job *delta;  /* NULL, or every data page is also encoded as a delta while
                                    in cache, and every zero page's copy dropped (delta.h) */
};

/* Add pages first .. first + npages - 1 of a region, whose contents are at src, to the batch:
 * an all-zero page extends the zero runs, any other page is copied to out (src may be out's
 * own buffer at or after the packing position: pages only move down) and hashed (the copy).
 * With st->known, a page is hashed where it is first and skipped if unchanged.  Stops before
 * the first page that does not fit (out, the run lists or the zero pages full).  Returns the
 * pages done, skipped ones included (0 when the batch is full). */
int64_t mg_pack_pages(const uint8_t *src, uint64_t first, uint64_t npages, uint64_t page_size,
                      struct mg_pack *st);

/* Add pages first .. first + npages - 1, known to be zeros without reading them (holes of the
 * memory object), to the batch's zero runs (with st->known: those not known as zero pages).
 * Returns the pages done (0 when full). */
int64_t mg_pack_zeros(uint64_t first, uint64_t npages, struct mg_pack *st);

/* What mg_pack_object learnt of a memory object, kept by the caller between calls (start
 * zeroed): pages [hole_at, data_at) are a hole; window is how many pages to ask mincore about. */
struct mg_extent {
    uint64_t hole_at;
    uint64_t data_at;
    uint64_t window;
};

/* mg_pack_pages for pages of a memory object mapped at src (page-aligned; page_size must be the
 * system's): page first + i lies at byte offset + (first + i) * page_size of fd.  Holes become
 * zero runs without being read (a read fault there would allocate them): mincore() finds pages
 * in the page cache (data), SEEK_DATA tells holes, skipped whole, from swapped-out pages (data:
 * reading them swaps them in).  SEEK_HOLE is never used: it scans to the end of the data.
 * Returns the pages taken, or -errno. */
int64_t mg_pack_object(const uint8_t *src, int fd, uint64_t offset, uint64_t first,
                       uint64_t npages, uint64_t page_size, struct mg_pack *st,
                       struct mg_extent *hint);

/* The all-zero pages among npages pages at buf, with the test mg_pack_pages uses (the bare
 * scan the benchmark compares the stream of zero-heavy memory with). */
int64_t mg_count_zero_pages(const uint8_t *buf, uint64_t npages, uint64_t page_size);

/* What mg_apply_batch did, added to the counters. */
struct mg_apply_stats {
    uint64_t written;   /* pages written with data */
    uint64_t zeroed;    /* pages marked zero (written as zeros if they held data) */
    uint64_t stale;     /* pages skipped: the image holds a copy from a later round */
};

/* Write a batch of round_no into the image fd of a region of npages pages.  stamps[p] is
 * 2 * (round + 1) + has_data of the copy page p holds (0: never written); a page's copy is
 * replaced only by one from the same or a later round.  img_hashes[p] is the XXH3-64 of page p
 * as written; page_hashes those of the batch's data pages.  zero_buf (zero_len bytes of zeros,
 * a multiple of page_size) is what a page that held data is overwritten with when it becomes
 * zero.  write_chunk (bytes, a multiple of page_size; 0: no limit) caps each write call: on a
 * file system with large folios (ext4), a 1 MiB write leaves a folio every later 4 KiB rewrite
 * of it walks whole (33 us a rewrite here, against 4-6 us after writes of 64 KiB).  Returns 0,
 * or -EINVAL for a run outside the region, or -errno of a failed write. */
int mg_apply_batch(int fd, uint64_t write_chunk, uint32_t *stamps, uint64_t *img_hashes, uint64_t npages,
                   const uint8_t *data, const uint64_t *page_hashes,
                   const uint64_t *data_runs, uint64_t n_data_runs,
                   const uint64_t *zero_runs, uint64_t n_zero_runs,
                   uint32_t round_no, uint64_t zero_hash, uint64_t page_size,
                   const uint8_t *zero_buf, uint64_t zero_len, struct mg_apply_stats *st);

/* --- a region digest's leaves (transport/digest.py) ---------------------------------------- */
/* Set stale[c] = 1 for every chunk c (of 1 << shift pages) that one of nruns flat (first, count)
 * runs touches.  Returns 0, or -EINVAL for a run beyond npages or a bad shift. */
int mg_mark_chunks(const uint64_t *runs, uint64_t nruns, uint64_t npages, unsigned shift,
                   uint8_t *stale);
/* For every leaf c (the 8-byte page hashes of pages [c << shift, (c + 1) << shift), the last one
 * shorter) whose stale[c] is set (every leaf when stale is NULL): clear stale[c], then
 * leaves[8c..8c+8) = XXH3-64 of its hashes, big-endian (xxhash's canonical form).  Returns the
 * leaves hashed, or -EINVAL for a bad shift. */
int64_t mg_hash_leaves(const uint8_t *hashes, uint64_t npages, unsigned shift, uint8_t *stale,
                       uint8_t *leaves);

/* The file system type of fd's file (statfs f_type) into *type.  Returns 0 or -errno. */
int mg_fs_type(int fd, uint64_t *type);

/* Write back a file's dirty pages (sync_file_range over the whole file): wait = 0 starts the
 * write-out without waiting; wait = 1 also waits for it (and for what was under write-out
 * already).  Not an fsync: no metadata, no cache flush of the device.  A receiver writing
 * gigabytes keeps the page cache's dirty pages low, so the kernel does not throttle its writes
 * later, in the pause.  Returns 0 or -errno. */
int mg_writeback(int fd, int wait);

#endif
