"""What a user gets from `pip install autosteer-kernels`, checked outside this checkout.

The sdist and the wheel are built as a package index would build them (isolated, so without torch:
the wheel is pure Python and carries the C++ sources), the wheel is installed into a fresh venv with
torch pinned first (as the README says), and the installed package is used from outside the checkout;
from the repository root, an installed ``kernels`` package must win over the top-level ``kernels/`` folder. Slow (a venv, downloads from the package index, a JIT
build of the C++ kernel): marked ``slow``, runs in CI.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

import autosteer

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
PACK = f"autosteer/packs/{autosteer.DEFAULT_PACK_NAME}"  # the pooled gate, the default since 2026-12-07
MONITOR_PACK = f"autosteer/packs/{autosteer.DEFAULT_MONITOR_PACK_NAME}"
LAST_TOKEN_PACK = f"autosteer/packs/{autosteer.LAST_TOKEN_PACK_NAME}"


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    """(sdist, wheel): the sdist from the checkout, the wheel from the sdist, both isolated builds."""
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--sdist", "--outdir", out, REPO])
    sdist = next(out.glob("autosteer_kernels-*.tar.gz"))
    _run([sys.executable, "-m", "build", "--wheel", "--outdir", out, sdist])
    return sdist, next(out.glob("autosteer_kernels-*.whl"))


def test_sdist_has_sources_license_and_test_helpers(dists):
    sdist, _ = dists
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    need = {"LICENSE", "pytest.ini", "setup.py", "pyproject.toml", "README.md", "csrc/steer_step_cpu.cpp",
            "csrc/torch_bindings.cpp", "kernels/steer_step.py", "tests/conftest.py", "tests/_steer_cases.py",
            "tests/_tgi_sim.py", "tests/_tiny_multimodal.py", "autosteer/py.typed", PACK, MONITOR_PACK, LAST_TOKEN_PACK}
    assert not need - names, f"missing from the sdist: {sorted(need - names)}"
    assert "kernels/__init__.py" not in names  # the top-level folder must not shadow HF's `kernels`


def test_wheel_is_pure_and_carries_sources_pack_and_metadata(dists):
    _, wheel = dists
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name  # the index takes it; no torch ABI baked in
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = zf.read(meta_name).decode()
    need = {"autosteer/_csrc/steer_step_cpu.cpp", "autosteer/_csrc/torch_bindings.cpp", "autosteer/kernels/__init__.py",
            "autosteer/kernels/steer_step.py", "autosteer/py.typed", PACK, MONITOR_PACK, LAST_TOKEN_PACK}
    need |= {str(p.relative_to(REPO)) for p in (REPO / "autosteer" / "fit_prompts").rglob("*") if p.is_file()}
    need |= {f"autosteer/kernels/{p.name}" for p in (REPO / "kernels").glob("*.py")}
    assert not need - names, f"missing from the wheel: {sorted(need - names)}"
    assert not any(n.endswith(".so") for n in names)
    assert not any(n.startswith(("kernels/", "tests/", "csrc/")) for n in names)  # nothing top-level but autosteer
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert f"Version: {autosteer.__version__}" in meta and "Requires-Python: >=3.11" in meta and "License-Expression: MIT" in meta
    requires = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    core = [r for r in requires if "extra ==" not in r]
    assert any(r.startswith("torch") and ">=2.6" in r for r in core), core
    assert any(r.startswith("transformers") and "<" in r for r in core), core  # a bounded range
    for unused in ("accelerate", "numpy", "matplotlib", "gguf", "pyyaml"):
        assert not any(r.startswith(unused) for r in core), f"{unused} is a core requirement: {core}"
    gguf_extra = [r for r in requires if "extra == \"gguf\"" in r]
    for need_for_gguf in ("gguf", "accelerate"):  # transformers reads GGUF (the default model) only with both
        assert any(r.startswith(need_for_gguf) for r in gguf_extra), gguf_extra


@pytest.fixture(scope="module")
def venv(dists, tmp_path_factory):
    """A fresh venv with torch's CPU wheel (pinned, as the README installs it) and the built wheel."""
    root = tmp_path_factory.mktemp("venv")
    _run([sys.executable, "-m", "venv", root / "v"])
    py = root / "v" / "bin" / "python"
    _run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", "torch==2.13.0"])
    _run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", dists[1]])
    return py, root


CHECK = textwrap.dedent("""
    import json, subprocess, sys, warnings
    from pathlib import Path
    sys.path.insert(1, sys.argv[1])        # the test helpers, from the checkout (appended: never the package)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import autosteer
        import autosteer.runtime.op as op
        from autosteer.runtime.op import steer_step
    from _steer_cases import make_case, check_against_reference
    case = make_case(B=5, H=40, V=300, r=8, seed=3)
    out = case.clone()
    steer_step(*case.call_args(out))
    check_against_reference(case, out)     # raises on a wrong result
    pack = autosteer.load_pack(autosteer.default_pack_path())
    cli = subprocess.run([str(Path(sys.executable).with_name("autosteer")), "--version"], capture_output=True, text=True)
    print(json.dumps({"file": autosteer.__file__,
                      "backends": op.available_backends(), "native": op.native_backend(), "layer": pack.layer,
                      "version": cli.stdout.strip(), "warnings": [str(w.message) for w in caught]}))
""")


def _check(py, env, cwd) -> dict:
    """Run CHECK with the venv's python outside the checkout (from its root, '' on sys.path would import the
    checkout's autosteer/ instead of the installed one; the root's `kernels` is tested on its own below)."""
    out = _run([py, "-c", CHECK, REPO / "tests"], cwd=cwd, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_plain_install_has_the_cpp_kernel_and_the_default_pack(venv):
    py, root = venv
    env = {**os.environ, "AUTOSTEER_EXTENSION_DIR": str(root / "ext")}  # a cold JIT cache, as on a new machine
    env.pop("PYTHONPATH", None)
    got = _check(py, env, root)
    assert str(root) in got["file"], got  # the installed package, not this checkout
    assert got["backends"]["cpp"] and got["native"] == "JIT build of csrc/", got
    assert got["version"] == f"autosteer-kernels {autosteer.__version__}"
    assert not [w for w in got["warnings"] if "C++" in w], got["warnings"]


def test_install_without_a_compiler_falls_back_with_one_warning(venv, dists):
    py, root = venv
    sdist = dists[0]
    env = {**os.environ, "CXX": str(root / "no-such-compiler"), "AUTOSTEER_EXTENSION_DIR": str(root / "ext-nocc")}
    env.pop("PYTHONPATH", None)
    _run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", "setuptools>=77", "wheel"])
    out = _run([py, "-m", "pip", "install", "-v", "--disable-pip-version-check", "--no-build-isolation", "--force-reinstall",
                "--no-deps", sdist], env=env)
    assert "not building the C++ CPU kernel (no C++ compiler found" in out.stdout + out.stderr
    got = _check(py, env, root)  # the reference op gives the right result (checked inside)
    assert str(root) in got["file"], got
    assert not got["backends"]["cpp"] and got["native"] is None
    native = [w for w in got["warnings"] if "C++ CPU kernel is unavailable" in w]
    assert len(native) == 1 and "install a C++ compiler" in native[0], got["warnings"]


def test_repo_root_does_not_shadow_an_installed_kernels_package(tmp_path):
    """From the repo root, `import kernels` finds an installed (regular) `kernels` package -- HF's
    -- not the repo's top-level kernels/ folder (which has no __init__.py for that reason)."""
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("WHO = 'installed kernels'\n")
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = _run([sys.executable, "-c", "import kernels, autosteer.kernels.steer_step as k; print(kernels.WHO); print(k.__file__)"],
               cwd=REPO, env=env)
    who, kernel_file = out.stdout.strip().splitlines()
    assert who == "installed kernels"
    assert Path(kernel_file).name == "steer_step.py"
