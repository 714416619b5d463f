/* Per-page kernels built for AVX2 (internal: callers check the CPU at run time). */
#ifndef MIGRATOR_PAGEHASH_H
#define MIGRATOR_PAGEHASH_H
#include <stdint.h>

void mg_page_hashes_avx2(const uint8_t *addr, uint64_t npages, uint64_t page_size,
                         uint64_t *hashes);
int mg_page_is_zero_avx2(const uint8_t *p, uint64_t page_size);   /* page_size % 128 == 0 */

#endif
