"""cffi out-of-line API builds of migrator's C fast paths (named in setup.py's cffi_modules).

One compiled module per owner; each is wrapped by one binding module (ffi, lib, check), which
only its owner's package imports:

    kernel_ffi -> migrator._kernel_c   pagemap, PAGEMAP_SCAN, userfaultfd and pidfd calls, uffd
                                       injection, the /proc scan for holders of shared memory,
                                       memory reads, the ledger's content sweeps, bitmaps
                                       (track.c, memio.c, inject.c, procscan.c, pages.c)
                  owner: migrator/kernel/native.py, for kernel/ and tracking/
    stream_ffi -> migrator._stream_c   the page stream: socket I/O, packing and applying batches,
                                       page hashes, digest leaves, delta
                                       batches (stream.c, pages.c, delta.c)
                  owner: migrator/transport/_native.py, for transport/
    guest_ffi  -> migrator._guest_c    the guest's write loops and page stamps (guest.c)
                  owner: migrator/guest/_native.py, for guest/

Shared C lives in one place: common.h (static inline helpers: full preads and pwrites, bitmap
bits, the zero-page test) and pages.c (page hashes, sweeps, MADV_POPULATE), which both
_kernel_c and _stream_c build.  No name is exported by two modules: _stream_c exports pages.h as
written (mg_*), _kernel_c as mgk_* (renamed here, mapped back with a #define), and the build
stops if two cdefs still share a name.  Everything is compiled with -fvisibility=hidden, so the
shared objects export nothing but their PyInit_ function.
"""
import os
import re

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CFLAGS = ["-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration", "-fvisibility=hidden"]

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


def _renamed(header: str, prefix: str) -> tuple[str, str]:
    """A header's cdef with every function mg_NAME renamed prefixNAME, and the #define lines that
    map the new names back to the C functions."""
    text = _cdef(header)
    names = re.findall(r"\bmg_(\w+)\s*\(", text)
    text = re.sub(r"\bmg_(\w+)(\s*\()", rf"{prefix}\1\2", text)
    return text, "".join(f"#define {prefix}{n} mg_{n}\n" for n in names)


def _ffi(module: str, headers: list[str], sources: list[str], renamed: dict[str, str] = {}) -> FFI:
    """The module built from sources, exporting headers' declarations (and those of each header
    in renamed under its prefix)."""
    ffi = FFI()
    preamble = "".join(f'#include "{h}"\n' for h in [*headers, *renamed])
    for h in headers:
        ffi.cdef(_cdef(h))
    for h, prefix in renamed.items():
        text, defines = _renamed(h, prefix)
        ffi.cdef(text)
        preamble += defines
    ffi.set_source(
        module,
        preamble,
        sources=[os.path.relpath(os.path.join(HERE, c), ROOT) for c in sources],
        include_dirs=[os.path.relpath(HERE, ROOT)],
        extra_compile_args=CFLAGS,
    )
    _exported[module] = set(re.findall(r"\b(mgk?_\w+)\s*\(", "".join(
        [_cdef(h) for h in headers] + [_renamed(h, p)[0] for h, p in renamed.items()])))
    return ffi


_exported: dict[str, set[str]] = {}
kernel_ffi = _ffi("migrator._kernel_c", ["track.h", "memio.h", "inject.h", "procscan.h"],
                  ["track.c", "memio.c", "inject.c", "procscan.c", "pages.c", "hash_avx2.c"],
                  renamed={"pages.h": "mgk_"})
stream_ffi = _ffi("migrator._stream_c", ["delta.h", "stream.h", "pages.h"],
                  ["stream.c", "pages.c", "hash_avx2.c", "delta.c"])
guest_ffi = _ffi("migrator._guest_c", ["guest.h"], ["guest.c"])

_mods = sorted(_exported)
for i, a in enumerate(_mods):
    for b in _mods[i + 1:]:
        if _exported[a] & _exported[b]:
            raise SystemExit(f"migrator build: {a} and {b} both export {sorted(_exported[a] & _exported[b])}")

if __name__ == "__main__":
    kernel_ffi.compile(verbose=True)
    stream_ffi.compile(verbose=True)
    guest_ffi.compile(verbose=True)
