/* Page hashes and page population: see pages.h (built into migrator._kernel_c and _stream_c). */
#define _GNU_SOURCE
#include <errno.h>
#include <string.h>
#include <sys/mman.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "common.h"
#include "pagehash.h"
#include "pages.h"

void mg_hash_mem_pages(const uint8_t *addr, uint64_t npages, uint64_t page_size,
                       uint64_t *hashes)
{
    if (__builtin_cpu_supports("avx2")) {
        mg_page_hashes_avx2(addr, npages, page_size, hashes);
        return;
    }
    for (uint64_t i = 0; i < npages; i++)
        hashes[i] = XXH3_64bits(addr + i * page_size, page_size);
}

uint64_t mg_hash_zero_page(uint64_t page_size)
{
    static const uint8_t zero[65536];   /* read-only constant, not mutable state */
    if (page_size > sizeof(zero))
        return 0;
    return XXH3_64bits(zero, page_size);
}

/* Store hash h of page i if it differs from hashes[i], marking the page; 1 if it did. */
static inline int64_t note(uint64_t i, uint64_t h, uint64_t *hashes, uint8_t *bitmap,
                           uint64_t bit_offset, uint32_t *gens, uint32_t gen)
{
    if (h == hashes[i])
        return 0;
    hashes[i] = h;
    if (bitmap)
        mg_bit_set(bitmap, bit_offset + i);
    if (gens)
        gens[i] = gen;
    return 1;
}

int64_t mg_compare_pages(const uint8_t *buf, uint64_t n, uint64_t page_size, uint64_t *hashes,
                         uint8_t *bitmap, uint64_t bit_offset, uint32_t *gens, uint32_t gen)
{
    int64_t changed = 0;
    uint64_t fresh[64];
    for (uint64_t i = 0; i < n; i++) {
        if (i % 64 == 0)     /* hash up to 64 pages at a time with the fastest build */
            mg_hash_mem_pages(buf + i * page_size, n - i < 64 ? n - i : 64, page_size, fresh);
        changed += note(i, fresh[i % 64], hashes, bitmap, bit_offset, gens, gen);
    }
    return changed;
}

int64_t mg_sweep_mem(const uint8_t *addr, uint64_t npages, uint64_t page_size, uint64_t *hashes,
                     uint8_t *bitmap, uint64_t bit_offset, uint32_t *gens, uint32_t gen)
{
    return mg_compare_pages(addr, npages, page_size, hashes, bitmap, bit_offset, gens, gen);
}

int64_t mg_sweep_fd(int fd, uint64_t offset, uint64_t npages, uint64_t page_size,
                    uint8_t *buf, uint64_t buf_len, uint64_t *hashes, uint8_t *bitmap,
                    uint64_t bit_offset, uint32_t *gens, uint32_t gen)
{
    uint64_t chunk = buf_len / page_size;
    int64_t changed = 0;
    if (chunk == 0)
        return -EINVAL;
    for (uint64_t done = 0; done < npages;) {
        uint64_t n = npages - done < chunk ? npages - done : chunk;
        int64_t got = mg_pread_full(fd, buf, n * page_size, offset + done * page_size);
        if (got < 0)
            return got;
        if ((uint64_t)got < n * page_size)   /* past the end of the object: zeros */
            memset(buf + got, 0, n * page_size - (uint64_t)got);
        changed += mg_compare_pages(buf, n, page_size, hashes + done, bitmap, bit_offset + done,
                                    gens ? gens + done : NULL, gen);
        done += n;
    }
    return changed;
}

int64_t mg_sweep_hole(uint64_t n, uint64_t zero_hash, uint64_t *hashes, uint8_t *bitmap,
                      uint64_t bit_offset, uint32_t *gens, uint32_t gen)
{
    int64_t changed = 0;
    for (uint64_t i = 0; i < n; i++)
        changed += note(i, zero_hash, hashes, bitmap, bit_offset, gens, gen);
    return changed;
}

int mg_set_hashes(uint64_t *hashes, uint64_t npages, const uint64_t *runs, uint64_t nruns,
                  const uint64_t *values, uint64_t fill)
{
    uint64_t k = 0;
    for (uint64_t r = 0; r < nruns; r++) {
        uint64_t first = runs[2 * r], count = runs[2 * r + 1];
        if (first >= npages || count > npages - first)
            return -EINVAL;
        for (uint64_t i = 0; i < count; i++)
            hashes[first + i] = values ? values[k++] : fill;
    }
    return 0;
}

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#define MADV_POPULATE_WRITE 23
#endif

int mg_populate(uint8_t *addr, uint64_t len, int write)
{
    if (len == 0)
        return 0;
    if (madvise(addr, len, write ? MADV_POPULATE_WRITE : MADV_POPULATE_READ) < 0)
        return -errno;
    return 0;
}
