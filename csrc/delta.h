/*
 * migrator delta batches (module migrator._stream_c): a page that was sent before and is sent
 * again goes as the bytes that changed since, against a copy the sender keeps (XBZRLE's idea in
 * QEMU).  A guest that rewrites a few bytes of many pages (counters, list heads, a database's
 * row headers) then costs a few bytes a page on the wire and in the pause, not 4 KiB.
 *
 * A page's delta is a list of records, each (skip, len, len bytes): skip bytes unchanged, then len
 * bytes of new contents; skip and len are unsigned LEB128 varints.  Records cover the page exactly;
 * only the last one may have len 0.  The sender's copy of a page is the one the receiver holds,
 * and only a copy from a round the receiver acknowledged is used, so the receiver applies the
 * delta to its own image; the batch hash (over the new pages' hashes) proves the result.
 *
 * The policy (which rounds, whether a batch goes as deltas, the cache size) is Python's
 * (transport/delta.py).  Functions return >= 0 on success and -errno on failure; no global state.
 */
#ifndef MIGRATOR_DELTA_H
#define MIGRATOR_DELTA_H
#include <stdint.h>

/* The sender's copies of pages as last sent, direct-mapped: the page whose key is k (the
 * session's page number: a region's first page number plus the page) lives in slot k % nslots,
 * replacing whatever was there.  The caller owns every array (zeroed at first). */
struct mg_delta_cache {
    uint8_t *pages;      /* nslots * page_size bytes: the copies */
    uint64_t *keys;      /* nslots: key + 1 of the page a slot holds (0: empty) */
    uint32_t *rounds;    /* nslots: the round that copy was sent in */
    uint8_t *busy;       /* nslots: a thread is using the slot (a spin lock) */
    uint64_t nslots;
    uint64_t page_size;  /* a multiple of 8 */
};

/* What one mg_delta_encode call found. */
struct mg_delta_stats {
    uint64_t hits;       /* pages encoded against their copy */
    uint64_t misses;     /* pages without a usable copy (the batch cannot go as deltas) */
    uint64_t bytes;      /* encoded size of the hits (bytes) */
};

/* One batch's delta encoding under way (mg_delta_take; mg_pack_pages fuses it into its
 * loop: see stream.h): the caller sets the fields above len, and zeroes len and st. */
struct mg_delta_job {
    struct mg_delta_cache *cache;
    uint64_t key_base;       /* the region's first key */
    uint32_t round_no;       /* the round the pages go in */
    uint32_t base_round;     /* copies from rounds up to this one are usable */
    int keep;                /* cache the pages (else drop their copies: not sent again) */
    uint8_t *out;            /* the deltas, while they fit cap bytes */
    uint64_t cap;
    uint64_t len;            /* bytes of deltas so far (may pass cap: then out is incomplete) */
    struct mg_delta_stats st;
};

/* Add page (a region page number) whose contents are at cur to the job: see mg_delta_encode. */
void mg_delta_take(struct mg_delta_job *j, const uint8_t *cur, uint64_t page);

/* Drop the copy of the page whose key is key, if the cache holds it.  Returns 1 if it did. */
int mg_delta_drop(struct mg_delta_cache *c, uint64_t key);

/* The data pages of a batch, runs ((first, count) pairs, region page numbers, key_base + page
 * their keys): their contents at src + i * page_size for the i-th data page (contiguous != 0: a
 * batch buffer), else at src + page * page_size (the region's mapping).  For each page:
 *   - a hit (its slot holds its copy, from a round <= base_round and < round_no): its delta is
 *     written to out (while the encoding fits out_cap bytes), and the copy becomes the page;
 *   - a miss: the page whole (one literal record); with cache set, the slot takes it, unless
 *     the slot holds another page sent in round_no or the round before (which keeps it); without
 *     it, an older copy of the page is dropped.
 * Returns the encoded size (bytes; out holds the encoding when it is <= out_cap), or -EINVAL. */
int64_t mg_delta_encode(const uint8_t *src, int contiguous, const uint64_t *runs, uint64_t nruns,
                        uint64_t key_base, uint32_t round_no, uint32_t base_round, int cache,
                        struct mg_delta_cache *c, uint8_t *out, uint64_t out_cap,
                        struct mg_delta_stats *st);

/* Drop the copies of the pages of runs (pages sent as zeros, or batches never sent).  Returns
 * the copies dropped. */
int64_t mg_delta_forget(const uint64_t *runs, uint64_t nruns, uint64_t key_base,
                        struct mg_delta_cache *c);

/* Apply a delta batch of round_no to an image of npages pages, open as fd and mapped at map
 * (shared, writable): the deltas of the pages of runs, in order, are the len bytes at delta.  A
 * page holding data from an earlier round (stamps[p] odd and below round_no's: see
 * mg_apply_batch) is patched in place; one holding none (never written, or zeros) may only come
 * whole (one literal record) and is written with pwrite (a file system may need space for it).
 * The whole batch is checked before any page changes; then each page is patched or written,
 * hashed into hashes[i] (XXH3-64, the i-th page) and img_hashes[p], and stamped.  Returns 0,
 * -EINVAL for malformed deltas or a run outside the image (*bad: the data page index), -ESTALE
 * for a page from this round or a later one, or a patch of a page without data (*bad: the page
 * number), or -errno of a failed write. */
int mg_apply_delta(int fd, uint8_t *map, uint64_t npages, uint32_t *stamps, uint64_t *img_hashes,
                   const uint8_t *delta, uint64_t len, const uint64_t *runs, uint64_t nruns,
                   uint32_t round_no, uint64_t page_size, uint64_t *hashes, uint64_t *bad);

#endif
