/*
 * Page hashes and page population, compiled into two modules: migrator._stream_c exports these
 * functions under the names below (mg_*), migrator._kernel_c under the prefix mgk_ instead
 * (build.py renames them in its cdef and maps mgk_x to mg_x with a #define), so that no name is
 * exported by two modules while the code is written once.
 *
 * Hash tables hold the XXH3-64 of each page (8 bytes a page).  A sweep compares fresh hashes
 * with a table: where one differs it stores the new hash, sets bit (bit_offset + i) in bitmap
 * (bitmap may be NULL) and gens[i] = gen (gens may be NULL), and counts the page.  Bitmaps are
 * LSB-first.  Functions return >= 0 on success and -errno on failure; no global state.
 */
#ifndef MIGRATOR_PAGES_H
#define MIGRATOR_PAGES_H
#include <stdint.h>

/* Hash npages pages of memory at addr into hashes (AVX2 build when the CPU has it). */
void mg_hash_mem_pages(const uint8_t *addr, uint64_t npages, uint64_t page_size,
                       uint64_t *hashes);
/* XXH3-64 of a page of zeros (0 for page_size > 64 KiB). */
uint64_t mg_hash_zero_page(uint64_t page_size);
/* Sweep of npages pages read with pread from fd at byte offset, in chunks through buf (buf_len
 * bytes, at least one page).  Pages that read short (end of object) hash as zero pages.
 * Returns the number of changed pages. */
int64_t mg_sweep_fd(int fd, uint64_t offset, uint64_t npages, uint64_t page_size,
                    uint8_t *buf, uint64_t buf_len, uint64_t *hashes, uint8_t *bitmap,
                    uint64_t bit_offset, uint32_t *gens, uint32_t gen);
/* mg_sweep_fd's comparison on memory that is mapped already (a read-only mapping of the
 * object: no copy; the caller keeps it to pages that hold data, since a read fault on a shmem
 * hole allocates the page). */
int64_t mg_sweep_mem(const uint8_t *addr, uint64_t npages, uint64_t page_size, uint64_t *hashes,
                     uint8_t *bitmap, uint64_t bit_offset, uint32_t *gens, uint32_t gen);
/* Pages [first, first + n) are holes (read as zero): compare with the zero-page hash as above. */
int64_t mg_sweep_hole(uint64_t n, uint64_t zero_hash, uint64_t *hashes, uint8_t *bitmap,
                      uint64_t bit_offset, uint32_t *gens, uint32_t gen);
/* Set hashes[p] for every page p of nruns (first, count) runs: to values[k] for the k-th page
 * in order, or to fill when values is NULL.  Returns 0, or -EINVAL for a run beyond npages. */
int mg_set_hashes(uint64_t *hashes, uint64_t npages, const uint64_t *runs, uint64_t nruns,
                  const uint64_t *values, uint64_t fill);
/* Fault in the pages of a mapped range of len bytes in one call (MADV_POPULATE_READ, or _WRITE
 * if write), so later accesses do not fault one by one.  Linux 5.14+: older kernels give
 * -EINVAL. */
int mg_populate(uint8_t *addr, uint64_t len, int write);

#endif
