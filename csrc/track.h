/*
 * migrator tracking fast path (module migrator._kernel_c): pagemap decoding, PAGEMAP_SCAN walks,
 * userfaultfd set-up, the ledger's content sweeps beside pages.h's, bitmaps.  Small, boring
 * loops and syscalls; Python owns every policy decision.
 *
 * Conventions: functions return >= 0 on success and -errno on failure.  No global state: callers
 * pass every buffer in.  Bitmaps are LSB-first: page i is bit (i % 8) of byte (i / 8).
 */
#ifndef MIGRATOR_TRACK_H
#define MIGRATOR_TRACK_H
#include <stdint.h>

struct mg_page_region {          /* layout of the kernel's struct page_region */
    uint64_t start;
    uint64_t end;                /* exclusive */
    uint64_t categories;
};

/* --- pagemap (8-byte entries) ------------------------------------------------------------- */
/* Read npages entries starting at virtual address vaddr into out.  Returns entries read. */
int64_t mg_pagemap_read(int pagemap_fd, uint64_t vaddr, uint64_t npages, uint64_t page_size,
                        uint64_t *out);
/* For each entry i with (entry & mask) == want, set bit (bit_offset + i) in bitmap.
 * Returns the number of bits set by this call. */
int64_t mg_pagemap_match(const uint64_t *entries, uint64_t n, uint64_t mask, uint64_t want,
                         uint8_t *bitmap, uint64_t bit_offset);
/* Read pagemap for [vaddr, vaddr + npages pages) in windows through buf (buf_entries long) and
 * set bitmap bits of the pages whose entry matches (entry & mask) == want.  Returns bits set. */
int64_t mg_pagemap_match_range(int pagemap_fd, uint64_t vaddr, uint64_t npages,
                               uint64_t page_size, uint64_t mask, uint64_t want,
                               uint64_t *buf, uint64_t buf_entries, uint8_t *bitmap);

/* --- PAGEMAP_SCAN ioctl ------------------------------------------------------------------- */
/* One ioctl.  Returns the number of regions filled; *walk_end receives where the walk stopped. */
int64_t mg_pagemap_scan(int pagemap_fd, uint64_t start, uint64_t end, uint64_t flags,
                        uint64_t category_inverted, uint64_t category_mask,
                        uint64_t category_anyof_mask, uint64_t return_mask, uint64_t max_pages,
                        struct mg_page_region *vec, uint64_t vec_len, uint64_t *walk_end);
/* Walk [start, end) to the end, continuing from walk_end whenever vec fills, and set the bitmap
 * bits (page index relative to start) of every reported page.  Returns pages reported. */
int64_t mg_pagemap_scan_bitmap(int pagemap_fd, uint64_t start, uint64_t end, uint64_t flags,
                               uint64_t category_mask, uint64_t return_mask,
                               uint64_t page_size, struct mg_page_region *vec, uint64_t vec_len,
                               uint8_t *bitmap, uint64_t *ioctl_calls);

/* --- userfaultfd, pidfd ------------------------------------------------------------------- */
/* Guest side: create a userfaultfd in the calling process (the mm it tracks).  Returns the fd. */
int mg_uffd_create(void);
/* Tracker side. */
int mg_pidfd_open(int pid);
int mg_pidfd_getfd(int pidfd, int target_fd);
int mg_uffd_api(int uffd, uint64_t features, uint64_t *features_out, uint64_t *ioctls_out);
int mg_uffd_register_wp(int uffd, uint64_t start, uint64_t len);
int mg_uffd_unregister(int uffd, uint64_t start, uint64_t len);
int mg_uffd_writeprotect(int uffd, uint64_t start, uint64_t len, int protect);

/* --- content sweeps beside pages.h's (XXH3-64, one hash per page) ------------------------- */
/* Of the n pages listed in pages (page numbers from addr, data pages of a mapping), how many
 * hash differently from hashes[page]; nothing is updated (a sample, not a sweep). */
int64_t mg_count_changed(const uint8_t *addr, const uint64_t *pages, uint64_t n,
                         uint64_t page_size, const uint64_t *hashes);
/* pages.h's mg_sweep_fd for memory of a (possibly) other process, read with process_vm_readv.
 * Pages that cannot be read (unmapped) are skipped with their hash left unchanged; the count of
 * those goes to *unreadable. */
int64_t mg_sweep_remote(int pid, uint64_t vaddr, uint64_t npages, uint64_t page_size,
                        uint8_t *buf, uint64_t buf_len, uint64_t *hashes, uint8_t *bitmap,
                        uint64_t bit_offset, uint64_t *unreadable);
/* Set bit i of bitmap for every i < n with gens[i] > since.  Returns bits set. */
int64_t mg_gens_since(const uint32_t *gens, uint64_t n, uint32_t since, uint8_t *bitmap);

/* --- bitmaps -------------------------------------------------------------------------------- */
/* Emit runs of set bits as (start, end) pairs into runs (max_runs pairs), beginning the search
 * at *pos; *pos is advanced past the last emitted run.  Returns runs emitted. */
int64_t mg_bitmap_runs(const uint8_t *bitmap, uint64_t nbits, uint64_t *pos, uint64_t *runs,
                       uint64_t max_runs);
int64_t mg_bitmap_count(const uint8_t *bitmap, uint64_t nbytes);
/* dst |= src, nbytes bytes. */
void mg_bitmap_or(uint8_t *dst, const uint8_t *src, uint64_t nbytes);
/* dst = a & ~b, nbytes bytes (dst may be a). */
void mg_bitmap_andnot(uint8_t *dst, const uint8_t *a, const uint8_t *b, uint64_t nbytes);

#endif
