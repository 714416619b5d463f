"""Binding of migrator._guest_c (csrc/guest.c, csrc/build.py): the guest's write loops, page
stamps and outside views.  Owned by migrator.guest: only guest/ modules use `lib`."""

from .._binding import PAGE_SIZE, check
from .._guest_c import ffi, lib

__all__ = ["ffi", "lib", "check", "PAGE_SIZE"]
