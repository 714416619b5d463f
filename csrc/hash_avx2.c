/* Per-page kernels compiled for AVX2: XXH3-64 of each page (about 25 % faster per page than the
 * SSE2 build) and the zero-page test.  Called only through dispatchers (pages.c, stream.c) that
 * check the CPU at run time. */
#pragma GCC target("avx2")
#define XXH_INLINE_ALL
#define XXH_VECTOR XXH_AVX2
#include <xxhash.h>

#include <immintrin.h>

#include "pagehash.h"

void mg_page_hashes_avx2(const uint8_t *addr, uint64_t npages, uint64_t page_size,
                         uint64_t *hashes)
{
    for (uint64_t i = 0; i < npages; i++)
        hashes[i] = XXH3_64bits(addr + i * page_size, page_size);
}

/* 1 if the page is all zeros (unaligned loads: pages may sit anywhere in a buffer). */
int mg_page_is_zero_avx2(const uint8_t *p, uint64_t page_size)
{
    __m256i acc = _mm256_setzero_si256();
    for (uint64_t i = 0; i < page_size; i += 128) {
        __m256i a = _mm256_or_si256(_mm256_loadu_si256((const __m256i *)(p + i)),
                                    _mm256_loadu_si256((const __m256i *)(p + i + 32)));
        __m256i b = _mm256_or_si256(_mm256_loadu_si256((const __m256i *)(p + i + 64)),
                                    _mm256_loadu_si256((const __m256i *)(p + i + 96)));
        acc = _mm256_or_si256(acc, _mm256_or_si256(a, b));
        if (!_mm256_testz_si256(acc, acc))
            return 0;     /* a data page usually stops here, in its first 128 bytes */
    }
    return 1;
}
