/* migrator page-stream fast path: see stream.h. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <string.h>
#include <sys/vfs.h>
#include <time.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "common.h"
#include "pagehash.h"
#include "pages.h"
#include "stream.h"

static int64_t now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

int mg_sock_io(int fd, uint8_t *buf, uint64_t len, int sending, int timeout_ms, uint64_t *done)
{
    int64_t until = now_ms() + timeout_ms;
    while (*done < len) {
        ssize_t r = sending ? send(fd, buf + *done, len - *done, MSG_NOSIGNAL)
                            : recv(fd, buf + *done, len - *done, 0);
        if (r > 0) {
            *done += (uint64_t)r;
            if (*done < len && now_ms() >= until)
                return MG_IO_AGAIN;          /* the caller checks whether to go on */
            continue;
        }
        if (r == 0)
            return sending ? -EPIPE : MG_IO_EOF;
        if (errno == EINTR)
            continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK)
            return -errno;
        int64_t left = until - now_ms();
        if (left <= 0)
            return MG_IO_AGAIN;
        struct pollfd p = { .fd = fd, .events = sending ? POLLOUT : POLLIN };
        int k = poll(&p, 1, (int)left);
        if (k < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (k == 0)
            return MG_IO_AGAIN;
    }
    return MG_IO_DONE;
}

static int page_is_zero(const uint8_t *p, uint64_t page_size, int avx2)
{
    if (avx2 && page_size % 128 == 0)
        return mg_page_is_zero_avx2(p, page_size);
    return mg_page_is_zero(p, page_size);
}

/* Append page to a flat list of (first, count) runs; 0 if it needs a new run and none is left. */
static int add_to_runs(uint64_t *runs, uint64_t *n, uint64_t cap, uint64_t page)
{
    if (*n && runs[2 * *n - 2] + runs[2 * *n - 1] == page) {
        runs[2 * *n - 1]++;
        return 1;
    }
    if (*n == cap)
        return 0;
    runs[2 * *n] = page;
    runs[2 * *n + 1] = 1;
    (*n)++;
    return 1;
}

static int forced(const struct mg_pack *st, uint64_t page)
{
    return st->force != NULL && (st->force[page >> 3] >> (page & 7)) & 1;
}

int64_t mg_pack_pages(const uint8_t *src, uint64_t first, uint64_t npages, uint64_t page_size,
                      struct mg_pack *st)
{
    int avx2 = __builtin_cpu_supports("avx2");
    uint64_t i;
    if (page_size == 0 || page_size % 8)
        return -EINVAL;
    for (i = 0; i < npages; i++) {
        const uint8_t *p = src + i * page_size;
        uint64_t page = first + i, h = 0;
        if (st->known || st->stable) {
            mg_hash_mem_pages(p, 1, page_size, &h);
            if (st->known && h == st->known[page] && !forced(st, page)) {
                st->skipped++;
                continue;
            }
        }
        if (((!st->known && !st->stable) || h == st->zero_hash) && page_is_zero(p, page_size, avx2)) {
            if (st->zero_pages == st->zero_cap
                    || !add_to_runs(st->zero_runs, &st->n_zero_runs, st->run_cap, page))
                break;
            st->zero_pages++;
            if (st->delta)
                mg_delta_drop(st->delta->cache, st->delta->key_base + page);
            if (st->known)
                st->known[page] = st->zero_hash;
        } else {
            if (st->out_pages == st->out_cap
                    || !add_to_runs(st->data_runs, &st->n_data_runs, st->run_cap, page))
                break;
            /* hash the copy, not the source: the hash is of exactly what will be sent (the
             * copy is in cache: the second hash of a changed page costs little); a stable
             * source's hash is the copy's, and it may be sent from where it lies */
            if (st->stable) {
                st->hashes[st->out_pages] = h;
                if (!st->nocopy && st->out + st->out_pages * page_size != p)
                    memmove(st->out + st->out_pages * page_size, p, page_size);
                if (st->delta)
                    mg_delta_take(st->delta, p, page);
            } else {
                uint8_t *dst = st->out + st->out_pages * page_size;
                if (dst != p)
                    memmove(dst, p, page_size);
                mg_hash_mem_pages(dst, 1, page_size, st->hashes + st->out_pages);
                if (st->delta)          /* (the copy: what is hashed and sent) */
                    mg_delta_take(st->delta, dst, page);
            }
            if (st->known)
                st->known[page] = st->hashes[st->out_pages];
            st->out_pages++;
        }
    }
    return (int64_t)i;
}

/* pwrite of n bytes at off, in calls of at most chunk bytes (0: one call). */
static int put(int fd, const uint8_t *src, uint64_t n, uint64_t off, uint64_t chunk)
{
    if (chunk == 0)
        return mg_pwrite_full(fd, src, n, off);
    for (uint64_t done = 0; done < n; done += chunk) {
        uint64_t len = n - done < chunk ? n - done : chunk;
        int r = mg_pwrite_full(fd, src + done, len, off + done);
        if (r < 0)
            return r;
    }
    return 0;
}

int mg_apply_batch(int fd, uint64_t write_chunk, uint32_t *stamps, uint64_t *img_hashes, uint64_t npages,
                   const uint8_t *data, const uint64_t *page_hashes,
                   const uint64_t *data_runs, uint64_t n_data_runs,
                   const uint64_t *zero_runs, uint64_t n_zero_runs,
                   uint32_t round_no, uint64_t zero_hash, uint64_t page_size,
                   const uint8_t *zero_buf, uint64_t zero_len, struct mg_apply_stats *st)
{
    const uint32_t limit = 2 * (round_no + 1) + 1;   /* stamps up to here: this round or older */
    const uint32_t new_data = limit, new_zero = limit - 1;
    uint64_t zero_chunk = zero_len / page_size;
    uint64_t off = 0;     /* pages of data consumed */
    int r;

    if (page_size == 0 || zero_chunk == 0 || round_no > (UINT32_MAX - 3) / 2 || write_chunk % page_size)
        return -EINVAL;
    for (uint64_t k = 0; k < n_data_runs; k++) {
        uint64_t first = data_runs[2 * k], count = data_runs[2 * k + 1];
        if (count == 0 || first >= npages || count > npages - first)
            return -EINVAL;
        uint32_t newest = 0;
        for (uint64_t p = first; p < first + count; p++)
            newest = stamps[p] > newest ? stamps[p] : newest;
        if (newest <= limit) {
            r = put(fd, data + off * page_size, count * page_size, first * page_size, write_chunk);
            if (r < 0)
                return r;
            for (uint64_t i = 0; i < count; i++) {
                stamps[first + i] = new_data;
                img_hashes[first + i] = page_hashes[off + i];
            }
            st->written += count;
        } else {      /* some pages hold a newer copy already: page by page */
            for (uint64_t i = 0; i < count; i++) {
                uint64_t p = first + i;
                if (stamps[p] > limit) {
                    st->stale++;
                    continue;
                }
                r = mg_pwrite_full(fd, data + (off + i) * page_size, page_size, p * page_size);
                if (r < 0)
                    return r;
                stamps[p] = new_data;
                img_hashes[p] = page_hashes[off + i];
                st->written++;
            }
        }
        off += count;
    }
    for (uint64_t k = 0; k < n_zero_runs; k++) {
        uint64_t first = zero_runs[2 * k], count = zero_runs[2 * k + 1];
        if (count == 0 || first >= npages || count > npages - first)
            return -EINVAL;
        uint64_t p = first, end = first + count;
        while (p < end) {
            if (stamps[p] > limit) {
                st->stale++;
                p++;
                continue;
            }
            if (!(stamps[p] & 1)) {     /* never held data, or zero already: nothing to write */
                stamps[p] = new_zero;
                st->zeroed++;
                p++;
                continue;
            }
            uint64_t q = p;             /* a stretch of pages holding older data: zero them */
            while (q < end && q - p < zero_chunk && stamps[q] <= limit && (stamps[q] & 1))
                q++;
            r = put(fd, zero_buf, (q - p) * page_size, p * page_size, write_chunk);
            if (r < 0)
                return r;
            for (; p < q; p++) {
                stamps[p] = new_zero;
                img_hashes[p] = zero_hash;
                st->zeroed++;
            }
        }
    }
    return 0;
}

int64_t mg_pack_zeros(uint64_t first, uint64_t npages, struct mg_pack *st)
{
    if (st->known) {        /* page by page: only those the destination holds with data */
        uint64_t i;
        for (i = 0; i < npages; i++) {
            uint64_t page = first + i;
            if (st->known[page] == st->zero_hash && !forced(st, page)) {
                st->skipped++;
                continue;
            }
            if (st->zero_pages == st->zero_cap
                    || !add_to_runs(st->zero_runs, &st->n_zero_runs, st->run_cap, page))
                break;
            st->zero_pages++;
            st->known[page] = st->zero_hash;
            if (st->delta)
                mg_delta_drop(st->delta->cache, st->delta->key_base + page);
        }
        return (int64_t)i;
    }
    uint64_t room = st->zero_cap - st->zero_pages;
    uint64_t n = npages < room ? npages : room;
    if (n == 0)
        return 0;
    uint64_t k = st->n_zero_runs;
    if (k && st->zero_runs[2 * k - 2] + st->zero_runs[2 * k - 1] == first) {
        st->zero_runs[2 * k - 1] += n;
    } else {
        if (k == st->run_cap)
            return 0;
        st->zero_runs[2 * k] = first;
        st->zero_runs[2 * k + 1] = n;
        st->n_zero_runs++;
    }
    st->zero_pages += n;
    if (st->delta)
        for (uint64_t i = 0; i < n; i++)
            mg_delta_drop(st->delta->cache, st->delta->key_base + first + i);
    return (int64_t)n;
}

#define WINDOW_MIN 16        /* pages mincore() looks at first after a hole ... */
#define WINDOW_MAX 4096      /* ... doubling while every page is in the page cache */

int64_t mg_pack_object(const uint8_t *src, int fd, uint64_t offset, uint64_t first,
                       uint64_t npages, uint64_t page_size, struct mg_pack *st,
                       struct mg_extent *hint)
{
    uint8_t vec[WINDOW_MAX];
    uint64_t i = 0, end = first + npages;
    if (page_size == 0 || page_size != (uint64_t)sysconf(_SC_PAGESIZE) || (uintptr_t)src % page_size)
        return -EINVAL;
    if (hint->window < WINDOW_MIN || hint->window > WINDOW_MAX)
        hint->window = WINDOW_MIN;
    while (i < npages) {
        uint64_t page = first + i, j;
        int64_t took;
        if (page >= hint->hole_at && page < hint->data_at) {    /* a known hole */
            j = hint->data_at < end ? hint->data_at : end;
            took = mg_pack_zeros(page, j - page, st);
        } else {
            /* pages in the page cache are data (cheap to tell for pages we have mapped);
             * for the others, SEEK_DATA tells a hole (skipped whole) from a page swapped out */
            uint64_t n = npages - i < hint->window ? npages - i : hint->window, k = 0;
            if (mincore((void *)(src + i * page_size), n * page_size, vec) < 0)
                return -errno;
            while (k < n && (vec[k] & 1))
                k++;
            if (k > 0) {
                hint->window = k == n && 2 * hint->window <= WINDOW_MAX ? 2 * hint->window : hint->window;
                j = page + k;
                took = mg_pack_pages(src + i * page_size, page, k, page_size, st);
            } else {
                hint->window = WINDOW_MIN;
                off_t d = lseek(fd, (off_t)(offset + page * page_size), SEEK_DATA);
                if (d < 0 && errno != ENXIO)
                    return -errno;
                uint64_t data_at = d < 0 ? UINT64_MAX : ((uint64_t)d - offset) / page_size;
                if (data_at <= page) {               /* swapped out: data (reading swaps it in) */
                    j = page + 1;
                    took = mg_pack_pages(src + i * page_size, page, 1, page_size, st);
                } else {                             /* a hole: zeros, never read */
                    hint->hole_at = page;
                    hint->data_at = data_at;
                    j = data_at < end ? data_at : end;
                    took = mg_pack_zeros(page, j - page, st);
                }
            }
        }
        if (took < 0)
            return took;
        i += (uint64_t)took;
        if ((uint64_t)took < j - page)
            return (int64_t)i;                      /* batch full */
    }
    return (int64_t)i;
}

int64_t mg_count_zero_pages(const uint8_t *buf, uint64_t npages, uint64_t page_size)
{
    int avx2 = __builtin_cpu_supports("avx2");
    int64_t zeros = 0;
    for (uint64_t i = 0; i < npages; i++)
        zeros += page_is_zero(buf + i * page_size, page_size, avx2);
    return zeros;
}

int mg_fs_type(int fd, uint64_t *type)
{
    struct statfs sf;
    if (fstatfs(fd, &sf) != 0)
        return -errno;
    *type = (uint64_t)sf.f_type;
    return 0;
}

int mg_writeback(int fd, int wait)
{
    unsigned int flags = SYNC_FILE_RANGE_WRITE;
    if (wait)
        flags |= SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WAIT_AFTER;
    if (sync_file_range(fd, 0, 0, flags) != 0)
        return -errno;
    return 0;
}

int mg_mark_chunks(const uint64_t *runs, uint64_t nruns, uint64_t npages, unsigned shift,
                   uint8_t *stale)
{
    if (shift > 32)
        return -EINVAL;
    for (uint64_t r = 0; r < nruns; r++) {
        uint64_t first = runs[2 * r], count = runs[2 * r + 1];
        if (count == 0)
            continue;
        if (first >= npages || count > npages - first)
            return -EINVAL;
        for (uint64_t c = first >> shift; c <= (first + count - 1) >> shift; c++)
            stale[c] = 1;
    }
    return 0;
}

int64_t mg_hash_leaves(const uint8_t *hashes, uint64_t npages, unsigned shift, uint8_t *stale,
                       uint8_t *leaves)
{
    if (shift > 32)
        return -EINVAL;
    uint64_t nleaves = (npages + (1ull << shift) - 1) >> shift;
    int64_t done = 0;
    for (uint64_t c = 0; c < nleaves; c++) {
        /* (marked clean before it is hashed: a change racing this leaves it marked) */
        if (stale && !__atomic_exchange_n(&stale[c], 0, __ATOMIC_ACQ_REL))
            continue;
        uint64_t first = c << shift;
        uint64_t n = npages - first < (1ull << shift) ? npages - first : (1ull << shift);
        XXH64_canonicalFromHash((XXH64_canonical_t *)(void *)(leaves + 8 * c),
                                XXH3_64bits(hashes + 8 * first, 8 * n));
        done++;
    }
    return done;
}
