"""deploy/docker: the Dockerfile (no Docker engine here, so it is read, not built) and the health
check script, run against a real gRPC server."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest
from services.common.grpc_server import build_server
from services.common.settings import Settings
from tests.deploy.manifests import (DEPLOY, DEPLOYED, DOCKERFILE, ROOT, docker_ignored, dockerfile_stages,
                                    k8s_objects, settings_field)
from tests.servers import free_port

STATIC = ROOT / "services" / "studio" / "static"  # the studio's page, package data

HEALTH_SCRIPT = DEPLOY / "docker" / "healthcheck.py"


def instructions(stage: str, name: str) -> list[str]:
    return [args for instr, args in dockerfile_stages()[stage] if instr == name]


def test_runtime_stage_is_slim_non_root_with_serve_entrypoint():
    assert instructions("runtime", "FROM") == ["${PYTHON_IMAGE}"]
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in DOCKERFILE.read_text()
    assert [json.loads(a) for a in instructions("runtime", "ENTRYPOINT")] == [["dataengine", "serve"]]
    (user,) = instructions("runtime", "USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric non-root USER, so runAsNonRoot can check it"
    k8s_uids = {o["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
                for o in k8s_objects() if o["kind"] in ("Deployment", "Job")}
    assert k8s_uids == {int(uid)}


@pytest.mark.parametrize("service", DEPLOYED)
def test_each_service_is_a_target_with_its_command(service):
    stage = dockerfile_stages()[service]
    assert stage[0] == ("FROM", "runtime")
    assert [json.loads(a) for a in instructions(service, "CMD")] == [[service]]


def test_torch_pins_match_pyproject():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = dict(d.split("==") for d in deps if d.startswith(("torch==", "torchvision==")))
    args = dict(a.split("=", 1) for a in instructions("build", "ARG") if "=" in a)
    assert args["TORCH_VERSION"] == pins["torch"]
    assert args["TORCHVISION_VERSION"] == pins["torchvision"]


def test_env_names_are_settings_fields():
    for env in instructions("runtime", "ENV"):
        for word in env.split():
            name = word.split("=")[0]
            if name.startswith("DATAENGINE_"):
                assert settings_field(name), f"{name} is not a Settings field"


def test_copied_sources_exist_and_are_not_docker_ignored():
    ignored = [line for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line and not line.startswith("#")]
    assert ".venv" in ignored and ".git" in ignored  # the context is the repository root
    copies = [a for stage in ("build", "runtime") for a in instructions(stage, "COPY")
              if not a.startswith("--from")]
    sources = [src for a in copies for src in a.split()[:-1]]
    assert "services" in sources and "deploy/docker/healthcheck.py" in sources
    for src in sources:
        assert (ROOT / src).exists(), src
        assert not docker_ignored(src), src
    assert "COPY deploy/docker/healthcheck.py /opt/dataengine/healthcheck.py" in DOCKERFILE.read_text()


def test_runtime_exposes_every_default_port():
    defaults = {name: field.default for name, field in Settings.model_fields.items()}
    exposed = {int(p) for a in instructions("runtime", "EXPOSE") for p in a.split()}
    assert exposed == {defaults[f"{service}_port"] for service in DEPLOYED}  # studio_port: 8080


def test_studio_page_reaches_the_build_context():
    """`COPY services ./services` takes the page along unless .dockerignore drops it."""
    files = [p.relative_to(ROOT).as_posix() for p in STATIC.rglob("*") if p.is_file()]
    assert "services/studio/static/index.html" in files
    assert not [f for f in files if docker_ignored(f)], ".dockerignore drops the studio's page"


def test_wheel_the_image_installs_carries_the_studio_page(tmp_path):
    """The build stage runs `pip install --no-deps .` on what it copied (pyproject.toml, README.md,
    services/): a real, non-editable install, so the page must be package data of that wheel."""
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "services", src / "services",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("dataengine-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    wanted = {p.relative_to(ROOT).as_posix() for p in STATIC.rglob("*") if p.is_file()}
    assert wanted <= names, f"missing from the wheel: {sorted(wanted - names)}"


def run_health(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(HEALTH_SCRIPT), *args], capture_output=True, text=True,
                          timeout=30)


def test_health_script_reports_serving_then_draining():
    server, port = build_server(lambda s: [], f"127.0.0.1:{free_port()}", 4 * 1024 * 1024, workers=2)
    server.start()
    try:
        ok = run_health(str(port))
        assert ok.returncode == 0, ok.stderr
        server._dataengine_health.enter_graceful_shutdown()  # what SIGTERM does before draining
        draining = run_health(str(port))
        assert draining.returncode == 1 and "NOT_SERVING" in draining.stderr
    finally:
        server.stop(None).wait()


@pytest.mark.parametrize("args,code,message", [
    ([], 2, "usage"),              # no port
    (["http"], 2, "usage"),        # port not a number
])
def test_health_script_usage(args, code, message):
    result = run_health(*args)
    assert result.returncode == code and message in result.stderr


def test_health_script_fails_when_nothing_listens():
    result = run_health(str(free_port()))
    assert result.returncode == 1 and "UNAVAILABLE" in result.stderr
