"""The one thing pyproject.toml cannot say stably: batchroute's C extension.

The inner loop of the similarity router's inverted-file search (batchroute/routers/ivf.py) is
C (batchroute/routers/_ivfscan.c): installing batchroute compiles it, so a C compiler (gcc or
clang) and the Python headers are needed. It uses only the C library and Python's own API.
Everything else about the package is in pyproject.toml.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "batchroute.routers._ivfscan", ["batchroute/routers/_ivfscan.c"],
    # -ffp-contract=fast: the scan's multiply-adds as fused FMA instructions (ISO C mode
    # leaves them as a multiply and an add, about 30% slower here).
    extra_compile_args=["-O3", "-std=c11", "-ffp-contract=fast"])])
