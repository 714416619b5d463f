#define _GNU_SOURCE
#include "procscan.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#define NEEDLE_MAX 64
#define MAPS_CHUNK (64 * 1024)

static int is_pid(const char *s)
{
    if (!*s)
        return 0;
    for (; *s; s++)
        if (*s < '0' || *s > '9')
            return 0;
    return 1;
}

/* What one process's maps file says: bit 0 of the result when a line names one of the needles,
 * bit 2 when a line maps an aio ring ("/[aio]"), bit 3 when the file was unreadable or empty
 * (exited, a kernel thread, no rights: its fd table is not looked at either).  The lines naming
 * a needle are appended to text (from *text_len, up to text_cap; bit 4 when they did not fit).
 * Whole lines are looked at: the part of a line left at the end of a read is kept in front of
 * the next one. */
static int maps_scan(int proc_fd, const char *pid, char needles[][NEEDLE_MAX], const size_t *lens,
                     uint64_t n, char *buf, char *text, uint64_t text_cap, uint64_t *text_len)
{
    char path[64];
    snprintf(path, sizeof path, "%s/maps", pid);
    int fd = openat(proc_fd, path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 8;
    int out = 0;
    size_t keep = 0, total = 0;
    for (;;) {
        ssize_t r = read(fd, buf + keep, MAPS_CHUNK - keep);
        if (r <= 0) {
            if (keep == 0 || r < 0)
                break;
            buf[keep++] = '\n';         /* a last line without its newline */
            r = 0;
        }
        total += (size_t)r;
        size_t len = keep + (size_t)r, pos = 0;
        for (;;) {
            char *nl = memchr(buf + pos, '\n', len - pos);
            if (!nl)
                break;
            size_t line_len = (size_t)(nl - (buf + pos));
            const char *line = buf + pos;
            for (uint64_t i = 0; i < n; i++) {
                if (memmem(line, line_len, needles[i], lens[i])) {
                    out |= 1;
                    if (*text_len + line_len + 1 <= text_cap) {
                        memcpy(text + *text_len, line, line_len + 1);
                        *text_len += line_len + 1;
                    } else {
                        out |= 16;
                    }
                    break;
                }
            }
            if (memmem(line, line_len, "/[aio]", 6))
                out |= 4;
            pos += line_len + 1;
        }
        if (r == 0)
            break;
        keep = len - pos;
        if (keep == MAPS_CHUNK) {       /* a line longer than the buffer: drop its head */
            keep = 0;
            continue;
        }
        memmove(buf, buf + pos, keep);
    }
    close(fd);
    if (total == 0)
        out |= 8;
    return out;
}

static int fds_match(int proc_fd, const char *pid, const uint64_t *keys, uint64_t n)
{
    char path[64];
    snprintf(path, sizeof path, "%s/fd", pid);
    int dfd = openat(proc_fd, path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0)
        return 0;
    DIR *d = fdopendir(dfd);
    if (!d) {
        close(dfd);
        return 0;
    }
    int found = 0;
    struct dirent *e;
    while (!found && (e = readdir(d)) != NULL) {
        struct stat st;
        if (e->d_name[0] == '.')
            continue;
        if (fstatat(dfd, e->d_name, &st, 0) != 0) {
            if (errno == EACCES || errno == EPERM)
                break;          /* no rights over this process: none of its entries can be read */
            continue;           /* (closed meanwhile) */
        }
        for (uint64_t i = 0; i < n; i++)
            if (major(st.st_dev) == keys[3 * i] && minor(st.st_dev) == keys[3 * i + 1] &&
                st.st_ino == keys[3 * i + 2]) {
                found = 1;
                break;
            }
    }
    closedir(d);
    return found;
}

int64_t mg_proc_holders(const uint64_t *keys, uint64_t n_keys, int32_t *pids, uint8_t *flags,
                        uint64_t max_pids, uint64_t *n_pids, char *text, uint64_t text_cap,
                        uint32_t *text_off, uint32_t *text_len)
{
    if (n_keys == 0 || n_keys > 64 || text_cap > UINT32_MAX)
        return -EINVAL;
    char needles[64][NEEDLE_MAX];
    size_t lens[64];
    for (uint64_t i = 0; i < n_keys; i++) {
        int w = snprintf(needles[i], NEEDLE_MAX, " %02llx:%02llx %llu ",
                         (unsigned long long)keys[3 * i], (unsigned long long)keys[3 * i + 1],
                         (unsigned long long)keys[3 * i + 2]);
        if (w < 0 || w >= NEEDLE_MAX)
            return -EINVAL;
        lens[i] = (size_t)w;
    }
    char *buf = malloc(MAPS_CHUNK + 1);
    if (!buf)
        return -ENOMEM;
    int proc_fd = open("/proc", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (proc_fd < 0) {
        int err = errno;
        free(buf);
        return -err;
    }
    DIR *d = fdopendir(proc_fd);
    if (!d) {
        int err = errno;
        close(proc_fd);
        free(buf);
        return -err;
    }
    int64_t holders = 0;
    uint64_t seen = 0, used = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (!is_pid(e->d_name))
            continue;
        uint64_t at = used;
        int m = maps_scan(proc_fd, e->d_name, needles, lens, n_keys, buf, text,
                          seen < max_pids ? text_cap : 0, &used);
        uint8_t f = (uint8_t)(m & (1 | 4 | 16));
        if (!(m & 8) && fds_match(proc_fd, e->d_name, keys, n_keys))
            f |= 2;
        if (seen < max_pids) {
            pids[seen] = (int32_t)atoi(e->d_name);
            flags[seen] = f;
            text_off[seen] = (uint32_t)at;
            text_len[seen] = (uint32_t)(used - at);
        }
        seen++;
        holders += (f & 3) != 0;
    }
    closedir(d);
    free(buf);
    *n_pids = seen;
    return holders;
}

int mg_inotify_open(void)
{
    int fd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
    return fd < 0 ? -errno : fd;
}

int mg_inotify_watch(int fd, const char *path)
{
    int wd = inotify_add_watch(fd, path, IN_MODIFY);
    return wd < 0 ? -errno : wd;
}
