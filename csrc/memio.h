/*
 * migrator memory I/O fast path (module migrator._kernel_c): reading runs of pages of a memory
 * object (memfd via map_files, /proc/PID/mem, an image file) into one buffer, and XXH3-128
 * digests of byte ranges.
 * Functions return >= 0 on success and -errno on failure; no global state.
 */
#ifndef MIGRATOR_MEMIO_H
#define MIGRATOR_MEMIO_H
#include <stdint.h>

/* Read runs of pages: run k is pages [runs[2k], runs[2k] + runs[2k+1]) at byte base + page *
 * page_size of fd, stored one after the other in buf.  Bytes past the end of the file read as
 * zeros when zero_eof is set, else the call fails with -ENXIO.  Returns bytes stored. */
int64_t mg_read_runs(int fd, uint64_t base, const uint64_t *runs, uint64_t nruns,
                     uint64_t page_size, uint8_t *buf, int zero_eof);

/* XXH3-128 of nbytes of fd from byte offset, read through buf (buf_len bytes); bytes past the end
 * of the file count as zeros.  out[0] = high 64 bits, out[1] = low 64 bits. */
int mg_digest_fd(int fd, uint64_t offset, uint64_t nbytes, uint8_t *buf, uint64_t buf_len,
                 uint64_t *out);

#endif
