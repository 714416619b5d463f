/* The helpers every C file may share, in one place: static inline (no global state, no symbol
 * of their own in any module).  Byte counts and offsets in bytes; pages of page_size bytes. */
#ifndef MIGRATOR_COMMON_H
#define MIGRATOR_COMMON_H
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

/* Set bit i of an LSB-first bitmap (page i is bit i % 8 of byte i / 8). */
static inline void mg_bit_set(uint8_t *bm, uint64_t i) { bm[i >> 3] |= (uint8_t)(1u << (i & 7)); }

/* 1 if the page_size bytes at p (page_size % 8 == 0; p may be unaligned) are all zero; stops at
 * the first non-zero word, where a data page usually ends the test. */
static inline int mg_page_is_zero(const uint8_t *p, uint64_t page_size)
{
    uint64_t acc = 0;
    for (uint64_t i = 0; i < page_size; i += 8) {
        uint64_t w;
        memcpy(&w, p + i, 8);
        acc |= w;
        if (acc)
            return 0;
    }
    return 1;
}

/* pread until count bytes or EOF; returns bytes read or -errno. */
static inline int64_t mg_pread_full(int fd, void *buf, uint64_t count, uint64_t offset)
{
    uint64_t done = 0;
    while (done < count) {
        ssize_t r = pread(fd, (uint8_t *)buf + done, count - done, (off_t)(offset + done));
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (r == 0)
            break;
        done += (uint64_t)r;
    }
    return (int64_t)done;
}

/* pwrite all count bytes; returns 0 or -errno. */
static inline int mg_pwrite_full(int fd, const void *buf, uint64_t count, uint64_t offset)
{
    uint64_t done = 0;
    while (done < count) {
        ssize_t r = pwrite(fd, (const uint8_t *)buf + done, count - done, (off_t)(offset + done));
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (r == 0)
            return -EIO;
        done += (uint64_t)r;
    }
    return 0;
}

#endif
