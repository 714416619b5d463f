"""Build glue: setuptools takes cffi_modules only through setup(); everything else is in pyproject.toml."""
from setuptools import setup

setup(
    cffi_modules=[
        "csrc/build.py:track_ffi",
        "csrc/build.py:guest_ffi",
    ],
)
