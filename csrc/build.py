"""cffi out-of-line API builds of migrator's C fast paths (named in setup.py's cffi_modules):

    track_ffi -> migrator._track_c   tracking, memory I/O, page stream, uffd injection, the
                                     /proc scan for holders of shared memory
                                     (track.c, memio.c, stream.c, inject.c, procscan.c)
    guest_ffi -> migrator._guest_c   the guest's write loops and page stamps (guest.c)
"""
import os
import re

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CFLAGS = ["-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"]

if not os.path.exists("/usr/include/xxhash.h"):
    raise SystemExit(
        "migrator build: /usr/include/xxhash.h not found; install the xxHash headers first "
        "(Debian/Ubuntu: apt-get install libxxhash-dev)"
    )


def _cdef(header: str) -> str:
    """A header's declarations for ffi.cdef: comments and preprocessor lines dropped, except
    `#define NAME value` constants, kept for cffi to fill in (`#define NAME ...`)."""
    text = re.sub(r"/\*.*?\*/", "", open(os.path.join(HERE, header)).read(), flags=re.S)
    out = []
    for line in text.splitlines():
        m = re.match(r"\s*#define\s+(MG_\w+)\s+\S", line)
        if m:
            out.append(f"#define {m.group(1)} ...")
        elif not line.lstrip().startswith("#"):
            out.append(line)
    return "\n".join(out)


def _ffi(module: str, headers: list[str], sources: list[str]) -> FFI:
    ffi = FFI()
    for h in headers:
        ffi.cdef(_cdef(h))
    ffi.set_source(
        module,
        "\n".join(f'#include "{h}"' for h in headers),
        sources=[os.path.relpath(os.path.join(HERE, c), ROOT) for c in sources],
        include_dirs=[os.path.relpath(HERE, ROOT)],
        extra_compile_args=CFLAGS,
    )
    return ffi


track_ffi = _ffi("migrator._track_c", ["track.h", "memio.h", "stream.h", "inject.h", "procscan.h"],
                 ["track.c", "memio.c", "stream.c", "hash_avx2.c", "inject.c", "procscan.c"])
guest_ffi = _ffi("migrator._guest_c", ["guest.h"], ["guest.c"])

if __name__ == "__main__":
    track_ffi.compile(verbose=True)
    guest_ffi.compile(verbose=True)
