/* migrator delta batches: see delta.h. */
#include <errno.h>
#include <string.h>

#include "common.h"
#include "pages.h"
#include "delta.h"

#define BLOCK 256            /* bytes compared at once while pages are equal */

static void lock_slot(uint8_t *b)
{
    while (__atomic_exchange_n(b, 1, __ATOMIC_ACQUIRE)) {
        while (__atomic_load_n(b, __ATOMIC_RELAXED)) {
#if defined(__x86_64__) || defined(__i386__)
            __builtin_ia32_pause();
#endif
        }
    }
}

static void unlock_slot(uint8_t *b)
{
    __atomic_store_n(b, 0, __ATOMIC_RELEASE);
}

static uint64_t word(const uint8_t *p, uint64_t w)
{
    uint64_t v;
    memcpy(&v, p + 8 * w, 8);
    return v;
}

/* Append varint v at out[*pos] if it fits cap; *pos always advances. */
static void put_varint(uint8_t *out, uint64_t cap, uint64_t *pos, uint64_t v)
{
    do {
        uint8_t b = v & 0x7f;
        v >>= 7;
        if (v)
            b |= 0x80;
        if (*pos < cap)
            out[*pos] = b;
        (*pos)++;
    } while (v);
}

/* The delta of page cur against old, appended at out[*pos] (while it fits cap); old becomes cur. */
static void encode_page(const uint8_t *cur, uint8_t *old, uint64_t ps, uint8_t *out, uint64_t cap,
                        uint64_t *pos)
{
    const uint64_t nw = ps / 8;
    uint64_t w = 0, at = 0;          /* words looked at; bytes of the page described */
    while (w < nw) {
        if (w % (BLOCK / 8) == 0 && w + BLOCK / 8 <= nw && memcmp(cur + 8 * w, old + 8 * w, BLOCK) == 0) {
            w += BLOCK / 8;
            continue;
        }
        if (word(cur, w) == word(old, w)) {
            w++;
            continue;
        }
        /* a changed stretch, to where two words in a row are equal (one equal word inside costs
         * less sent than a new record) */
        uint64_t e = w + 1;
        while (e < nw) {
            if (word(cur, e) != word(old, e))
                e++;
            else if (e + 1 < nw && word(cur, e + 1) != word(old, e + 1))
                e += 2;
            else
                break;
        }
        uint64_t len = 8 * (e - w);
        put_varint(out, cap, pos, 8 * w - at);
        put_varint(out, cap, pos, len);
        if (*pos + len <= cap)
            memcpy(out + *pos, cur + 8 * w, len);
        *pos += len;
        memcpy(old + 8 * w, cur + 8 * w, len);
        at = 8 * e;
        w = e;
    }
    if (at < ps) {              /* the unchanged rest: an empty record ends the page */
        put_varint(out, cap, pos, ps - at);
        put_varint(out, cap, pos, 0);
    }
}

void mg_delta_take(struct mg_delta_job *j, const uint8_t *cur, uint64_t page)
{
    struct mg_delta_cache *c = j->cache;
    const uint64_t ps = c->page_size;
    uint64_t key = j->key_base + page, s = key % c->nslots;
    uint8_t *copy = c->pages + s * ps;
    lock_slot(&c->busy[s]);
    int mine = c->keys[s] == key + 1;
    if (mine && c->rounds[s] <= j->base_round && c->rounds[s] < j->round_no) {
        uint64_t before = j->len;
        encode_page(cur, copy, ps, j->out, j->cap, &j->len);     /* (the copy becomes cur) */
        c->rounds[s] = j->round_no;
        j->st.hits++;
        j->st.bytes += j->len - before;
    } else {
        j->st.misses++;
        /* whole: one literal record */
        put_varint(j->out, j->cap, &j->len, 0);
        put_varint(j->out, j->cap, &j->len, ps);
        if (j->len + ps <= j->cap)
            memcpy(j->out + j->len, cur, ps);
        j->len += ps;
        /* cached, unless the slot holds another page sent in this round or the last one: two
         * pages the guest keeps rewriting would otherwise evict each other every round */
        if (j->keep && (mine || c->keys[s] == 0 || c->rounds[s] + 1 < j->round_no)) {
            memcpy(copy, cur, ps);
            c->keys[s] = key + 1;
            c->rounds[s] = j->round_no;
        } else if (mine) {
            c->keys[s] = 0;               /* (a copy older than what is sent now) */
        }
    }
    unlock_slot(&c->busy[s]);
}

int mg_delta_drop(struct mg_delta_cache *c, uint64_t key)
{
    uint64_t s = key % c->nslots;
    int dropped = 0;
    lock_slot(&c->busy[s]);
    if (c->keys[s] == key + 1) {
        c->keys[s] = 0;
        dropped = 1;
    }
    unlock_slot(&c->busy[s]);
    return dropped;
}

int64_t mg_delta_encode(const uint8_t *src, int contiguous, const uint64_t *runs, uint64_t nruns,
                        uint64_t key_base, uint32_t round_no, uint32_t base_round, int cache,
                        struct mg_delta_cache *c, uint8_t *out, uint64_t out_cap,
                        struct mg_delta_stats *st)
{
    const uint64_t ps = c->page_size;
    uint64_t i = 0;
    if (ps == 0 || ps % 8 || c->nslots == 0)
        return -EINVAL;
    struct mg_delta_job j = { .cache = c, .key_base = key_base, .round_no = round_no,
                              .base_round = base_round, .keep = cache, .out = out, .cap = out_cap };
    for (uint64_t r = 0; r < nruns; r++) {
        uint64_t first = runs[2 * r], count = runs[2 * r + 1];
        for (uint64_t page = first; page < first + count; page++, i++)
            mg_delta_take(&j, contiguous ? src + i * ps : src + page * ps, page);
    }
    st->hits += j.st.hits;
    st->misses += j.st.misses;
    st->bytes += j.st.bytes;
    return (int64_t)j.len;
}

int64_t mg_delta_forget(const uint64_t *runs, uint64_t nruns, uint64_t key_base,
                        struct mg_delta_cache *c)
{
    int64_t dropped = 0;
    if (c->nslots == 0)
        return -EINVAL;
    for (uint64_t r = 0; r < nruns; r++) {
        uint64_t first = runs[2 * r], count = runs[2 * r + 1];
        for (uint64_t page = first; page < first + count; page++)
            dropped += mg_delta_drop(c, key_base + page);
    }
    return dropped;
}

/* A varint at delta[*pos] (< len) into *v: 0, or -1 if truncated or longer than 5 bytes. */
static int get_varint(const uint8_t *delta, uint64_t len, uint64_t *pos, uint64_t *v)
{
    uint64_t x = 0;
    for (int shift = 0; shift < 35; shift += 7) {
        if (*pos >= len)
            return -1;
        uint8_t b = delta[(*pos)++];
        x |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) {
            *v = x;
            return 0;
        }
    }
    return -1;
}

/* Walk one page's records from delta[*pos]: check them (apply: also patch page).  0, or -1. */
static int walk_page(const uint8_t *delta, uint64_t len, uint64_t *pos, uint64_t ps, uint8_t *page)
{
    uint64_t at = 0;
    while (at < ps) {
        uint64_t skip, n;
        if (get_varint(delta, len, pos, &skip) < 0 || get_varint(delta, len, pos, &n) < 0)
            return -1;
        if (skip > ps - at || n > ps - at - skip || n > len - *pos)
            return -1;
        if (n == 0 && at + skip != ps)      /* only the last record is empty */
            return -1;
        at += skip;
        if (page != NULL)
            memcpy(page + at, delta + *pos, n);
        *pos += n;
        at += n;
    }
    return 0;
}

/* 1 if the page's records at delta[pos] are one literal of the whole page. */
static int whole_literal(const uint8_t *delta, uint64_t len, uint64_t pos, uint64_t ps)
{
    uint64_t skip, n;
    return get_varint(delta, len, &pos, &skip) == 0 && get_varint(delta, len, &pos, &n) == 0
        && skip == 0 && n == ps;
}

int mg_apply_delta(int fd, uint8_t *map, uint64_t npages, uint32_t *stamps, uint64_t *img_hashes,
                   const uint8_t *delta, uint64_t len, const uint64_t *runs, uint64_t nruns,
                   uint32_t round_no, uint64_t page_size, uint64_t *hashes, uint64_t *bad)
{
    const uint32_t new_data = 2 * (round_no + 1) + 1;
    uint64_t pos = 0, i = 0;
    if (page_size == 0 || round_no > (UINT32_MAX - 3) / 2)
        return -EINVAL;
    /* everything checked first: a malformed batch changes no page */
    for (uint64_t r = 0; r < nruns; r++) {
        uint64_t first = runs[2 * r], count = runs[2 * r + 1];
        if (count == 0 || first >= npages || count > npages - first) {
            *bad = i;
            return -EINVAL;
        }
        for (uint64_t p = first; p < first + count; p++, i++) {
            /* a page that holds data from an earlier round is patched; one that holds none
             * (never written, or zeros) can only come whole; none from this round or later */
            int older_data = (stamps[p] & 1) && stamps[p] < new_data - 1;
            if (stamps[p] >= new_data - 1 || (!older_data && !whole_literal(delta, len, pos, page_size))) {
                *bad = p;
                return -ESTALE;
            }
            if (walk_page(delta, len, &pos, page_size, NULL) < 0) {
                *bad = i;
                return -EINVAL;
            }
        }
    }
    if (pos != len) {
        *bad = i;
        return -EINVAL;
    }
    pos = 0;
    i = 0;
    for (uint64_t r = 0; r < nruns; r++) {
        uint64_t first = runs[2 * r], count = runs[2 * r + 1];
        for (uint64_t p = first; p < first + count; p++, i++) {
            if (stamps[p] & 1) {        /* patched where it lies (allocated: no SIGBUS) */
                uint8_t *page = map + p * page_size;
                walk_page(delta, len, &pos, page_size, page);
                mg_hash_mem_pages(page, 1, page_size, &hashes[i]);
            } else {                    /* written, as a file system may need space for it */
                uint64_t at = pos, skip, n;
                get_varint(delta, len, &at, &skip);
                get_varint(delta, len, &at, &n);
                int e = mg_pwrite_full(fd, delta + at, page_size, p * page_size);
                if (e < 0)
                    return e;
                mg_hash_mem_pages(delta + at, 1, page_size, &hashes[i]);
                pos = at + page_size;
            }
            img_hashes[p] = hashes[i];
            stamps[p] = new_data;
        }
    }
    return 0;
}
