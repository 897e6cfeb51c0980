"""Build hook for the optional native decode kernels (everything else is in pyproject.toml).

`afdserve._native` (afdserve/native/*.c) is compiled when a C compiler is present; `optional=True`
lets the install succeed without one, and afdserve then uses torch's kernels
(afdserve/model/kernels.py says which).

The kernels split their work over threads with OpenMP (`-fopenmp`, GNU libgomp). torch's CPU
wheels ship libgomp under the same soname (libgomp.so.1), and afdserve imports torch before the
extension, so the dynamic loader binds the extension to the libgomp torch already loaded: one
OpenMP runtime and one pool of worker threads in the process (kernels.py checks this at load).
Where the compiler has no OpenMP, the extension is built without it and runs single-threaded.
"""
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

OPENMP = ["-fopenmp"]


class BuildExt(build_ext):
    """Build with OpenMP; retry without it when the compiler or linker refuses the flag."""

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:                       # CompileError, LinkError
            if OPENMP[0] not in ext.extra_compile_args:
                raise
            print(f"{ext.name}: building without OpenMP ({exc}); its kernels will use one thread")
            ext.extra_compile_args = [a for a in ext.extra_compile_args if a not in OPENMP]
            ext.extra_link_args = [a for a in ext.extra_link_args if a not in OPENMP]
            super().build_extension(ext)


setup(ext_modules=[Extension("afdserve._native",
                             ["afdserve/native/decode_kernels.c", "afdserve/native/gemm_bf16.c",
                              "afdserve/native/elementwise.c", "afdserve/native/moe.c"],
                             depends=["afdserve/native/afd_native.h"],
                             extra_compile_args=["-O3", "-std=c99", *OPENMP], extra_link_args=[*OPENMP],
                             libraries=["m"], optional=True),
                   Extension("afdserve._fp8", ["afdserve/native/fp8_kernels.c"],  # FP8 weights (model/fp8.py)
                             extra_compile_args=["-O3", "-std=c99", *OPENMP], extra_link_args=[*OPENMP],
                             libraries=["m"], optional=True)],
      cmdclass={"build_ext": BuildExt})
