"""Build steps of autosteer-kernels that pyproject.toml cannot declare (metadata lives there).

1. The wheel carries the sources it may need at run time, copied into the package by ``build_py``:
   the top-level ``kernels/*.py`` as ``autosteer/kernels/`` (the top-level folder has no
   ``__init__.py`` so that it never shadows Hugging Face's ``kernels`` package) and ``csrc/`` as
   ``autosteer/_csrc/`` (autosteer JIT-builds the C++ kernel from it on first use when the wheel
   has no compiled ``_C``).
2. The C++ CPU kernel ``autosteer._C`` is compiled with ninja only when torch is importable at build
   time (``pip install --no-build-isolation``) and a C++ compiler exists. A failed or impossible
   build never fails the install: it warns, and autosteer JIT-builds the kernel on first use or
   runs the PyTorch reference op. Switches:

   - ``AUTOSTEER_SKIP_NATIVE_BUILD=1``: never build ``_C`` (pure-Python wheel).
   - ``AUTOSTEER_FORCE_NATIVE_BUILD=1``: fail the install if ``_C`` cannot be built.
"""
import os
import shutil
import warnings
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SKIP = os.environ.get("AUTOSTEER_SKIP_NATIVE_BUILD", "0") == "1"
FORCE = os.environ.get("AUTOSTEER_FORCE_NATIVE_BUILD", "0") == "1"
# source folder -> (package folder in the wheel, file patterns)
BUNDLED = {"kernels": ("autosteer/kernels", ("*.py",)), "csrc": ("autosteer/_csrc", ("*.cpp", "*.h"))}


class BuildPyWithSources(build_py):
    """build_py that also copies the top-level kernels/ and csrc/ sources into the package."""

    def run(self):
        super().run()
        for src, (dest, patterns) in BUNDLED.items():
            target = Path(self.build_lib) / dest
            target.mkdir(parents=True, exist_ok=True)
            for pattern in patterns:
                for path in sorted((ROOT / src).glob(pattern)):
                    self.copy_file(str(path), str(target / path.name))


def _compiler() -> str | None:
    """The C++ compiler torch's build would call, if it exists."""
    cxx = os.environ.get("CXX")
    candidates = [cxx] if cxx else ["c++", "g++", "clang++"]
    return next((path for path in map(shutil.which, candidates) if path), None)


def _skip(reason: str) -> None:
    if FORCE:
        raise RuntimeError(f"AUTOSTEER_FORCE_NATIVE_BUILD=1 but the C++ kernel cannot be built: {reason}")
    warnings.warn(f"autosteer-kernels: not building the C++ CPU kernel ({reason}); autosteer JIT-builds it on "
                  "first use (needs a C++ compiler) or falls back to the PyTorch reference op with a warning")


def _native_build():
    """(ext_modules, build_ext class) for the C++ kernel, or ([], None) with a warning."""
    if SKIP:
        return [], None
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        _skip("torch is not importable at build time; install torch first and use --no-build-isolation to build it now")
        return [], None
    if _compiler() is None:
        _skip("no C++ compiler found (set CXX or install g++)")
        return [], None

    class OptionalBuildExtension(BuildExtension):
        """A compile error warns instead of failing the install (unless FORCE)."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001 - any failure: the runtime has fallbacks
                if FORCE:
                    raise
                _skip(f"{type(exc).__name__}: {exc}")
                self._failed = True

        def get_outputs(self):  # an editable install links the outputs; a failed build has none
            return [] if getattr(self, "_failed", False) else super().get_outputs()

        def copy_extensions_to_source(self):
            if not getattr(self, "_failed", False):
                super().copy_extensions_to_source()

    # torch >= 2.14 headers need C++20 (autosteer.runtime.op.cxx_standard_flag: the same rule for the JIT build)
    major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    cxx_std = "-std=c++20" if (major, minor) >= (2, 14) else "-std=c++17"
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    ext = CppExtension("autosteer._C", sources, extra_compile_args={"cxx": ["-O3", cxx_std, "-fopenmp"]},
                       extra_link_args=["-fopenmp", "-s"])  # -s: strip symbols (4.7 MB -> well under 1 MB)
    return [ext], OptionalBuildExtension.with_options(use_ninja=True)


ext_modules, build_ext = _native_build()
cmdclass = {"build_py": BuildPyWithSources}
if build_ext is not None:
    cmdclass["build_ext"] = build_ext

setup(ext_modules=ext_modules, cmdclass=cmdclass)
