/* migrator memory I/O fast path: see memio.h. */
#define _GNU_SOURCE
#include <errno.h>
#include <string.h>
#include <unistd.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "common.h"
#include "memio.h"


int64_t mg_read_runs(int fd, uint64_t base, const uint64_t *runs, uint64_t nruns,
                     uint64_t page_size, uint8_t *buf, int zero_eof)
{
    uint64_t out = 0;
    for (uint64_t k = 0; k < nruns; k++) {
        uint64_t len = runs[2 * k + 1] * page_size;
        int64_t r = mg_pread_full(fd, buf + out, len, base + runs[2 * k] * page_size);
        if (r < 0)
            return r;
        if ((uint64_t)r < len) {
            if (!zero_eof)
                return -ENXIO;
            memset(buf + out + r, 0, len - (uint64_t)r);
        }
        out += len;
    }
    return (int64_t)out;
}

int mg_digest_fd(int fd, uint64_t offset, uint64_t nbytes, uint8_t *buf, uint64_t buf_len,
                 uint64_t *out)
{
    XXH3_state_t state;
    if (buf_len == 0)
        return -EINVAL;
    XXH3_INITSTATE(&state);
    if (XXH3_128bits_reset(&state) != XXH_OK)
        return -EINVAL;
    uint64_t done = 0;
    int eof = 0;
    while (done < nbytes) {
        uint64_t n = nbytes - done < buf_len ? nbytes - done : buf_len;
        int64_t r = eof ? 0 : mg_pread_full(fd, buf, n, offset + done);
        if (r < 0)
            return (int)r;
        if ((uint64_t)r < n) {
            eof = 1;
            memset(buf + r, 0, n - (uint64_t)r);
        }
        if (XXH3_128bits_update(&state, buf, n) != XXH_OK)
            return -EINVAL;
        done += n;
    }
    XXH128_hash_t h = XXH3_128bits_digest(&state);
    out[0] = h.high64;
    out[1] = h.low64;
    return 0;
}
