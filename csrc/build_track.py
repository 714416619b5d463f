"""cffi out-of-line API build of the tracking and memory-I/O fast path (csrc/track.c, csrc/memio.c)
into migrator._track_c."""
import os
import re

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _cdef_from_header(path: str) -> str:
    """The declarations of track.h without preprocessor lines or comments, for ffi.cdef."""
    text = open(path).read()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("#"))


if not os.path.exists("/usr/include/xxhash.h"):
    raise SystemExit(
        "migrator build: /usr/include/xxhash.h not found; install the xxHash headers first "
        "(Debian/Ubuntu: apt-get install libxxhash-dev)"
    )

ffi = FFI()
ffi.cdef(_cdef_from_header(os.path.join(HERE, "track.h")))
ffi.cdef(_cdef_from_header(os.path.join(HERE, "memio.h")))
ffi.set_source(
    "migrator._track_c",
    '#include "track.h"\n#include "memio.h"',
    sources=[os.path.relpath(os.path.join(HERE, c), ROOT) for c in ("track.c", "memio.c")],
    include_dirs=[os.path.relpath(HERE, ROOT)],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"],
)

if __name__ == "__main__":
    ffi.compile(verbose=True)
