/* Small I/O helpers shared by the C files (static inline: no global state, no extra symbols). */
#ifndef MIGRATOR_IO_H
#define MIGRATOR_IO_H
#include <errno.h>
#include <stdint.h>
#include <unistd.h>

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
