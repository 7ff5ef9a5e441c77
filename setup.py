"""The optional compiled fast path (nexus_authz/native/): built by `pip install` when Cython and a C compiler
are there, skipped with a warning when not (the pure-Python path then runs; see nexus_authz/native/).
Everything else about the package is in pyproject.toml."""

from __future__ import annotations

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

SOURCES = {
    "nexus_authz.native._http1": "nexus_authz/native/_http1.pyx",
    "nexus_authz.native._body": "nexus_authz/native/_body.pyx",
    "nexus_authz.native._windows": "nexus_authz/native/_windows.pyx",
    "nexus_authz.native._usage": "nexus_authz/native/_usage.pyx",
    "nexus_authz.native._headers": "nexus_authz/native/_headers.pyx",
    "nexus_authz.native._reservation": "nexus_authz/native/_reservation.pyx",
    "nexus_authz.native._fast": "nexus_authz/native/_fast.pyx",
    "nexus_authz.native._account": "nexus_authz/native/_account.pyx",
}


class OptionalBuildExt(build_ext):
    """build_ext that never fails the install: a missing compiler or a compile error is a warning."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any build failure leaves the pure-Python path
            self._skip(exc)

    def build_extension(self, ext):  # type: ignore[no-untyped-def]
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            self._skip(exc, ext.name)

    @staticmethod
    def _skip(exc: BaseException, name: str = "the native extensions") -> None:
        print(
            f"WARNING: nexus-authz: {name} not built ({exc.__class__.__name__}: {exc}); "
            "the pure-Python path will run",
            file=sys.stderr,
        )


def extensions() -> list:
    if os.environ.get("NEXUS_AUTHZ_NO_BUILD") == "1":
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        print("WARNING: nexus-authz: Cython not installed; the pure-Python path will run", file=sys.stderr)
        return []
    from setuptools import Extension

    # -ffp-contract=off: no fused multiply-add, so C doubles round as Python's floats do (_windows.pyx)
    flags = ["-O2", "-ffp-contract=off"]
    exts = [Extension(name, [src], extra_compile_args=flags) for name, src in SOURCES.items()]
    try:
        return cythonize(exts, compiler_directives={"language_level": "3"}, quiet=True)
    except Exception as exc:  # noqa: BLE001 - a Cython error must not fail the install either
        print(
            f"WARNING: nexus-authz: cythonize failed ({exc}); the pure-Python path will run", file=sys.stderr
        )
        return []


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
