/* Per-page XXH3-64 with a run-time choice of the fastest build for this CPU (internal). */
#ifndef MIGRATOR_PAGEHASH_H
#define MIGRATOR_PAGEHASH_H
#include <stdint.h>

void mg_page_hashes_avx2(const uint8_t *addr, uint64_t npages, uint64_t page_size,
                         uint64_t *hashes);

#endif
