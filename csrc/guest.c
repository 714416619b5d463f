/* migrator guest fast path: see guest.h for the contract of each function. */
#define _GNU_SOURCE
#include <errno.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/uio.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "common.h"
#include "guest.h"

#ifndef __NR_process_madvise
#define __NR_process_madvise 440
#endif
#ifndef MADV_PAGEOUT
#define MADV_PAGEOUT 21
#endif

#define HDR_BYTES 32u
#define GOLDEN 0x9E3779B97F4A7C15ull

static inline uint64_t mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static inline uint64_t rng_next(uint64_t *s)          /* splitmix64 */
{
    *s += GOLDEN;
    return mix64(*s);
}

static inline uint64_t rng_below(uint64_t *s, uint64_t n)   /* uniform in [0, n) */
{
    return (uint64_t)(((unsigned __int128)rng_next(s) * n) >> 64);
}

static inline double rng_unit(uint64_t *s)
{
    return (double)(rng_next(s) >> 11) * 0x1.0p-53;
}

double mg_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void sleep_until(double t)
{
    double d = t - mg_now();
    if (d <= 0)
        return;
    struct timespec ts = { .tv_sec = (time_t)d, .tv_nsec = (long)((d - (double)(time_t)d) * 1e9) };
    nanosleep(&ts, NULL);      /* EINTR: the caller's loop re-checks time and stop */
}

static inline uint64_t stamp_checksum(const uint8_t *page, uint64_t page_size)
{
    return XXH3_64bits_withSeed(page + HDR_BYTES, page_size - HDR_BYTES, XXH3_64bits(page, 24));
}

/* the words of a text body: 8 bytes each, one picked per word by the pattern's top 4 bits */
static const char TEXT_WORDS[16][9] = {
    "memory  ", "guest   ", "kernel  ", "page    ", "dirty   ", "round   ", "shared  ", "write   ",
    "the     ", "of      ", "migrate ", "ledger  ", "\n       ", "record: ", "value=1 ", "id=42   ",
};

void mg_stamp(uint8_t *page, uint64_t page_size, uint16_t region, uint16_t writer,
              uint64_t index, uint64_t seq)
{
    struct mg_stamp_hdr h = { .magic = MG_STAMP_MAGIC, .region = region, .writer = writer,
                              .index = index, .seq = seq, .checksum = 0 };
    /* body: an arithmetic sequence from a mix of the header, one add a word (vectorises) */
    uint64_t x = mix64(seq ^ (index << 20) ^ ((uint64_t)writer << 48) ^ ((uint64_t)region << 60));
    uint64_t *w = (uint64_t *)(page + HDR_BYTES);
    uint64_t nw = (page_size - HDR_BYTES) / 8;
    if (writer & MG_WRITER_TEXT) {
        for (uint64_t k = 0; k < nw; k++)
            memcpy(&w[k], TEXT_WORDS[mix64(x + k) >> 60], 8);
    } else {
        for (uint64_t k = 0; k < nw; k++)
            w[k] = x + k * GOLDEN;
    }
    memcpy(page, &h, 24);
    h.checksum = stamp_checksum(page, page_size);
    memcpy(page + 24, &h.checksum, 8);
}

/* 1 if the page carries a consistent stamp (whatever its index), 0 if not */
static int stamp_valid(const uint8_t *p, uint64_t page_size, struct mg_stamp_hdr *h)
{
    memcpy(h, p, sizeof(*h));
    return h->magic == MG_STAMP_MAGIC && h->checksum == stamp_checksum(p, page_size);
}

int64_t mg_check_pages(const uint8_t *image, uint64_t npages, uint64_t page_size,
                       uint16_t region, uint64_t first_index, const uint8_t *expected,
                       uint8_t *status, uint16_t *writers, uint64_t *seqs)
{
    int64_t bad = 0;
    if (page_size < 64 || page_size % 8)
        return -EINVAL;
    for (uint64_t i = 0; i < npages; i++) {
        const uint8_t *p = image + i * page_size;
        struct mg_stamp_hdr h = { 0 };
        uint8_t st;
        int zero = mg_page_is_zero(p, page_size);
        int valid = !zero && stamp_valid(p, page_size, &h);
        if (zero)
            st = MG_ST_ZERO;
        else if (!valid)
            st = MG_ST_CORRUPT;
        else if (h.index != first_index + i || h.region != region)
            st = MG_ST_MISPLACED;
        else
            st = MG_ST_OK;
        if (expected && st <= MG_ST_ZERO) {
            const uint8_t *e = expected + i * page_size;
            if (memcmp(p, e, page_size) != 0) {
                if (zero)
                    st = MG_ST_MISSING;
                else if (mg_page_is_zero(e, page_size))
                    st = MG_ST_DIFFERS;
                else
                    st = MG_ST_STALE;
            }
        }
        status[i] = st;
        if (writers)
            writers[i] = valid ? h.writer : 0;
        if (seqs)
            seqs[i] = valid ? h.seq : 0;
        bad += st >= MG_ST_CORRUPT;
    }
    return bad;
}

int64_t mg_workload_init(struct mg_workload *w, uint64_t seed)
{
    uint64_t total = 0;
    if (w->page_size < 64 || w->slice <= 0 || (w->ntargets && !w->targets))
        return -EINVAL;
    for (uint32_t t = 0; t < w->ntargets; t++) {
        if (!w->targets[t].base && w->targets[t].fd < 0)
            return -EINVAL;
        total += w->targets[t].npages;
    }
    if (w->kind == 2 && (w->hot_pages == 0 || w->hot_start + w->hot_pages > total))
        return -EINVAL;
    w->total = total;
    w->rng = mix64(seed ^ ((uint64_t)w->writer << 32) ^ 0x6d69677261746f72ull);
    w->cursor = 0;
    w->tokens = 0;
    w->last_t = 0;
    w->resumed_seen = w->ctl ? w->ctl->resumed : 0;
    return (int64_t)total;
}

static inline uint64_t pick_page(struct mg_workload *w)
{
    switch (w->kind) {
    case 1:
        return rng_below(&w->rng, w->total);
    case 2:
        if (w->hot_pages == w->total || rng_unit(&w->rng) < w->hot_share)
            return w->hot_start + rng_below(&w->rng, w->hot_pages);
        else {
            uint64_t j = rng_below(&w->rng, w->total - w->hot_pages);
            return j < w->hot_start ? j : j + w->hot_pages;
        }
    default: {
        uint64_t p = w->cursor++;
        if (w->cursor >= w->total)
            w->cursor = 0;
        return p;
    }
    }
}

/* counter: a page that holds a valid stamp keeps its body; only its 32-byte header changes
 * (seq, writer, checksum), as a counter or a record's header would.  Returns 0 if it could. */
static int restamp(uint8_t *page, uint64_t page_size, uint16_t region, uint16_t writer,
                   uint64_t index, uint64_t seq)
{
    struct mg_stamp_hdr h;
    if (!stamp_valid(page, page_size, &h) || h.region != region || h.index != index)
        return -1;
    h.seq = seq;
    h.writer = writer;
    memcpy(page, &h, 24);
    h.checksum = stamp_checksum(page, page_size);
    memcpy(page + 24, &h.checksum, 8);
    return 0;
}

/* Write one stamped page; returns 0 or -errno. */
static int write_one(struct mg_workload *w, uint64_t seq)
{
    uint64_t p = pick_page(w);
    struct mg_target *t = w->targets;
    while (p >= t->npages) {
        p -= t->npages;
        t++;
    }
    if (t->base && w->kind == 4
            && restamp(t->base + p * w->page_size, w->page_size, (uint16_t)t->region, w->writer,
                       t->first_index + p, seq) == 0)
        return 0;
    if (t->base) {
        mg_stamp(t->base + p * w->page_size, w->page_size, (uint16_t)t->region, w->writer,
                 t->first_index + p, seq);
        return 0;
    }
    mg_stamp(w->scratch, w->page_size, (uint16_t)t->region, w->writer, t->first_index + p, seq);
    for (;;) {
        ssize_t r = pwrite((int)t->fd, w->scratch, w->page_size,
                           (off_t)(t->fd_offset + p * w->page_size));
        if (r == (ssize_t)w->page_size)
            return 0;
        if (r < 0 && errno == EINTR)
            continue;
        return r < 0 ? -errno : -EIO;
    }
}

int64_t mg_run(struct mg_workload *w, double seconds)
{
    struct mg_ctl *c = w->ctl;
    double t = mg_now(), end = t + seconds;
    int64_t written = 0;
    if (w->total == 0 || w->kind == 0) {        /* idle: nothing to write */
        while (!__atomic_load_n(&c->stop, __ATOMIC_RELAXED) && mg_now() < end)
            sleep_until(mg_now() + w->slice < end ? mg_now() + w->slice : end);
        return 0;
    }
    if (w->last_t == 0)
        w->last_t = t;
    while (!__atomic_load_n(&c->stop, __ATOMIC_RELAXED)) {
        double rate = c->rate;
        uint64_t n, ep = __atomic_load_n(&c->resumed, __ATOMIC_RELAXED);
        t = mg_now();
        if (t >= end)
            break;
        if (ep != w->resumed_seen) {                /* resumed after a pause: no catch-up */
            w->resumed_seen = ep;
            w->last_t = t;
            w->tokens = 0;
        }
        if (rate < 0) {
            n = 64;                                 /* unlimited: small batches */
            w->last_t = t;
        } else {
            double dt = t - w->last_t;
            w->last_t = t;
            /* A gap of more than two slices means we were stopped (SIGSTOP, a throttle, the
             * host): like a vCPU, we do not make up for time we did not run. */
            if (dt > 2 * w->slice)
                dt = w->slice;
            w->tokens += rate * dt;
            double cap = rate * 2 * w->slice > 1 ? rate * 2 * w->slice : 1;   /* at most 2 slices of debt */
            if (w->tokens > cap)
                w->tokens = cap;
            n = (uint64_t)w->tokens;
            w->tokens -= (double)n;
        }
        for (uint64_t i = 0; i < n; i++) {
            int r = write_one(w, c->seq + 1);
            if (r < 0)
                return r;
            __atomic_store_n(&c->seq, c->seq + 1, __ATOMIC_RELAXED);
        }
        __atomic_store_n(&c->pages, c->pages + n, __ATOMIC_RELAXED);
        __atomic_store_n(&c->rounds, c->rounds + 1, __ATOMIC_RELAXED);
        written += (int64_t)n;
        if (rate >= 0) {
            double next = t + w->slice;
            sleep_until(next < end ? next : end);
        }
    }
    return written;
}

int64_t mg_stamp_target(const struct mg_target *t, uint64_t page_size, uint16_t writer)
{
    if (!t->base || page_size < 64)
        return -EINVAL;
    for (uint64_t i = 0; i < t->npages; i++)
        mg_stamp(t->base + i * page_size, page_size, (uint16_t)t->region, writer,
                 t->first_index + i, 0);
    return (int64_t)t->npages;
}

int64_t mg_hash_fd_pages(int fd, uint64_t offset, uint64_t npages, uint64_t page_size,
                         uint8_t *buf, uint64_t buf_len, uint64_t *hashes)
{
    uint64_t chunk = buf_len / page_size;
    if (chunk == 0)
        return -EINVAL;
    for (uint64_t done = 0; done < npages;) {
        uint64_t n = npages - done < chunk ? npages - done : chunk;
        uint64_t want = n * page_size;
        int64_t got = mg_pread_full(fd, buf, want, offset + done * page_size);
        if (got < 0)
            return got;
        if ((uint64_t)got < want)
            memset(buf + got, 0, want - (uint64_t)got);
        for (uint64_t i = 0; i < n; i++)
            hashes[done + i] = XXH3_64bits(buf + i * page_size, page_size);
        done += n;
    }
    return (int64_t)npages;
}

int64_t mg_count_different(const uint64_t *a, const uint64_t *b, uint64_t n, uint8_t *changed)
{
    int64_t c = 0;
    for (uint64_t i = 0; i < n; i++) {
        int d = a[i] != b[i];
        if (changed)
            changed[i] = (uint8_t)d;
        c += d;
    }
    return c;
}

int64_t mg_count_present(int pagemap_fd, uint64_t addr, uint64_t npages, uint64_t page_size)
{
    uint64_t buf[512];
    int64_t present = 0;
    for (uint64_t done = 0; done < npages;) {
        uint64_t n = npages - done < 512 ? npages - done : 512;
        int64_t r = mg_pread_full(pagemap_fd, buf, n * 8, (addr / page_size + done) * 8);
        if (r < 0)
            return r;
        if ((uint64_t)r != n * 8)
            return -ENXIO;
        for (uint64_t i = 0; i < n; i++)
            present += (int64_t)(buf[i] >> 63);
        done += n;
    }
    return present;
}

int64_t mg_pageout(int pidfd, const uint64_t *addrs, const uint64_t *lens, uint64_t n)
{
    int64_t total = 0;
    struct iovec iov[64];
    for (uint64_t done = 0; done < n;) {
        uint64_t k = n - done < 64 ? n - done : 64;
        for (uint64_t i = 0; i < k; i++) {
            iov[i].iov_base = (void *)(uintptr_t)addrs[done + i];
            iov[i].iov_len = lens[done + i];
        }
        long r = syscall(__NR_process_madvise, pidfd, iov, k, MADV_PAGEOUT, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return -errno;
        total += r;
        done += k;
    }
    return total;
}

int mg_set_pdeathsig(int sig)
{
    return prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) < 0 ? -errno : 0;
}
