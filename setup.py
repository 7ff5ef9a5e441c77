"""The optional compiled fast path (nexus_authz/native/): built by `pip install` when Cython and a C compiler
are there, skipped with a warning when not (the pure-Python path then runs; see nexus_authz/native/).
With GCC it is a profile-guided build unless NEXUS_AUTHZ_PGO=0: built instrumented, trained
(nexus_authz/tools/pgo_train.py, in a subprocess), rebuilt with the profile; when the training cannot run,
a plain build with one WARNING line (docs/design.md, "Why": a profile-guided native build).
Everything else about the package is in pyproject.toml."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile

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
    "nexus_authz.native._build": "nexus_authz/native/_build.pyx",  # how they were built (native.BUILD)
}
PGO_ENV = "NEXUS_AUTHZ_PGO"  # "0": no profile-guided build
TRAIN_TIMEOUT_ENV = "NEXUS_AUTHZ_PGO_TIMEOUT"  # seconds the training may take (default 300)
# the instrumented build (NEXUS_AUTHZ_PGO=2 in native/_build.pyx): counts every branch, writes .gcda at exit
GENERATE = ["-fprofile-generate", "-fprofile-update=single"]
# the profile-guided build (NEXUS_AUTHZ_PGO=1): code the training never ran stays optimised as usual
# (-fprofile-partial-training), without a warning per function (-Wno-missing-profile); a profile that
# does not match its source never fails the build (-Wno-coverage-mismatch: an error by default; it cannot
# happen while both builds compile the same .c, stale profiles deleted first); no loop unrolling, peeling
# or tail duplication, which the profile makes GCC do on hot loops and which grows the code a check runs
# (docs/design.md: the cold-line figures)
USE = [
    "-fprofile-use",
    "-fprofile-partial-training",
    "-Wno-missing-profile",
    "-Wno-coverage-mismatch",
    "-fno-unroll-loops",
    "-fno-peel-loops",
    "-fno-tracer",
]


class OptionalBuildExt(build_ext):
    """build_ext that never fails the install: a missing compiler or a compile error is a warning; with GCC,
    a profile-guided build (see the module's docstring)."""

    def finalize_options(self) -> None:
        super().finalize_options()
        if not self.parallel:  # no -j given: the modules compile side by side, one per core (~40% less
            self.parallel = os.cpu_count() or 1  # time for the three builds of a PGO build on 2 cores)

    def run(self) -> None:
        # build_ext.run replaces `compiler` (a name) by the compiler object and clears `inplace` while it
        # builds: each build of the three starts from the options as given
        self._given = (self.compiler, self.inplace)
        try:
            why_not = self._why_no_pgo()
            if why_not is None:
                self._run_pgo()
            else:
                if why_not:
                    _warn(f"profile-guided build skipped ({why_not}); a plain build")
                super().run()
        except Exception as exc:  # noqa: BLE001 - any build failure leaves the pure-Python path
            self._skip(exc)
        finally:
            self._remove_instrumented()

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

    # -- the profile-guided build ------------------------------------------------------------------------

    def _why_no_pgo(self) -> str | None:
        """None when the build is profile-guided; else why not ("" when there is nothing to say)."""
        if not self.extensions or self.dry_run or os.environ.get(PGO_ENV, "") == "0":
            return ""
        try:
            gcc = _gcc_major(self._compiler_command())
        except Exception as exc:  # noqa: BLE001 - not knowing the compiler is no reason to fail the build
            return f"the C compiler is unknown ({exc.__class__.__name__}: {exc})"
        if gcc is None:
            return "the C compiler is not GCC; clang's profiles need llvm-profdata"
        if gcc < 10:
            return f"GCC {gcc} has no -fprofile-partial-training (GCC 10+)"
        return self._why_no_training()

    def _output_root(self) -> str:
        """The directory the built package is imported from: the source tree (--inplace, editable
        installs) or build_lib."""
        native_dir = os.path.dirname(os.path.abspath(self.get_ext_fullpath(self.extensions[0].name)))
        return os.path.dirname(os.path.dirname(native_dir))

    def _training_env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GCOV_", "NEXUS_AUTHZ_"))}
        env.update(PYTHONPATH=self._output_root(), PYTHONDONTWRITEBYTECODE="1", PYTHONHASHSEED="0", **extra)
        return env

    def _why_no_training(self) -> str | None:
        """Before building anything twice: can the training import what it needs (the runtime
        dependencies are absent in pip's isolated build environment, unless the interpreter's own
        site-packages has them: the training's PYTHONPATH replaces pip's)?"""
        cmd = [sys.executable, "-m", "nexus_authz.tools.pgo_train", "--check"]
        with tempfile.TemporaryDirectory(prefix="nexus-authz-pgo-") as tmp:
            try:
                env = self._training_env(NEXUS_AUTHZ_PURE="1")  # no module of an earlier build loads
                done = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=120)
            except (OSError, subprocess.SubprocessError) as exc:
                return f"the training cannot start: {exc}"
        if done.returncode != 0:
            said = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
            return f"the training cannot run here: {said[:300]}"
        return None

    def _compiler_command(self) -> list[str]:
        from setuptools._distutils.ccompiler import new_compiler
        from setuptools._distutils.sysconfig import customize_compiler

        compiler = new_compiler(compiler=self.compiler)
        customize_compiler(compiler)
        return list(getattr(compiler, "compiler_so", None) or ["cc"])

    def _build_as(self, pgo: int) -> None:
        """Build every extension (0: plain, 2: instrumented, 1: with the training's profile)."""
        if not hasattr(self, "_flags"):
            self._flags = {
                e.name: (list(e.extra_compile_args), list(e.extra_link_args)) for e in self.extensions
            }
        flags = self._flags
        extra = {0: [], 1: USE, 2: GENERATE}[pgo]
        for ext in self.extensions:
            compile_args, link_args = flags[ext.name]
            ext.extra_compile_args = compile_args + extra
            ext.extra_link_args = link_args + (GENERATE if pgo == 2 else [])
            ext.define_macros = [m for m in ext.define_macros if m[0] != "NEXUS_AUTHZ_PGO"]
            if pgo:
                ext.define_macros.append(("NEXUS_AUTHZ_PGO", str(pgo)))
        self.force = True  # the last build's objects are not this one's
        self.compiler, self.inplace = self._given
        try:
            super().run()
        finally:
            self.compiler, self.inplace = self._given

    def _profiles(self) -> list[str]:
        return glob.glob(os.path.join(self.build_temp, "**", "*.gcda"), recursive=True)

    def _run_pgo(self) -> None:
        for stale in self._profiles():  # an earlier build's profile must not steer this one
            os.remove(stale)
        self._build_as(2)
        why = self._train()
        try:
            if why:
                _warn(f"profile-guided build skipped ({why}); a plain build")
                self._build_as(0)
            else:
                self._build_as(1)
        finally:
            for profile in self._profiles():  # used, or a failed training's
                os.remove(profile)

    def _train(self) -> str:
        """Run the training on the instrumented modules just built; "" when it wrote their profiles, else
        why not."""
        built = [self.get_ext_fullpath(ext.name) for ext in self.extensions]
        missing = [path for path in built if not os.path.exists(path)]
        if missing:
            return f"{os.path.basename(missing[0])} did not build"
        native_dir = os.path.dirname(os.path.abspath(built[0]))
        env = self._training_env()
        try:
            timeout = float(os.environ.get(TRAIN_TIMEOUT_ENV, "") or 300)
        except ValueError:
            return f"{TRAIN_TIMEOUT_ENV} is not a number of seconds"
        cmd = [sys.executable, "-m", "nexus_authz.tools.pgo_train", "--expect", native_dir]
        with tempfile.TemporaryDirectory(prefix="nexus-authz-pgo-") as tmp:
            try:
                done = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                return f"the training took over {timeout:g} s"
            except OSError as exc:
                return f"the training did not start: {exc}"
        if done.returncode != 0:
            said = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
            return f"the training failed: {said[:300]}"
        trained = {os.path.basename(p).split(".")[0] for p in self._profiles()}
        untrained = [ext.name for ext in self.extensions if ext.name.rsplit(".", 1)[1] not in trained]
        if untrained:
            return f"the training wrote no profile for {', '.join(untrained)}"
        print(f"nexus-authz: profile-guided build: {done.stdout.strip()}", file=sys.stderr)
        return ""

    def _remove_instrumented(self) -> None:
        """Never leave an instrumented module installed (it writes .gcda files at exit and runs slower):
        one that is there after a failed rebuild is deleted (the pure-Python path then runs)."""
        given = getattr(self, "_given", (self.compiler, self.inplace))
        try:
            paths = set()
            for inplace in {False, bool(given[1])}:
                self.inplace = inplace
                paths.update(self.get_ext_fullpath(ext.name) for ext in self.extensions)
            for path in sorted(paths):
                if os.path.exists(path) and _instrumented(path):
                    os.remove(path)
                    _warn(f"{path} was built instrumented and is removed; the pure-Python path will run")
        except OSError as exc:
            _warn(f"could not check the built modules for instrumentation ({exc})")
        finally:
            self.inplace = given[1]


def _warn(message: str) -> None:
    print(f"WARNING: nexus-authz: {message}", file=sys.stderr)


def _instrumented(path: str) -> bool:
    with open(path, "rb") as f:
        return b"__gcov_" in f.read()


def _gcc_major(command: list[str]) -> int | None:
    """The major version of the GCC `command` runs, or None when it is not GCC (clang defines __GNUC__
    too, and __clang__)."""
    if not command or shutil.which(command[0]) is None:
        return None
    try:
        done = subprocess.run(
            [command[0], "-dM", "-E", "-x", "c", os.devnull], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return None
    macros = dict(line.split(" ", 2)[1:] for line in done.stdout.splitlines() if line.count(" ") >= 2)
    if done.returncode != 0 or "__clang__" in macros or "__INTEL_LLVM_COMPILER" in macros:
        return None
    try:
        return int(macros["__GNUC__"])
    except (KeyError, ValueError):
        return None


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
