"""deploy/k8s: what operators depend on. Probes on the port the service listens on, resources and a
locked-down securityContext on every pod, configuration keys that really are settings, a KEDA
ScaledObject per model queue that watches the queue its deployment consumes, and the studio (HTTP
probes, addresses of the orchestrator and decoder Services, plain replicas) next to them."""

from __future__ import annotations

import shutil
import subprocess
from urllib.parse import urlparse

import pytest
import yaml

from services.common.queues import MODEL_QUEUES, SERVICES
from services.common.settings import Settings
from tests.deploy.manifests import (DEPLOYED, FLOWER, HEALTHZ, K8S, STUDIO, configmap_env, k8s_by_kind,
                                    k8s_objects, kustomization, only_container, settings_field)

GPU_SERVICES = ("embedder", "decoder")
UID = 10001  # the Dockerfile's USER


@pytest.fixture
def settings_from_configmap(monkeypatch) -> Settings:
    """Settings as a pod builds them: the configmap and the secret template in the environment."""
    secret = k8s_by_kind("Secret")["dataengine-minio"]["stringData"]
    for key, value in {**configmap_env(), **secret}.items():
        monkeypatch.setenv(key, str(value))
    return Settings()


def deployment(service: str) -> dict:
    deployments = k8s_by_kind("Deployment")
    assert service in deployments, f"no Deployment for {service}"
    return deployments[service]


def test_every_file_parses_as_kubernetes_objects():
    objects = k8s_objects()
    assert objects
    for obj in objects:
        assert {"apiVersion", "kind", "metadata"} <= obj.keys(), obj
        assert "namespace" not in obj["metadata"], "kustomization.yaml sets the namespace"


def test_kustomization_lists_every_file():
    listed = set(kustomization()["resources"])
    on_disk = {p.name for p in K8S.iterdir() if p.name != "kustomization.yaml"}
    assert listed == on_disk
    assert kustomization()["namespace"] == k8s_by_kind("Namespace").popitem()[0]


def test_kustomization_names_every_image():
    images = {entry["name"] for entry in kustomization()["images"]}
    used = {only_container(o)["image"] for o in k8s_objects() if o["kind"] in ("Deployment", "Job")}
    assert used <= images, f"images missing from kustomization.yaml: {used - images}"


@pytest.mark.parametrize("key", sorted(configmap_env()))
def test_configmap_keys_are_settings_fields(key):
    assert settings_field(key), f"{key} is not a Settings field (typo?)"


def test_configmap_values_are_valid_settings(settings_from_configmap):
    assert settings_from_configmap.store == "minio"
    assert str(settings_from_configmap.models_dir) == "/models"


@pytest.mark.parametrize("key,value", sorted(
    k8s_by_kind("Secret")["dataengine-minio"]["stringData"].items()))
def test_secret_is_a_template_of_settings(key, value):
    assert settings_field(key), f"{key} is not a Settings field"
    assert value == "REPLACE_ME", "no real credentials in the repository"


@pytest.mark.parametrize("obj", [o for o in k8s_objects() if o["kind"] in ("Deployment", "Job")],
                         ids=lambda o: o["metadata"]["name"])
def test_container_env_names_are_settings_fields(obj):
    container = only_container(obj)
    for entry in container.get("env", []):
        assert settings_field(entry["name"]), f"{entry['name']} is not a Settings field"
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef") or source.get("secretRef")
        kind = "ConfigMap" if "configMapRef" in source else "Secret"
        assert ref["name"] in k8s_by_kind(kind), f"{kind} {ref['name']} is not in deploy/k8s"


@pytest.mark.parametrize("service", SERVICES)
def test_deployment_runs_the_service_on_its_port(service, settings_from_configmap):
    dep = deployment(service)
    container = only_container(dep)
    port = settings_from_configmap.port_of(service)
    assert container["args"] == [service]  # ENTRYPOINT is `dataengine serve`
    assert settings_from_configmap.metrics_port > 0, "DATAENGINE_METRICS_PORT: /metrics for Prometheus"
    assert container["ports"] == [{"name": "grpc", "containerPort": port},
                                  {"name": "metrics", "containerPort": settings_from_configmap.metrics_port}]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": port}, f"{service} {probe}"
    svc = k8s_by_kind("Service")[service]["spec"]
    assert svc["ports"][0]["port"] == port and svc["ports"][0]["targetPort"] == "grpc"
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert svc["selector"].items() <= labels.items()


@pytest.mark.parametrize("obj", [o for o in k8s_objects() if o["kind"] in ("Deployment", "Job")],
                         ids=lambda o: o["metadata"]["name"])
def test_pods_run_non_root_read_only(obj):
    pod = obj["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == UID
    sc = only_container(obj)["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    # Read-only root: /tmp is the one writable place, an emptyDir.
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in only_container(obj)["volumeMounts"]}
    assert set(m["name"] for m in mounts.values()) <= set(volumes), "mount of an undeclared volume"
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]


@pytest.mark.parametrize("service", DEPLOYED)
def test_resources_and_gpus(service):
    container = only_container(deployment(service))
    requests, limits = container["resources"]["requests"], container["resources"]["limits"]
    assert {"cpu", "memory"} <= requests.keys() and {"cpu", "memory"} <= limits.keys()
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    if service in GPU_SERVICES:
        assert requests["nvidia.com/gpu"] == limits["nvidia.com/gpu"] == 1
        assert env["DATAENGINE_DEVICE"] == "cuda"
    else:
        assert "nvidia.com/gpu" not in limits
        assert "DATAENGINE_DEVICE" not in env


@pytest.mark.parametrize("service", GPU_SERVICES)
def test_model_services_mount_the_checkpoint_volume_read_only(service, settings_from_configmap):
    dep = deployment(service)
    pod = dep["spec"]["template"]["spec"]
    mount = {m["mountPath"]: m for m in only_container(dep)["volumeMounts"]}[
        str(settings_from_configmap.models_dir)]
    volume = {v["name"]: v for v in pod["volumes"]}[mount["name"]]
    assert mount["readOnly"] is True and volume["persistentVolumeClaim"]["readOnly"] is True
    assert volume["persistentVolumeClaim"]["claimName"] in k8s_by_kind("PersistentVolumeClaim")


def test_models_fetch_job_writes_where_the_services_read(settings_from_configmap):
    job = k8s_by_kind("Job")["models-fetch"]
    container = only_container(job)
    assert container["command"] == ["dataengine", "models", "fetch"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert not mounts[str(settings_from_configmap.models_dir)].get("readOnly", False)
    assert job["spec"]["template"]["spec"]["securityContext"]["fsGroup"] == UID


@pytest.mark.parametrize("service", DEPLOYED)
def test_termination_grace_outlasts_shutdown_grace(service, settings_from_configmap):
    grace = deployment(service)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > settings_from_configmap.shutdown_grace_s


@pytest.mark.parametrize("queue", MODEL_QUEUES)
def test_each_model_queue_scales_its_deployment(queue):
    scaled = {o["spec"]["scaleTargetRef"]["name"]: o for o in k8s_by_kind("ScaledObject").values()}
    assert queue in scaled, f"no ScaledObject for queue {queue}"
    spec = scaled[queue]["spec"]
    target = deployment(spec["scaleTargetRef"]["name"])
    assert only_container(target)["args"] == [queue], "the scaled deployment consumes the queue"
    assert "replicas" not in target["spec"], "a fixed replica count fights KEDA's HPA"
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]  # >= 1: gRPC stays served
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "redis"
    assert trigger["metadata"]["listName"] == queue
    assert int(trigger["metadata"]["listLength"]) > 0


def test_studio_deployment_serves_http_on_the_studio_port(settings_from_configmap):
    dep = deployment(STUDIO)
    container = only_container(dep)
    port = settings_from_configmap.studio_port
    assert container["args"] == [STUDIO]  # ENTRYPOINT is `dataengine serve`
    assert container["image"] == "dataengine-studio"
    assert container["ports"] == [{"name": "http", "containerPort": port}]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert "grpc" not in container[probe], f"studio {probe}: no gRPC server to probe"
        assert container[probe]["httpGet"] == {"path": HEALTHZ, "port": port}, f"studio {probe}"
    svc = k8s_by_kind("Service")[STUDIO]["spec"]
    assert svc["ports"][0]["port"] == port and svc["ports"][0]["targetPort"] == "http"
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert svc["selector"].items() <= labels.items()


def test_studio_needs_no_model_volume_gpu_or_queue(settings_from_configmap):
    dep = deployment(STUDIO)
    pod = dep["spec"]["template"]["spec"]
    mounts = {m["mountPath"] for m in only_container(dep)["volumeMounts"]}
    assert str(settings_from_configmap.models_dir) not in mounts
    assert not any("persistentVolumeClaim" in v for v in pod["volumes"])
    assert "tolerations" not in pod, "no GPU taint to tolerate"
    # Not queue-driven: no ScaledObject; the leases live in the orchestrator, so plain replicas
    # behind the Service serve any annotator.
    assert STUDIO not in {o["spec"]["scaleTargetRef"]["name"] for o in k8s_by_kind("ScaledObject").values()}
    assert dep["spec"]["replicas"] >= 1


@pytest.mark.parametrize("backend", ["orchestrator", "decoder"])
def test_studio_addresses_name_the_backend_services(backend, settings_from_configmap):
    address = getattr(settings_from_configmap, f"{backend}_address")
    host, _, port = address.rpartition(":")
    assert host.split(".")[0] == backend, f"{backend}_address {address!r} is not the {backend} Service"
    if "." in host:  # namespace-qualified: the kustomization's namespace
        assert host.split(".")[1] == kustomization()["namespace"]
    svc = k8s_by_kind("Service")[backend]["spec"]
    assert int(port) == svc["ports"][0]["port"] == settings_from_configmap.port_of(backend)


def test_review_settings_are_in_the_configmap(settings_from_configmap):
    """The orchestrator (leases, audits) and the studio (heartbeats) read one value each."""
    env = configmap_env()
    for field in ("review_lease_s", "audit_rate", "studio_port"):
        assert f"DATAENGINE_{field.upper()}" in env
        assert getattr(settings_from_configmap, field) == Settings.model_fields[field].default


def test_scaler_address_comes_from_the_broker_url():
    """kustomization.yaml splits DATAENGINE_BROKER_URL on "/" into the triggers' address (index 2)
    and databaseIndex (index 3); the URL must have that shape, namespace-qualified for KEDA."""
    url = configmap_env()["DATAENGINE_BROKER_URL"]
    parsed = urlparse(url)
    assert parsed.scheme == "redis" and not parsed.password
    parts = url.split("/")
    wanted = {"address": parts[2], "databaseIndex": parts[3]}
    assert wanted == {"address": parsed.netloc, "databaseIndex": parsed.path.strip("/")}
    assert parsed.hostname.split(".")[1] == kustomization()["namespace"]
    found = {}
    for rule in kustomization()["replacements"]:
        assert rule["source"]["fieldPath"] == "data.DATAENGINE_BROKER_URL"
        assert rule["source"]["options"]["delimiter"] == "/"
        (path,) = rule["targets"][0]["fieldPaths"]
        found[path.rsplit(".", 1)[1]] = parts[rule["source"]["options"]["index"]]
    assert found == wanted


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (built-in kustomize) not installed")
def test_kustomize_renders_with_scaler_addresses():
    out = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, check=True)
    objects = [o for o in yaml.safe_load_all(out.stdout) if o]
    parsed = urlparse(configmap_env()["DATAENGINE_BROKER_URL"])
    namespaced = [o for o in objects if o["kind"] != "Namespace"]
    assert {o["metadata"]["namespace"] for o in namespaced} == {kustomization()["namespace"]}
    images = {o["metadata"]["name"]: only_container(o)["image"] for o in objects if o["kind"] == "Deployment"}
    assert set(images) == {*DEPLOYED, FLOWER}
    assert all(":" in image for image in images.values()), images  # tagged by `images:`
    for obj in (o for o in objects if o["kind"] == "ScaledObject"):
        meta = obj["spec"]["triggers"][0]["metadata"]
        assert meta["address"] == parsed.netloc
        assert meta["databaseIndex"] == parsed.path.strip("/")
