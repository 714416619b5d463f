/* Internal to the modules that build pages.c (never in a cdef): the per-page kernels built for
 * AVX2 (callers check the CPU at run time) and the sweep's comparison loop. */
#ifndef MIGRATOR_PAGEHASH_H
#define MIGRATOR_PAGEHASH_H
#include <stdint.h>

void mg_page_hashes_avx2(const uint8_t *addr, uint64_t npages, uint64_t page_size,
                         uint64_t *hashes);
int mg_page_is_zero_avx2(const uint8_t *p, uint64_t page_size);   /* page_size % 128 == 0 */

/* Hash n freshly read pages at buf and compare them with hashes (pages.h: a sweep).  Returns
 * pages changed. */
int64_t mg_compare_pages(const uint8_t *buf, uint64_t n, uint64_t page_size, uint64_t *hashes,
                         uint8_t *bitmap, uint64_t bit_offset, uint32_t *gens, uint32_t gen);

#endif
