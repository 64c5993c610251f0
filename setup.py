"""Build script for autosteer-kernels.

The C++ CPU kernel in ``csrc/`` is compiled with ninja through ``torch.utils.cpp_extension``
when torch is importable at build time (install with ``--no-build-isolation`` so the build
sees the torch you already have). Environment switches:

- ``AUTOSTEER_SKIP_NATIVE_BUILD=1``: never build the extension (pure-Python install; the
  runtime then JIT-builds it on first use, or falls back to the reference op with a warning).
- ``AUTOSTEER_FORCE_NATIVE_BUILD=1``: fail the install if the extension cannot be built.
"""
import os
import warnings
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
SKIP = os.environ.get("AUTOSTEER_SKIP_NATIVE_BUILD", "0") == "1"
FORCE = os.environ.get("AUTOSTEER_FORCE_NATIVE_BUILD", "0") == "1"

ext_modules = []
cmdclass = {}
if not SKIP:
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension

        sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
        import torch

        # torch >= 2.14 headers need C++20 (autosteer.runtime.op.cxx_standard_flag: the same rule for the JIT build)
        _major, _minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
        cxx_std = "-std=c++20" if (_major, _minor) >= (2, 14) else "-std=c++17"
        ext_modules = [
            CppExtension(
                "autosteer._C",
                sources,
                extra_compile_args={"cxx": ["-O3", cxx_std, "-fopenmp"]},
                extra_link_args=["-fopenmp"],
            )
        ]
        cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}
    except ImportError as exc:
        if FORCE:
            raise RuntimeError("AUTOSTEER_FORCE_NATIVE_BUILD=1 but torch is not importable at build time") from exc
        warnings.warn(
            "torch is not importable at build time: skipping the C++ CPU kernel; "
            "autosteer will JIT-build it on first use or fall back to the reference op. "
            "Install torch first and use `pip install --no-build-isolation` to build it now."
        )

setup(
    name="autosteer-kernels",
    version="0.1.0",
    description="AutoSteer inference-time safety steering with fused Triton/C++ kernels",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8") if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=["autosteer", "autosteer.method", "autosteer.runtime", "autosteer.integrations", "autosteer.kernels"],
    package_dir={"autosteer.kernels": "kernels"},
    package_data={"autosteer": ["fit_prompts/*.txt", "fit_prompts/*.md"]},
    include_package_data=True,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "torch>=2.4,<3",
        "transformers>=5.0",
        "safetensors>=0.4",
        "tqdm",
        "numpy",
        "matplotlib",
        "gguf>=0.10",
        "accelerate",
        "pyyaml",
    ],
    extras_require={
        "triton": ["triton>=3.0"],
        "test": ["pytest", "hypothesis", "ninja"],
    },
    entry_points={
        "console_scripts": ["autosteer=autosteer.cli:main", "autosteer-tgi-server=autosteer.integrations.tgi:main"],
        # vLLM loads every plugin of this group; without AUTOSTEER_PACK the processor does nothing
        "vllm.logits_processors": ["autosteer=autosteer.integrations.vllm:AutoSteerVLLMLogitsProcessor"],
        "vllm.general_plugins": ["autosteer_guard=autosteer.integrations.vllm:install_startup_guard"],
    },
    zip_safe=False,
)
