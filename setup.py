"""Build the C extension (the TDX quote parser); everything else lives in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "agent.quote._tdxquote",
            sources=["native/tdxquote.c", "native/tdxquote_core.c"],
            depends=["native/tdxquote_core.h"],
            extra_compile_args=["-std=c11", "-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration",
                                "-Wconversion", "-fno-strict-aliasing"],
        )
    ],
)
