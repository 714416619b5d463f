/*
 * One pass over /proc for the processes that hold shared memory objects: those whose maps name
 * one of the objects (" MAJ:MIN INODE " in a line) or whose fd table holds a descriptor of one
 * (a stat of each /proc/PID/fd entry).  It only finds them; what each holder did is read by the
 * Python side (kernel/holders.py), which owns the policy.  Conventions as track.h: counts or
 * -errno, no global state.
 */
#ifndef MIGRATOR_PROCSCAN_H
#define MIGRATOR_PROCSCAN_H
#include <stdint.h>

/* keys: n_keys triples (major, minor, inode) of the objects.
 * pids: every process seen (all numeric /proc entries), up to max_pids; *n_pids set to how many
 * there were (may exceed max_pids: call again with room).
 * flags: per pid seen, bit 0 = maps one of the objects, bit 1 = holds a descriptor of one,
 * bit 2 = maps an aio ring, bit 4 = its lines naming an object did not fit in text.  A process
 * whose maps file is empty or unreadable (a kernel thread, exited, no rights) has its fd table
 * passed over; so has the rest of a fd table once one entry is refused (no rights).
 * text: the maps lines naming an object, each with its newline, of pid i at text_off[i],
 * text_len[i] bytes (text_cap bytes in all, at most 4 GiB).
 * Returns the number of holders, or -errno when /proc cannot be read. */
int64_t mg_proc_holders(const uint64_t *keys, uint64_t n_keys, int32_t *pids, uint8_t *flags,
                        uint64_t max_pids, uint64_t *n_pids, char *text, uint64_t text_cap,
                        uint32_t *text_off, uint32_t *text_len);

/* inotify on shared memory objects: a descriptor (IN_NONBLOCK | IN_CLOEXEC), and a watch of
 * IN_MODIFY on the inode behind path (e.g. /proc/self/fd/N of a memfd).  Writes through a file
 * opened by path (a tmpfs file, or a memfd reopened through /proc/PID/fd or map_files) raise it;
 * writes through a memfd's own descriptor do not.  Return the descriptor / watch, or -errno. */
int mg_inotify_open(void);
int mg_inotify_watch(int fd, const char *path);

#endif
