"""Build the Cython extensions; everything else lives in pyproject.toml."""
from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension("mcast_trio._decode", ["mcast_trio/_decode.pyx"],
              extra_compile_args=["-O3"]),
    Extension("mcast_trio._io._mmsg", ["mcast_trio/_io/_mmsg.pyx"],
              extra_compile_args=["-O2"]),
    Extension("mcast_trio._protocol._kernels", ["mcast_trio/_protocol/_kernels.pyx"],
              extra_compile_args=["-O2"]),
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    ),
)
