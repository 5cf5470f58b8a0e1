"""Build of the compiled data path (Cython) and the layout accessors (cffi).

Options (environment): FULCRUM_ANNOTATE=1 writes cython -a HTML beside each
.pyx; FULCRUM_DEBUG=1 builds with -O0 -g and line tracing.
"""
import os

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

INCLUDES = ["lbcore/includes", numpy.get_include()]
DEBUG = os.environ.get("FULCRUM_DEBUG") == "1"
COMPILE_ARGS = ["-O0", "-g"] if DEBUG else ["-O2"]
MACROS = [("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")]

MODULES = [
    "lbcore.worker",
    "lbcore.balance.wrr",
    "lbcore.balance.least_conn",
    "lbcore.balance.p2c",
    "lbcore.balance.maglev",
    "lbcore.balance.probe",
]


def extension(name: str) -> Extension:
    return Extension(
        name,
        [name.replace(".", "/") + ".pyx"],
        include_dirs=INCLUDES,
        extra_compile_args=COMPILE_ARGS,
        define_macros=MACROS + ([("CYTHON_TRACE_NOGIL", "1")] if DEBUG else []),
    )


setup(
    ext_modules=cythonize(
        [extension(m) for m in MODULES],
        include_path=["."],
        annotate=os.environ.get("FULCRUM_ANNOTATE") == "1",
        compiler_directives={"language_level": "3", "linetrace": DEBUG},
    ),
    cffi_modules=["lbcore/_layout_build.py:ffi"],
)
