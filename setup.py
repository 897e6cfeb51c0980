"""Build hook for the optional native decode kernels (everything else is in pyproject.toml).

`afdserve._native` (afdserve/native/decode_kernels.c) is compiled when a C compiler is present;
`optional=True` lets the install succeed without one, and afdserve then uses its BLAS paths
(afdserve/model/kernels.py says which).
"""
from setuptools import Extension, setup

setup(ext_modules=[Extension("afdserve._native", ["afdserve/native/decode_kernels.c"],
                             extra_compile_args=["-O3", "-std=c99"], libraries=["m"],
                             optional=True),
                   Extension("afdserve._fp8", ["afdserve/native/fp8_kernels.c"],  # FP8 weights (model/fp8.py)
                             extra_compile_args=["-O3", "-std=c99"], libraries=["m"], optional=True)])
