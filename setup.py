"""Build glue: setuptools takes cffi_modules only through setup(); everything else is in pyproject.toml."""
from setuptools import setup

setup(
    cffi_modules=[
        "csrc/build.py:kernel_ffi",
        "csrc/build.py:stream_ffi",
        "csrc/build.py:guest_ffi",
    ],
)
