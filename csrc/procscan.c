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

/* Whether the maps file of proc_fd's process names one of the needles.  A needle may straddle
 * two reads: the tail of each read is kept in front of the next. */
static int maps_match(int proc_fd, const char *pid, char needles[][NEEDLE_MAX], const size_t *lens,
                      uint64_t n, char *buf)
{
    char path[64];
    snprintf(path, sizeof path, "%s/maps", pid);
    int fd = openat(proc_fd, path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;               /* exited, or a kernel thread we cannot read */
    size_t keep = 0, maxlen = 0;
    for (uint64_t i = 0; i < n; i++)
        maxlen = lens[i] > maxlen ? lens[i] : maxlen;
    int found = 0;
    for (;;) {
        ssize_t r = read(fd, buf + keep, MAPS_CHUNK - keep);
        if (r <= 0)
            break;
        size_t len = keep + (size_t)r;
        for (uint64_t i = 0; i < n && !found; i++)
            found = memmem(buf, len, needles[i], lens[i]) != NULL;
        if (found)
            break;
        keep = len < maxlen ? len : maxlen;
        memmove(buf, buf + len - keep, keep);
    }
    close(fd);
    return found;
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
        if (e->d_name[0] == '.' || fstatat(dfd, e->d_name, &st, 0) != 0)
            continue;
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
                        uint64_t max_pids, uint64_t *n_pids)
{
    if (n_keys == 0 || n_keys > 64)
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
    char *buf = malloc(MAPS_CHUNK);
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
    uint64_t seen = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (!is_pid(e->d_name))
            continue;
        uint8_t f = 0;
        if (maps_match(proc_fd, e->d_name, needles, lens, n_keys, buf))
            f |= 1;
        if (fds_match(proc_fd, e->d_name, keys, n_keys))
            f |= 2;
        if (seen < max_pids) {
            pids[seen] = (int32_t)atoi(e->d_name);
            flags[seen] = f;
        }
        seen++;
        holders += f != 0;
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
