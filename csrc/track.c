/* migrator tracking fast path: see track.h for the contract of each function. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <linux/userfaultfd.h>

#include "common.h"
#include "pagehash.h"
#include "pages.h"
#include "track.h"

/* Defined here because the 6.1 linux-libc-dev headers predate PAGEMAP_SCAN and WP_ASYNC. */
struct mg_pm_scan_arg {
    uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages;
    uint64_t category_inverted, category_mask, category_anyof_mask, return_mask;
};
#define MG_PAGEMAP_SCAN _IOWR('f', 16, struct mg_pm_scan_arg)

#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif
#ifndef __NR_pidfd_open
#define __NR_pidfd_open 434
#endif
#ifndef __NR_pidfd_getfd
#define __NR_pidfd_getfd 438
#endif


int64_t mg_pagemap_read(int pagemap_fd, uint64_t vaddr, uint64_t npages, uint64_t page_size,
                        uint64_t *out)
{
    int64_t r = mg_pread_full(pagemap_fd, out, npages * 8, (vaddr / page_size) * 8);
    if (r < 0)
        return r;
    return r / 8;
}

int64_t mg_pagemap_match(const uint64_t *entries, uint64_t n, uint64_t mask, uint64_t want,
                         uint8_t *bitmap, uint64_t bit_offset)
{
    int64_t count = 0;
    for (uint64_t i = 0; i < n; i++) {
        if ((entries[i] & mask) == want) {
            mg_bit_set(bitmap, bit_offset + i);
            count++;
        }
    }
    return count;
}

int64_t mg_pagemap_match_range(int pagemap_fd, uint64_t vaddr, uint64_t npages,
                               uint64_t page_size, uint64_t mask, uint64_t want,
                               uint64_t *buf, uint64_t buf_entries, uint8_t *bitmap)
{
    int64_t count = 0;
    uint64_t done = 0;
    if (buf_entries == 0)
        return -EINVAL;
    while (done < npages) {
        uint64_t n = npages - done < buf_entries ? npages - done : buf_entries;
        int64_t got = mg_pagemap_read(pagemap_fd, vaddr + done * page_size, n, page_size, buf);
        if (got < 0)
            return got;
        if ((uint64_t)got != n)
            return -ENXIO;      /* mapping shrank under us */
        count += mg_pagemap_match(buf, n, mask, want, bitmap, done);
        done += n;
    }
    return count;
}

int64_t mg_pagemap_scan(int pagemap_fd, uint64_t start, uint64_t end, uint64_t flags,
                        uint64_t category_inverted, uint64_t category_mask,
                        uint64_t category_anyof_mask, uint64_t return_mask, uint64_t max_pages,
                        struct mg_page_region *vec, uint64_t vec_len, uint64_t *walk_end)
{
    struct mg_pm_scan_arg arg = {
        .size = sizeof(arg), .flags = flags, .start = start, .end = end, .walk_end = 0,
        .vec = (uint64_t)(uintptr_t)vec, .vec_len = vec_len, .max_pages = max_pages,
        .category_inverted = category_inverted, .category_mask = category_mask,
        .category_anyof_mask = category_anyof_mask, .return_mask = return_mask,
    };
    int r;
    do {
        r = ioctl(pagemap_fd, MG_PAGEMAP_SCAN, &arg);
    } while (r < 0 && errno == EINTR);
    if (r < 0)
        return -errno;
    *walk_end = arg.walk_end;
    return r;
}

int64_t mg_pagemap_scan_bitmap(int pagemap_fd, uint64_t start, uint64_t end, uint64_t flags,
                               uint64_t category_mask, uint64_t return_mask,
                               uint64_t page_size, struct mg_page_region *vec, uint64_t vec_len,
                               uint8_t *bitmap, uint64_t *ioctl_calls)
{
    int64_t pages = 0;
    uint64_t pos = start;
    uint64_t calls = 0;
    if (vec_len == 0 || page_size == 0)
        return -EINVAL;
    while (pos < end) {
        uint64_t walk_end = 0;
        int64_t n = mg_pagemap_scan(pagemap_fd, pos, end, flags, 0, category_mask, 0,
                                    return_mask, 0, vec, vec_len, &walk_end);
        calls++;
        if (n < 0)
            return n;
        for (int64_t k = 0; k < n; k++) {
            uint64_t a = vec[k].start, b = vec[k].end;
            if (a < start || b > end || a >= b)
                return -ERANGE;   /* the kernel reported outside the range asked */
            for (uint64_t p = (a - start) / page_size; p < (b - start) / page_size; p++)
                mg_bit_set(bitmap, p);
            pages += (int64_t)((b - a) / page_size);
        }
        if (walk_end <= pos)
            return -EIO;          /* no progress: never loop forever */
        pos = walk_end;
    }
    if (ioctl_calls)
        *ioctl_calls = calls;
    return pages;
}

int mg_uffd_create(void)
{
    long fd = syscall(__NR_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (fd < 0 && errno == EPERM)   /* vm.unprivileged_userfaultfd=0: user faults suffice */
        fd = syscall(__NR_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
    return fd < 0 ? -errno : (int)fd;
}

int mg_pidfd_open(int pid)
{
    long fd = syscall(__NR_pidfd_open, pid, 0);
    return fd < 0 ? -errno : (int)fd;
}

int mg_pidfd_getfd(int pidfd, int target_fd)
{
    long fd = syscall(__NR_pidfd_getfd, pidfd, target_fd, 0);
    return fd < 0 ? -errno : (int)fd;
}

int mg_uffd_api(int uffd, uint64_t features, uint64_t *features_out, uint64_t *ioctls_out)
{
    struct uffdio_api api = { .api = UFFD_API, .features = features };
    if (ioctl(uffd, UFFDIO_API, &api) < 0)
        return -errno;
    if (features_out)
        *features_out = api.features;
    if (ioctls_out)
        *ioctls_out = api.ioctls;
    return 0;
}

int mg_uffd_register_wp(int uffd, uint64_t start, uint64_t len)
{
    struct uffdio_register reg = {
        .range = { .start = start, .len = len }, .mode = UFFDIO_REGISTER_MODE_WP,
    };
    if (ioctl(uffd, UFFDIO_REGISTER, &reg) < 0)
        return -errno;
    return 0;
}

int mg_uffd_unregister(int uffd, uint64_t start, uint64_t len)
{
    struct uffdio_range range = { .start = start, .len = len };
    if (ioctl(uffd, UFFDIO_UNREGISTER, &range) < 0)
        return -errno;
    return 0;
}

int mg_uffd_writeprotect(int uffd, uint64_t start, uint64_t len, int protect)
{
    struct uffdio_writeprotect wp = {
        .range = { .start = start, .len = len },
        .mode = protect ? UFFDIO_WRITEPROTECT_MODE_WP : 0,
    };
    int r;
    do {
        r = ioctl(uffd, UFFDIO_WRITEPROTECT, &wp);
    } while (r < 0 && errno == EAGAIN);
    return r < 0 ? -errno : 0;
}

int64_t mg_count_changed(const uint8_t *addr, const uint64_t *pages, uint64_t n,
                         uint64_t page_size, const uint64_t *hashes)
{
    int64_t changed = 0;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t h;
        mg_hash_mem_pages(addr + pages[i] * page_size, 1, page_size, &h);
        changed += h != hashes[pages[i]];
    }
    return changed;
}

int64_t mg_sweep_remote(int pid, uint64_t vaddr, uint64_t npages, uint64_t page_size,
                        uint8_t *buf, uint64_t buf_len, uint64_t *hashes, uint8_t *bitmap,
                        uint64_t bit_offset, uint64_t *unreadable)
{
    uint64_t chunk = buf_len / page_size;
    int64_t changed = 0;
    uint64_t bad = 0;
    if (chunk == 0)
        return -EINVAL;
    for (uint64_t done = 0; done < npages;) {
        uint64_t n = npages - done < chunk ? npages - done : chunk;
        struct iovec local = { .iov_base = buf, .iov_len = n * page_size };
        struct iovec remote = { .iov_base = (void *)(uintptr_t)(vaddr + done * page_size),
                                .iov_len = n * page_size };
        ssize_t r = process_vm_readv(pid, &local, 1, &remote, 1, 0);
        if (r < 0 && errno != EFAULT)
            return -errno;
        uint64_t ok_pages = r < 0 ? 0 : (uint64_t)r / page_size;
        changed += mg_compare_pages(buf, ok_pages, page_size, hashes + done, bitmap,
                                    bit_offset + done, NULL, 0);
        if (ok_pages < n) {
            /* the first unreadable page: skip it, continue after it */
            bad++;
            done += ok_pages + 1;
        } else {
            done += n;
        }
    }
    if (unreadable)
        *unreadable = bad;
    return changed;
}

int64_t mg_gens_since(const uint32_t *gens, uint64_t n, uint32_t since, uint8_t *bitmap)
{
    int64_t count = 0;
    for (uint64_t i = 0; i < n; i++) {
        if (gens[i] > since) {
            mg_bit_set(bitmap, i);
            count++;
        }
    }
    return count;
}

int64_t mg_bitmap_runs(const uint8_t *bitmap, uint64_t nbits, uint64_t *pos, uint64_t *runs,
                       uint64_t max_runs)
{
    uint64_t i = *pos;
    int64_t out = 0;
    while (i < nbits && (uint64_t)out < max_runs) {
        /* skip clear words, then clear bytes, quickly (a sparse set of a large region) */
        if ((i & 63) == 0 && i + 64 <= nbits) {
            uint64_t w;
            memcpy(&w, bitmap + (i >> 3), 8);
            if (w == 0) {
                i += 64;
                continue;
            }
        }
        if ((i & 7) == 0 && bitmap[i >> 3] == 0) {
            i += 8;
            continue;
        }
        if (!(bitmap[i >> 3] & (1u << (i & 7)))) {
            i++;
            continue;
        }
        uint64_t s = i;
        while (i < nbits) {
            if ((i & 7) == 0 && bitmap[i >> 3] == 0xff && i + 8 <= nbits) {
                i += 8;
                continue;
            }
            if (!(bitmap[i >> 3] & (1u << (i & 7))))
                break;
            i++;
        }
        runs[2 * out] = s;
        runs[2 * out + 1] = i;
        out++;
    }
    *pos = i < nbits ? i : nbits;
    return out;
}

int64_t mg_bitmap_count(const uint8_t *bitmap, uint64_t nbytes)
{
    int64_t c = 0;
    uint64_t i = 0;
    for (; i + 8 <= nbytes; i += 8) {     /* a word at a time (unaligned-safe through memcpy) */
        uint64_t w;
        memcpy(&w, bitmap + i, 8);
        if (w)                            /* (sparse sets: most words are clear) */
            c += __builtin_popcountll(w);
    }
    for (; i < nbytes; i++)
        c += __builtin_popcount(bitmap[i]);
    return c;
}

void mg_bitmap_or(uint8_t *dst, const uint8_t *src, uint64_t nbytes)
{
    for (uint64_t i = 0; i < nbytes; i++)
        dst[i] |= src[i];
}

void mg_bitmap_andnot(uint8_t *dst, const uint8_t *a, const uint8_t *b, uint64_t nbytes)
{
    for (uint64_t i = 0; i < nbytes; i++)
        dst[i] = a[i] & (uint8_t)~b[i];
}
