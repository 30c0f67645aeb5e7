"""deploy/compose.yaml: every engine service gets real settings, its own port, a gRPC health check
on that port, and the Redis and MinIO the file itself starts."""

from __future__ import annotations

from urllib.parse import urlparse

import pytest

from services.common.queues import SERVICES
from services.common.settings import Settings
from tests.deploy.manifests import compose, interpolate, settings_field

HEALTH_SCRIPT = "/opt/dataengine/healthcheck.py"  # where the Dockerfile puts it


def engine_env(service: str) -> dict[str, str]:
    return {k: interpolate(v) for k, v in compose()["services"][service]["environment"].items()}


def engine_settings(service: str, monkeypatch) -> Settings:
    for key, value in engine_env(service).items():
        monkeypatch.setenv(key, value)
    return Settings()


def test_compose_has_infrastructure_and_every_service():
    services = compose()["services"]
    assert {"redis", "minio", "minio-init", *SERVICES} <= services.keys()
    assert services["minio"]["image"].startswith("minio/minio:")
    assert "--console-address" in services["minio"]["command"]
    assert services["minio-init"]["image"].startswith("minio/mc:")


@pytest.mark.parametrize("service", [*SERVICES, "models"])
def test_env_names_are_settings_fields(service):
    for key in compose()["services"][service]["environment"]:
        assert settings_field(key), f"{service}: {key} is not a Settings field (typo?)"


@pytest.mark.parametrize("service", SERVICES)
def test_service_is_built_healthchecked_and_published_on_its_port(service, monkeypatch):
    spec = compose()["services"][service]
    settings = engine_settings(service, monkeypatch)
    port = settings.port_of(service)
    assert spec["build"]["dockerfile"] == "deploy/docker/Dockerfile"
    assert spec["build"]["target"] == service
    assert spec["ports"] == [f"{port}:{port}"]
    assert spec["healthcheck"]["test"] == ["CMD", "python", HEALTH_SCRIPT, str(port)]
    assert spec["depends_on"]["redis"]["condition"] == "service_healthy"
    assert spec["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    assert spec["read_only"] is True and "/tmp" in spec["tmpfs"]


@pytest.mark.parametrize("service", ["embedder", "decoder"])
def test_model_services_read_checkpoints_from_the_models_volume(service, monkeypatch):
    settings = engine_settings(service, monkeypatch)
    assert f"models:{settings.models_dir}:ro" in compose()["services"][service]["volumes"]
    fetch = compose()["services"]["models"]
    assert fetch["entrypoint"] == ["dataengine", "models", "fetch"]
    assert f"models:{settings.models_dir}" in fetch["volumes"]


def test_settings_point_at_the_compose_redis_and_minio(monkeypatch):
    settings = engine_settings("embedder", monkeypatch)
    services = compose()["services"]
    assert urlparse(settings.broker_url).hostname in services
    assert settings.minio_endpoint.split(":")[0] in services
    minio_env = {k: interpolate(v) for k, v in services["minio"]["environment"].items()}
    assert (settings.minio_access_key, settings.minio_secret_key) == (
        minio_env["MINIO_ROOT_USER"], minio_env["MINIO_ROOT_PASSWORD"])
    init_env = {k: interpolate(v) for k, v in services["minio-init"]["environment"].items()}
    assert init_env["BUCKET"] == settings.bucket  # the init job makes the bucket the services use
    assert "mc mb --ignore-existing" in services["minio-init"]["command"][0]
