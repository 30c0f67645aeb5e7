"""deploy/compose.yaml: every engine service gets real settings, its own port, a gRPC health check
on that port, and the Redis and MinIO the file itself starts; the studio an HTTP check on /healthz
and the addresses of the orchestrator and decoder the file starts; Flower reads the services'
broker, and Prometheus scrapes every service where it serves /metrics."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from services.common.queues import SERVICES
from services.common.settings import Settings
from tests.deploy.manifests import (DEPLOY, DEPLOYED, FLOWER, FLOWER_PORT, HEALTHZ, METRICS_PATH, STUDIO, compose,
                                    interpolate, settings_field)

HEALTH_SCRIPT = "/opt/dataengine/healthcheck.py"  # where the Dockerfile puts it


def engine_env(service: str) -> dict[str, str]:
    return {k: interpolate(v) for k, v in compose()["services"][service]["environment"].items()}


def engine_settings(service: str, monkeypatch) -> Settings:
    for key, value in engine_env(service).items():
        monkeypatch.setenv(key, value)
    return Settings()


def test_compose_has_infrastructure_and_every_service():
    services = compose()["services"]
    assert {"redis", "minio", "minio-init", *DEPLOYED, FLOWER, "prometheus"} <= services.keys()
    assert services["minio"]["image"].startswith("minio/minio:")
    assert "--console-address" in services["minio"]["command"]
    assert services["minio-init"]["image"].startswith("minio/mc:")


@pytest.mark.parametrize("service", [*DEPLOYED, "models"])
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


def studio_health_url(spec: dict) -> str:
    """The URL the studio's healthcheck fetches: the slim image has no curl, so it is python's
    urllib (urlopen raises, so the check exits 1, on a refused connection or a non-2xx answer)."""
    test = spec["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"] and len(test) == 4, test
    assert "urllib.request.urlopen(" in test[3]
    (url,) = re.findall(r"urlopen\('([^']+)'", test[3])
    return url


def test_studio_is_built_healthchecked_over_http_and_published_on_its_port(monkeypatch):
    spec = compose()["services"][STUDIO]
    settings = engine_settings(STUDIO, monkeypatch)
    port = settings.studio_port
    assert spec["build"]["dockerfile"] == "deploy/docker/Dockerfile"
    assert spec["build"]["target"] == STUDIO
    assert spec["image"].startswith("dataengine-studio:")
    assert spec["ports"] == [f"{port}:{port}"]
    url = urlparse(studio_health_url(spec))
    assert (url.scheme, url.hostname, url.port, url.path) == ("http", "127.0.0.1", port, HEALTHZ)
    assert spec["read_only"] is True and "/tmp" in spec["tmpfs"]
    assert spec["cap_drop"] == ["ALL"]


def test_studio_needs_no_models_volume_or_queue():
    spec = compose()["services"][STUDIO]
    assert not spec.get("volumes"), "the studio loads no model"
    assert "deploy" not in spec, "no GPU reservation"
    assert "redis" not in spec["depends_on"], "no Celery worker"
    assert spec["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"


@pytest.mark.parametrize("backend", ["orchestrator", "decoder"])
def test_studio_reaches_the_compose_orchestrator_and_decoder(backend, monkeypatch):
    spec = compose()["services"][STUDIO]
    address = getattr(engine_settings(STUDIO, monkeypatch), f"{backend}_address")
    host, _, port = address.rpartition(":")
    assert host == backend, f"{backend}_address {address!r} is not the Compose service"
    assert int(port) == engine_settings(backend, monkeypatch).port_of(backend)
    assert spec["depends_on"][backend]["condition"] == "service_healthy"


@pytest.mark.parametrize("field,default", [("review_lease_s", 600.0), ("audit_rate", 0.05)])
def test_review_settings_are_the_defaults_for_orchestrator_and_studio(field, default, monkeypatch):
    """The orchestrator holds the leases and draws the audits, the studio heartbeats the leases:
    both read the shared values, which are the documented defaults."""
    assert Settings.model_fields[field].default == default
    for service in ("orchestrator", STUDIO):
        env = engine_env(service)
        assert f"DATAENGINE_{field.upper()}" in env, f"{service}: DATAENGINE_{field.upper()} not set"
        assert getattr(engine_settings(service, monkeypatch), field) == default


def test_flower_watches_the_services_broker(monkeypatch):
    spec = compose()["services"][FLOWER]
    command = spec["command"]
    assert spec["image"].startswith("mher/flower:")  # flower is no dependency of the services' image
    assert command[0] == "celery" and "flower" in command
    broker = command[command.index("--broker") + 1]
    assert broker == engine_settings("orchestrator", monkeypatch).broker_url
    assert f"--port={FLOWER_PORT}" in command and spec["ports"] == [f"{FLOWER_PORT}:{FLOWER_PORT}"]
    assert spec["depends_on"]["redis"]["condition"] == "service_healthy"
    assert f"127.0.0.1:{FLOWER_PORT}/healthcheck" in spec["healthcheck"]["test"][-1]
    assert spec["read_only"] is True and spec["cap_drop"] == ["ALL"]


def prometheus_mounts() -> dict[str, Path]:
    """The prometheus service's bind mounts: container path -> file in the repository."""
    mounts = {}
    for volume in compose()["services"]["prometheus"]["volumes"]:
        source, target = volume.split(":")[:2]
        if source.startswith("."):  # Compose resolves it from the compose file's folder
            mounts[target] = (DEPLOY / source).resolve()
    return mounts


def prometheus_config() -> tuple[str, dict]:
    command = compose()["services"]["prometheus"]["command"]
    (path,) = [c.split("=", 1)[1] for c in command if c.startswith("--config.file=")]
    return path, yaml.safe_load(prometheus_mounts()[path].read_text())


def test_prometheus_mounts_its_config_and_rules():
    spec = compose()["services"]["prometheus"]
    assert spec["image"].startswith("prom/prometheus:")
    mounts = prometheus_mounts()
    assert mounts and all(path.is_file() for path in mounts.values()), mounts
    path, config = prometheus_config()
    folder = Path(path).parent
    for rules in config["rule_files"]:  # relative to the config file
        assert str(folder / rules) in mounts, f"rule file {rules} is not mounted"


def scrape_targets() -> dict[str, str]:
    """app label -> host:port of the Compose Prometheus' static targets."""
    (job,) = prometheus_config()[1]["scrape_configs"]
    assert job.get("metrics_path", METRICS_PATH) == METRICS_PATH
    return {group["labels"]["app"]: target for group in job["static_configs"] for target in group["targets"]}


@pytest.mark.parametrize("service", SERVICES)
def test_prometheus_scrapes_each_service_on_its_metrics_port(service, monkeypatch):
    port = engine_settings(service, monkeypatch).metrics_port
    assert port > 0, f"{service}: DATAENGINE_METRICS_PORT 0 serves no /metrics"
    assert scrape_targets()[service] == f"{service}:{port}"
    assert f"{port}:{port}" not in compose()["services"][service]["ports"], "scraped inside the network"


def test_prometheus_scrapes_the_studio_and_flower_on_their_http_ports(monkeypatch):
    targets = scrape_targets()
    assert targets[STUDIO] == f"{STUDIO}:{engine_settings(STUDIO, monkeypatch).studio_port}"
    assert targets[FLOWER] == f"{FLOWER}:{FLOWER_PORT}"
    assert set(targets) == {*DEPLOYED, FLOWER}
