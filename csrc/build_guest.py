"""cffi out-of-line API build of the guest fast path (csrc/guest.c) into migrator._guest_c."""
import os
import re

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _cdef_from_header(path: str) -> str:
    """guest.h without comments and preprocessor lines, with MG_STAMP_MAGIC kept as a constant."""
    text = re.sub(r"/\*.*?\*/", "", open(path).read(), flags=re.S)
    lines = []
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("#define MG_STAMP_MAGIC"):
            lines.append("#define MG_STAMP_MAGIC ...")
        elif not s.startswith("#"):
            lines.append(line)
    return "\n".join(lines)


if not os.path.exists("/usr/include/xxhash.h"):
    raise SystemExit(
        "migrator build: /usr/include/xxhash.h not found; install the xxHash headers first "
        "(Debian/Ubuntu: apt-get install libxxhash-dev)"
    )

ffi = FFI()
ffi.cdef(_cdef_from_header(os.path.join(HERE, "guest.h")))
ffi.set_source(
    "migrator._guest_c",
    '#include "guest.h"',
    sources=[os.path.relpath(os.path.join(HERE, "guest.c"), ROOT)],
    include_dirs=[os.path.relpath(HERE, ROOT)],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"],
)

if __name__ == "__main__":
    ffi.compile(verbose=True)
