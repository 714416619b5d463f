/*
 * migrator guest fast path (module migrator._guest_c): the write loops of the simulated guest
 * and its side writers, the page stamp (write and check), and a few helpers for looking at a
 * guest from outside.
 *
 * Conventions: functions return >= 0 on success and -errno on failure.  No global state.
 * Units: sizes in pages of page_size bytes unless a name says bytes; times in seconds (double);
 * rates in pages per second.
 */
#ifndef MIGRATOR_GUEST_H
#define MIGRATOR_GUEST_H
#include <stdint.h>

/* --- page stamp ----------------------------------------------------------------------------
 * Every page a writer writes starts with this header; the rest of the page is a pattern derived
 * from the header fields; checksum = XXH3_64(body, seed = XXH3_64(first 24 header bytes)). */
struct mg_stamp_hdr {
    uint32_t magic;              /* MG_STAMP_MAGIC */
    uint16_t region;             /* 1 shared RAM, 2 private anonymous */
    uint16_t writer;             /* 0 populate, 1 vcpu, 2 vhost, 3 pwrite; | MG_WRITER_TEXT */
    uint64_t index;              /* page index inside its region */
    uint64_t seq;                /* per-writer sequence number of this write (1, 2, ...) */
    uint64_t checksum;
};

enum {                           /* per-page status from mg_check_pages */
    MG_ST_OK = 0,                /* stamp consistent (and equal to expected, if given) */
    MG_ST_ZERO = 1,              /* never written: all zero (and expected zero, if given) */
    MG_ST_CORRUPT = 2,           /* not zero, and the stamp's magic or checksum is wrong */
    MG_ST_MISPLACED = 3,         /* consistent stamp of another page index or region */
    MG_ST_STALE = 4,             /* consistent, but not the expected page (an older write) */
    MG_ST_MISSING = 5,           /* zero where the expected page holds data */
    MG_ST_DIFFERS = 6            /* differs from expected otherwise (e.g. expected is zero) */
};
#define MG_STAMP_MAGIC 0x4750474du   /* "MGPG" little-endian */
/* writer flag: the body is words of text (compressible, like a heap of strings or a database's
 * buffers) instead of the incompressible default pattern */
#define MG_WRITER_TEXT 0x100

/* Stamp one page of page_size bytes at page. */
void mg_stamp(uint8_t *page, uint64_t page_size, uint16_t region, uint16_t writer,
              uint64_t index, uint64_t seq);

/* Check npages pages of an image (region pages first_index...) into status (one byte a page,
 * MG_ST_*); when expected is not NULL it holds the source's final pages to compare with.
 * writers/seqs (may be NULL) receive the image's stamp fields (0 where none).
 * Returns the number of pages whose status is a problem (>= MG_ST_CORRUPT). */
int64_t mg_check_pages(const uint8_t *image, uint64_t npages, uint64_t page_size,
                       uint16_t region, uint64_t first_index, const uint8_t *expected,
                       uint8_t *status, uint16_t *writers, uint64_t *seqs);

/* --- shared control block (one slot a writer, in a small shared memfd) ----------------------- */
struct mg_ctl {
    uint64_t pages;              /* pages written (pager: pages advised), monotonic */
    uint64_t rounds;             /* pager: rounds done; writers: slices run */
    double rate;                 /* pages/s asked; < 0 = as fast as possible, 0 = idle */
    uint32_t stop;               /* set non-zero to make the writer return and exit */
    uint32_t kind;               /* which writer (see migrator/guest/control.py) */
    int64_t pid;
    uint64_t seq;                /* last sequence number used */
    uint64_t extra;              /* pager: pages of its ranges not present (pagemap) after its last round */
    uint64_t resumed;            /* bumped by a controller before SIGCONT: restart pacing */
};

/* --- write loops ---------------------------------------------------------------------------- */
struct mg_target {               /* one contiguous run of writable pages */
    uint8_t *base;               /* mapped address of the run, or NULL to pwrite into fd */
    int64_t fd;                  /* with base NULL: pwrite at fd_offset + i * page_size */
    uint64_t fd_offset;          /* bytes */
    uint64_t npages;
    uint64_t first_index;        /* region page index of the run's first page */
    uint64_t region;             /* stamp region id */
};

struct mg_workload {
    /* settings */
    uint32_t kind;               /* 0 idle, 1 random, 2 hotcold, 3 sweep, 4 counter (in order,
                                    a stamped page's header only) */
    uint16_t writer;
    uint64_t page_size;
    uint64_t hot_start, hot_pages;   /* hotcold: hot set [hot_start, hot_start + hot_pages) */
    double hot_share;            /* hotcold: fraction of writes into the hot set */
    double slice;                /* seconds per rate-control slice */
    struct mg_target *targets;
    uint32_t ntargets;
    struct mg_ctl *ctl;
    uint8_t *scratch;            /* one page, for pwrite targets */
    /* state */
    uint64_t rng;
    uint64_t cursor;             /* sweep position */
    uint64_t total;              /* pages in all targets (set by mg_workload_init) */
    double tokens, last_t;
    uint64_t resumed_seen;
};

/* Compute totals and seed the generator.  Returns total pages or -EINVAL. */
int64_t mg_workload_init(struct mg_workload *w, uint64_t seed);
/* Write at ctl->rate for up to seconds (or until ctl->stop).  Returns pages written or -errno. */
int64_t mg_run(struct mg_workload *w, double seconds);
/* Stamp every page of a mapped target (populate at start, writer 0, seq 0). */
int64_t mg_stamp_target(const struct mg_target *t, uint64_t page_size, uint16_t writer);

/* --- outside views ------------------------------------------------------------------------- */
/* XXH3-64 of npages pages read with pread from fd at byte offset (a memfd, or /proc/PID/mem with
 * offset = address), through buf (buf_len bytes).  Short reads hash as zero pages. */
int64_t mg_hash_fd_pages(int fd, uint64_t offset, uint64_t npages, uint64_t page_size,
                         uint8_t *buf, uint64_t buf_len, uint64_t *hashes);
/* Count i < n with a[i] != b[i]; set changed[i] (may be NULL) to 1 or 0. */
int64_t mg_count_different(const uint64_t *a, const uint64_t *b, uint64_t n, uint8_t *changed);
/* Pages of [addr, addr + npages pages) present (pagemap bit 63) in the process of pagemap_fd. */
int64_t mg_count_present(int pagemap_fd, uint64_t addr, uint64_t npages, uint64_t page_size);

/* --- process helpers ----------------------------------------------------------------------- */
/* process_madvise(MADV_PAGEOUT) of n ranges (addrs[i], lens[i] bytes).  Returns bytes advised. */
int64_t mg_pageout(int pidfd, const uint64_t *addrs, const uint64_t *lens, uint64_t n);
int mg_set_pdeathsig(int sig);
double mg_now(void);

#endif
