"""Build the C extensions (the TDX quote and SEV-SNP report parsers); everything else lives in pyproject.toml."""

from setuptools import Extension, setup

#: The same strict flags for both parsers.
_CFLAGS = ["-std=c11", "-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration", "-Wconversion",
           "-fno-strict-aliasing"]

setup(
    ext_modules=[
        Extension(
            "agent.quote._tdxquote",
            sources=["native/tdxquote.c", "native/tdxquote_core.c"],
            depends=["native/tdxquote_core.h"],
            extra_compile_args=_CFLAGS,
        ),
        Extension(
            "agent.quote._snpreport",
            sources=["native/snpreport.c", "native/snpreport_core.c"],
            depends=["native/snpreport_core.h"],
            extra_compile_args=_CFLAGS,
        ),
    ],
)
