"""deploy/k8s-secure, the secure overlay of deploy/k8s: its settings are real settings fields that
validate together, its Secrets are templates, and (rendered by kubectl's kustomize) every pod mounts
the files its settings name, probes speak TLS, and KEDA polls Redis over TLS with the password."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import PurePosixPath

import pytest
import yaml

from services.common.queues import SERVICES
from services.common.settings import Settings
from services.common.tls import TlsFiles
from tests.deploy.manifests import (DEPLOY, FLOWER, FLOWER_PORT, STUDIO, configmap_env, load_yaml_docs, only_container,
                                    settings_field)

SECURE = DEPLOY / "k8s-secure"


def overlay_objects(name: str) -> list[dict]:
    return load_yaml_docs(SECURE / name)


def config(name: str) -> dict[str, str]:
    return {o["metadata"]["name"]: o["data"] for o in overlay_objects("secure-config.yaml")}[name]


SECRETS = {o["metadata"]["name"]: o for o in overlay_objects("secrets.yaml")}


def test_the_overlay_lists_its_files():
    kustomization = yaml.safe_load((SECURE / "kustomization.yaml").read_text())
    named = set(kustomization["resources"][1:]) | {p["path"] for p in kustomization["patches"]}
    assert kustomization["resources"][0] == "../k8s"
    assert named == {p.name for p in SECURE.iterdir() if p.name != "kustomization.yaml"}


@pytest.mark.parametrize("name", ["dataengine-secure-config", "dataengine-signing-config"])
def test_secure_config_keys_are_settings_fields(name):
    for key in config(name):
        assert settings_field(key), f"{key} is not a Settings field (typo?)"


def test_secrets_are_templates():
    for name, secret in SECRETS.items():
        assert set(secret["stringData"].values()) == {"REPLACE_ME"}, f"{name}: no real secrets in the repository"
        for key in secret["stringData"]:
            assert not key.startswith("DATAENGINE_") or settings_field(key), f"{name}: {key}"


def test_the_secure_settings_validate_together(monkeypatch):
    env = {**configmap_env(), **config("dataengine-secure-config"), **config("dataengine-signing-config"),
           "DATAENGINE_BROKER_URL": "rediss://:pw@redis.dataengine.svc:6379/0?ssl_cert_reqs=required",
           "DATAENGINE_MINIO_ACCESS_KEY": "k", "DATAENGINE_MINIO_SECRET_KEY": "s"}
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    settings = Settings()
    tls = TlsFiles.from_settings(settings)
    assert tls.server_enabled and tls.client_auth == "require"
    assert settings.grpc_reflection is False and settings.minio_secure is True
    assert settings.auth_tokens_file is not None and settings.queue_signing_key is not None


def _mounted(container: dict, pod: dict, path: str) -> tuple[str, str] | None:
    """(secret name, key) that holds the file ``path`` in this pod, or None."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    for mount in container["volumeMounts"]:
        folder = PurePosixPath(mount["mountPath"])
        if PurePosixPath(path).parent == folder and "secret" in volumes[mount["name"]]:
            return volumes[mount["name"]]["secret"]["secretName"], PurePosixPath(path).name
    return None


@pytest.fixture(scope="module")
def rendered() -> dict[tuple[str, str], dict]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl (built-in kustomize) not installed")
    out = subprocess.run(["kubectl", "kustomize", str(SECURE)], capture_output=True, text=True, check=True)
    return {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(out.stdout) if o}


@pytest.mark.parametrize("name", [*SERVICES, STUDIO, FLOWER])
def test_every_file_a_pod_is_told_of_is_mounted_from_its_secret(rendered, name):
    dep = rendered[("Deployment", name)]
    container, pod = only_container(dep), dep["spec"]["template"]["spec"]
    sources = [s.get("configMapRef", s.get("secretRef"))["name"] for s in container["envFrom"]]
    wanted = ["dataengine-secure-config", "dataengine-broker"] + (["dataengine-signing-config"] if name in SERVICES else [])
    assert set(wanted) <= set(sources)
    assert sources.index("dataengine-broker") > sources.index("dataengine-config"), "the rediss URL must win"
    for source in wanted:
        if source not in {"dataengine-secure-config", "dataengine-signing-config"}:
            continue
        for key, value in config(source).items():
            if not key.endswith(("_FILE", "_KEY", "_CERT", "_STORE")):
                continue
            held = _mounted(container, pod, value)
            assert held is not None, f"{name}: {key}={value} is in no mounted Secret"
            secret, file = held
            keys = SECRETS[secret]["stringData"]
            assert file in keys or any(PurePosixPath(k).match(file) for k in keys), f"{name}: {secret} has no {file}"


@pytest.mark.parametrize("name", SERVICES)
def test_grpc_probes_run_the_tls_health_check_on_the_service_port(rendered, name):
    container = only_container(rendered[("Deployment", name)])
    port = Settings().port_of(name)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert "grpc" not in container[probe], f"{name} {probe}: a native gRPC probe speaks plaintext"
        assert container[probe]["exec"]["command"] == ["python", "/opt/dataengine/healthcheck.py", str(port)]
        assert container[probe]["timeoutSeconds"] >= 5
    assert rendered[("Service", name)]["spec"]["ports"][0]["appProtocol"] == "https"


def test_the_studio_serves_https_without_asking_browsers_for_certificates(rendered):
    dep = rendered[("Deployment", STUDIO)]
    container = only_container(dep)
    assert {"name": "DATAENGINE_TLS_CLIENT_AUTH", "value": "none"} in container["env"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["scheme"] == "HTTPS"
    mounts = {m["name"] for m in container["volumeMounts"]}
    assert "signing" not in mounts, "the studio sends no task: it gets no signing key"


def test_keda_polls_redis_over_tls_with_the_password(rendered):
    scaled = [o for (kind, _), o in rendered.items() if kind == "ScaledObject"]
    assert scaled
    auth = rendered[("TriggerAuthentication", "dataengine-redis")]["spec"]["secretTargetRef"]
    assert {ref["parameter"] for ref in auth} == {"password", "ca"}
    for ref in auth:
        assert ref["key"] in SECRETS[ref["name"]]["stringData"]
    for obj in scaled:
        (trigger,) = obj["spec"]["triggers"]
        assert trigger["metadata"]["enableTLS"] == "true"
        assert trigger["authenticationRef"] == {"name": "dataengine-redis"}


def test_flower_asks_for_a_password_and_serves_https(rendered):
    """Flower shows every task's arguments and can shut workers down: basic auth from a Secret
    template, HTTPS with the pod's certificate, and the rediss broker URL of dataengine-broker."""
    dep = rendered[("Deployment", FLOWER)]
    container, pod = only_container(dep), dep["spec"]["template"]["spec"]
    env = {e["name"]: e for e in container["env"]}
    ref = env["FLOWER_BASIC_AUTH"]["valueFrom"]["secretKeyRef"]
    assert ref["key"] in SECRETS[ref["name"]]["stringData"]
    for key, wanted in (("FLOWER_CERTFILE", "tls.crt"), ("FLOWER_KEYFILE", "tls.key")):
        assert _mounted(container, pod, env[key]["value"]) == ("dataengine-tls", wanted), key
        assert wanted in SECRETS["dataengine-tls"]["stringData"]
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsUser"], "0440 Secret files"
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["scheme"] == "HTTPS"
        assert container[probe]["httpGet"]["port"] == FLOWER_PORT
    assert dep["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scheme"] == "https"
    assert rendered[("Service", FLOWER)]["spec"]["ports"][0]["appProtocol"] == "https"
    assert "--broker=$(DATAENGINE_BROKER_URL)" in container["args"]  # the Secret's, later in envFrom


def test_the_studio_metrics_are_scraped_over_https(rendered):
    annotations = rendered[("Deployment", STUDIO)]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scheme"] == "https"
