"""deploy/monitoring and the metrics side of deploy/k8s: every metric the dashboard, the alerts and
the Prometheus-scaling overlay query is one the code exports (with labels it has), the alerts are
complete, the scrape configurations find every pod where it serves /metrics, Flower is deployed on
the workers' broker, and the overlay scales the same Deployments on the same targets."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import yaml
from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase

from services.common import metrics
from services.common.queues import MODEL_QUEUES, SERVICES, create_celery
from services.common.settings import Settings
from services.orchestrator.model import Stats
from tests.deploy.manifests import (FLOWER, FLOWER_PORT, METRICS_PATH, MONITORING, PROMETHEUS_SCALING, STUDIO,
                                    configmap_env, k8s_by_kind, kustomization, kustomize, load_yaml_docs,
                                    only_container)

needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (built-in kustomize) not installed")
EXTERNAL = {"up"}  # Prometheus' own per target
EXTERNAL_PREFIXES = ("kube_deployment_",)  # kube-state-metrics
TARGET_LABELS = {"job", "instance", "app", "namespace", "pod"}  # what the scrape configurations attach
JOB = "dataengine"
SCRAPED = (*SERVICES, STUDIO, FLOWER)
# label values the code writes (services/common/metrics.py), where a query selects by value
LABEL_VALUES = {("dataengine_tasks_total", "outcome"): {"ok", "failed", "retry", "error"},
                ("dataengine_embedding_cache_requests_total", "result"): {"hit", "miss"},
                ("dataengine_storage_faults_total", "kind"): {"full", "unavailable"},
                ("dataengine_queue_messages", "queue"): set(SERVICES),
                ("grpc_server_handling_seconds_bucket", "grpc_type"): {"unary", "server_stream", "client_stream",
                                                                       "bidi_stream"}}


# --- what the code exports -------------------------------------------------------------------------

SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "gauge": ("",), "summary": ("", "_sum", "_count", "_created")}


def exported() -> dict[str, set[str]]:
    """Series name -> its label names, for every metric the processes serve: the module's metrics,
    whatever else the default registry holds, and the orchestrator's EngineCollector."""
    series: dict[str, set[str]] = {}
    for family in REGISTRY.collect():
        for suffix in SUFFIXES.get(family.type, ("",)):
            series.setdefault(family.name + suffix, set())
    for metric in vars(metrics).values():
        if isinstance(metric, MetricWrapperBase):
            for suffix in SUFFIXES[metric._type]:
                series[metric._name + suffix] = set(metric._labelnames) | ({"le"} if suffix == "_bucket" else set())
    stats = Stats({"accepted": 1}, {"embed": 1}, {"embedder": 2}, 0, {"stage1": 1}, 60.0)
    for family in metrics.EngineCollector(lambda: stats).collect():
        series[family.name] = {label for sample in family.samples for label in sample.labels}
    return series


EXPORTED = exported()


def test_the_engine_collector_families_are_known():
    """The stub Stats reaches every family: a family that needs a field the stub lacks fails here."""
    assert {"dataengine_items", "dataengine_items_by_stage", "dataengine_queue_messages", "dataengine_review_backlog",
            "dataengine_dead_letters", "dataengine_review_backlog_oldest_seconds"} <= EXPORTED.keys()
    assert EXPORTED["dataengine_queue_messages"] == {"queue"}
    assert "grpc_server_handled_total" in EXPORTED and "dataengine_task_seconds_bucket" in EXPORTED


# --- metric names and label matchers of a PromQL expression ---------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"' r"|'(?:[^'\\]|\\.)*'")
_SELECTOR = re.compile(r"([A-Za-z_:][\w:]*)\s*\{([^{}]*)\}")
_MATCHER = re.compile(r'([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT = re.compile(r"[A-Za-z_:][\w:]*")
KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "group_right",
            "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names ``expr`` selects: identifiers outside strings, label matchers ({...}),
    ranges ([...]) and groupings (by (...)), not followed by "(" (functions, aggregations), not
    keywords and not the tail of a number (1e3, 5m)."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^{}]*\}", " ", text)
    text = re.sub(r"\[[^\[\]]*\]", " ", text)
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in _IDENT.finditer(text):
        before = text[match.start() - 1] if match.start() else " "
        if before.isdigit() or before in ".$" or text[match.end():].lstrip().startswith("("):
            continue
        if match.group().lower() not in KEYWORDS:
            names.add(match.group())
    return names


def matchers(expr: str) -> list[tuple[str, str, str, str]]:
    """(metric, label, operator, value) of every label matcher on a named selector."""
    return [(name, label, op, value) for name, body in _SELECTOR.findall(expr)
            for label, op, value in _MATCHER.findall(body)]


@pytest.mark.parametrize("expr,names", [
    ("up", {"up"}),  # a bare name
    ('up{job="dataengine"} == 0', {"up"}),  # a matcher whose value looks like a name
    ("sum by (le, step) (rate(dataengine_task_seconds_bucket[5m]))", {"dataengine_task_seconds_bucket"}),
    ("histogram_quantile(0.95, sum(rate(x_bucket[$__rate_interval])) by (le))", {"x_bucket"}),  # Grafana's range
    ("deriv(q[15m]) > 0 and q > 1e3", {"q"}),  # a keyword, a number with an exponent
    ("a / on (pod) group_left b offset 5m", {"a", "b"}),
    ('absent(dataengine_queue_messages{queue=~"a|b"})', {"dataengine_queue_messages"}),
])
def test_metric_names_are_read_from_promql(expr, names):
    assert metric_names(expr) == names


def test_matchers_are_read_from_promql():
    assert matchers('rate(t_total{outcome=~"error|failed", step!="x"}[5m]) / up{job="j"}') == [
        ("t_total", "outcome", "=~", "error|failed"), ("t_total", "step", "!=", "x"), ("up", "job", "=", "j")]


# --- the queries of the dashboard, the alerts and the overlay -------------------------------------

def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load((MONITORING / "alerts.yaml").read_text())["groups"]
            for rule in group["rules"]]


def dashboard() -> dict:
    return json.loads((MONITORING / "grafana-dashboard.json").read_text())


def dashboard_exprs() -> list[tuple[str, str]]:
    return [(f"dashboard {panel['title']} {target['refId']}", target["expr"]) for panel in dashboard()["panels"]
            for target in panel.get("targets", [])]


def overlay_docs(name: str) -> list[dict]:
    return load_yaml_docs(PROMETHEUS_SCALING / name)


def scaling_exprs() -> list[tuple[str, str]]:
    return [(f"keda {doc['metadata']['name']}", trigger["metadata"]["query"]) for doc in overlay_docs("triggers.yaml")
            for trigger in doc["spec"]["triggers"]]


QUERIES = [*((f"alert {r['alert']}", r["expr"]) for r in alert_rules()), *dashboard_exprs(), *scaling_exprs()]


def test_every_source_has_queries():
    sources = {where.split()[0] for where, _ in QUERIES}
    assert sources == {"alert", "dashboard", "keda"}


@pytest.mark.parametrize("where,expr", QUERIES, ids=[where for where, _ in QUERIES])
def test_queries_use_exported_metrics_and_labels(where, expr):
    names = metric_names(expr)
    assert names, f"{where}: no metric in {expr!r}"
    for name in names:
        assert name in EXPORTED or name in EXTERNAL or name.startswith(EXTERNAL_PREFIXES), (
            f"{where}: {name} is not a metric the code exports")
    for name, label, op, value in matchers(expr):
        if name in EXPORTED:
            assert label in EXPORTED[name] | TARGET_LABELS, f"{where}: {name} has no label {label}"
        known = LABEL_VALUES.get((name, label))
        if known is not None and op in ("=", "=~"):
            assert set(value.split("|")) <= known, f"{where}: {name}{{{label}}} is never {value!r}"
        if label == "job":
            assert value == JOB, f"{where}: the scrape configurations name the job {JOB!r}"


def test_the_dashboard_shows_what_operators_watch():
    used = {name for _, expr in dashboard_exprs() for name in metric_names(expr)}
    wanted = {"dataengine_items", "dataengine_queue_messages", "dataengine_dead_letters", "dataengine_review_backlog",
              "dataengine_review_backlog_oldest_seconds", "dataengine_tasks_total", "dataengine_task_seconds_bucket",
              "grpc_server_handling_seconds_bucket", "dataengine_http_requests_total",
              "dataengine_http_request_seconds_bucket", "dataengine_studio_active_annotators",
              "dataengine_studio_submits_total", "dataengine_embedding_cache_requests_total",
              "dataengine_model_load_seconds", "dataengine_failure_modes_total"}
    assert wanted <= used, f"no panel for {wanted - used}"


def test_the_dashboard_is_importable():
    board = dashboard()
    assert board["uid"] and board["title"] and isinstance(board["schemaVersion"], int)
    (variable,) = [v for v in board["templating"]["list"] if v["type"] == "datasource"]
    assert variable["query"] == "prometheus"
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${" + variable["name"] + "}", panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]


# --- alerts -------------------------------------------------------------------------------------

def test_the_alerts_are_all_there_and_complete():
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    assert {"QueueGrowing", "DeadLettersRising", "ServiceDown", "ReviewBacklogStale", "TaskErrors"} <= set(names)
    for rule in rules:
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), f"{rule['alert']}: a 'for' so one scrape does not page"


@pytest.mark.parametrize("alert,function", [("QueueGrowing", "deriv"), ("DeadLettersRising", "delta"),
                                            ("ServiceDown", None), ("ReviewBacklogStale", None)])
def test_alerts_watch_what_they_say(alert, function):
    expr = {rule["alert"]: rule["expr"] for rule in alert_rules()}[alert]
    wanted = {"QueueGrowing": "dataengine_queue_messages", "DeadLettersRising": "dataengine_dead_letters",
              "ServiceDown": "up", "ReviewBacklogStale": "dataengine_review_backlog_oldest_seconds"}[alert]
    assert wanted in metric_names(expr)
    if function:  # on a gauge: deriv and delta, never rate or increase (they read decreases as resets)
        assert re.search(rf"\b{function}\(", expr) and not re.search(r"\b(rate|increase)\(", expr)


def test_the_operator_rule_is_the_same_rules():
    rule = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    assert (rule["apiVersion"], rule["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load((MONITORING / "alerts.yaml").read_text())["groups"]


# --- scraping in Kubernetes ---------------------------------------------------------------------

def pod_of(name: str) -> tuple[dict, dict]:
    """(pod template metadata, only container) of deploy/k8s's Deployment ``name``."""
    dep = k8s_by_kind("Deployment")[name]
    return dep["spec"]["template"]["metadata"], only_container(dep)


def scrape_port(name: str) -> int:
    """Where ``name``'s pod serves /metrics: the studio and Flower on their HTTP ports, the services
    on DATAENGINE_METRICS_PORT (the configmap's; test_manifests checks it is a valid setting)."""
    env = configmap_env()
    return {STUDIO: int(env["DATAENGINE_STUDIO_PORT"]), FLOWER: FLOWER_PORT}.get(
        name, int(env["DATAENGINE_METRICS_PORT"]))


@pytest.mark.parametrize("name", SCRAPED)
def test_pods_are_annotated_with_the_port_that_serves_metrics(name):
    meta, container = pod_of(name)
    port = scrape_port(name)
    assert port > 0
    annotations = meta["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == METRICS_PATH
    assert int(annotations["prometheus.io/port"]) == port
    ports = {p["containerPort"]: p["name"] for p in container["ports"]}
    assert port in ports, f"{name}: no container port {port}"
    assert ports[port] == ("metrics" if name in SERVICES else "http")


def test_the_studio_serves_metrics_on_its_app():
    from fastapi import FastAPI

    from services.studio.observe import add_metrics

    app = FastAPI()
    add_metrics(app, metrics.ActiveAnnotators())
    assert METRICS_PATH in {route.path for route in app.routes}


def test_the_pod_monitor_covers_every_scraped_port():
    (monitor,) = load_yaml_docs(MONITORING / "podmonitor.yaml")
    assert monitor["kind"] == "PodMonitor"
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [kustomization()["namespace"]]
    (selector,) = monitor["spec"]["selector"]["matchExpressions"]
    assert selector["key"] == "app.kubernetes.io/name" and selector["operator"] == "In"
    assert set(selector["values"]) == set(SCRAPED)
    endpoints = {e["port"]: e for e in monitor["spec"]["podMetricsEndpoints"]}
    for name in SCRAPED:
        ports = {p["containerPort"]: p["name"] for p in pod_of(name)[1]["ports"]}
        endpoint = endpoints[ports[scrape_port(name)]]
        assert endpoint["path"] == METRICS_PATH
        assert {"targetLabel": "job", "replacement": JOB} in endpoint["relabelings"]


def test_the_kubernetes_scrape_config_keeps_annotated_pods_of_the_namespace():
    config = yaml.safe_load((MONITORING / "prometheus-k8s.yaml").read_text())
    (job,) = config["scrape_configs"]
    assert job["job_name"] == JOB
    (sd,) = job["kubernetes_sd_configs"]
    assert sd["role"] == "pod" and sd["namespaces"]["names"] == [kustomization()["namespace"]]
    relabel = {tuple(r.get("source_labels", ())): r for r in job["relabel_configs"]}
    assert relabel[("__meta_kubernetes_pod_annotation_prometheus_io_scrape",)]["action"] == "keep"
    assert relabel[("__meta_kubernetes_pod_annotation_prometheus_io_path",)]["target_label"] == "__metrics_path__"
    assert relabel[("__meta_kubernetes_pod_ip", "__meta_kubernetes_pod_annotation_prometheus_io_port")][
        "target_label"] == "__address__"
    assert relabel[("__meta_kubernetes_pod_label_app_kubernetes_io_name",)]["target_label"] == "app"
    assert (MONITORING / config["rule_files"][0]).is_file()


# --- Flower ---------------------------------------------------------------------------------------

def test_flower_reads_the_workers_broker_on_its_port():
    assert "flower.yaml" in kustomization()["resources"]
    meta, container = pod_of(FLOWER)
    assert container["image"] in {entry["name"] for entry in kustomization()["images"]}
    assert container["command"] == ["celery"]
    args = container["args"]
    assert args[args.index("flower") + 1:].count(f"--port={FLOWER_PORT}") == 1
    # Kubernetes expands $(VAR) from the environment: the configmap the workers read has it
    assert "--broker=$(DATAENGINE_BROKER_URL)" in args[:args.index("flower")]
    assert {"configMapRef": {"name": "dataengine-config"}} in container["envFrom"]
    assert "DATAENGINE_BROKER_URL" in configmap_env()
    assert container["ports"] == [{"name": "http", "containerPort": FLOWER_PORT}]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthcheck", "port": FLOWER_PORT}
    svc = k8s_by_kind("Service")[FLOWER]["spec"]
    assert svc["ports"][0]["port"] == FLOWER_PORT and svc["ports"][0]["targetPort"] == "http"
    assert svc["selector"].items() <= meta["labels"].items()


def test_workers_send_the_events_flower_shows_and_survive_being_scaled_down():
    """Flower needs task events; scaling a worker down must not lose its task (warm shutdown, then
    acks_late: a message is acknowledged only after its task ran, so a killed pod's goes back)."""
    conf = create_celery(Settings()).conf
    assert conf.worker_send_task_events and conf.task_send_sent_event
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1


# --- the Prometheus-scaling overlay ---------------------------------------------------------------

def test_the_scaling_overlay_names_existing_files_and_the_base_scaled_objects():
    overlay = yaml.safe_load((PROMETHEUS_SCALING / "kustomization.yaml").read_text())
    assert overlay["resources"][0] == "../k8s"
    named = set(overlay["resources"][1:]) | {p["path"] for p in overlay["patches"]}
    assert named == {p.name for p in PROMETHEUS_SCALING.iterdir() if p.name != "kustomization.yaml"}
    assert (PROMETHEUS_SCALING / overlay["resources"][0] / "kustomization.yaml").is_file()
    patched = {doc["metadata"]["name"] for doc in overlay_docs("triggers.yaml")}
    assert patched == set(k8s_by_kind("ScaledObject")) == set(MODEL_QUEUES)


@needs_kubectl
def test_the_scaling_overlay_scales_the_same_deployments_on_prometheus():
    rendered = kustomize(PROMETHEUS_SCALING)
    address = overlay_docs("prometheus-address.yaml")[0]["data"]["serverAddress"]
    assert not any(o["kind"] == "ConfigMap" and o["metadata"]["name"] == "dataengine-prometheus" for o in rendered), (
        "the address ConfigMap is local-config: not applied")
    base = k8s_by_kind("ScaledObject")
    scaled = {o["metadata"]["name"]: o["spec"] for o in rendered if o["kind"] == "ScaledObject"}
    assert scaled.keys() == base.keys()
    for name, spec in scaled.items():
        was = base[name]["spec"]
        for key in ("scaleTargetRef", "minReplicaCount", "maxReplicaCount"):
            assert spec[key] == was[key], f"{name}: {key}"
        (trigger,) = spec["triggers"]
        (old,) = was["triggers"]
        assert trigger["type"] == "prometheus"
        meta = trigger["metadata"]
        assert meta["serverAddress"] == address
        assert meta["threshold"] == old["metadata"]["listLength"], f"{name}: the same target per replica"
        queues = {value for metric, label, _, value in matchers(meta["query"]) if label == "queue"}
        assert queues == {old["metadata"]["listName"]} == {spec["scaleTargetRef"]["name"]}
        assert meta["ignoreNullValues"] == "false", "no data must not read as an empty queue"


# --- promtool, where installed --------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_promtool_accepts_the_rules_and_the_compose_config():
    for args in (["check", "rules", "alerts.yaml"], ["check", "config", "prometheus.yaml"]):
        result = subprocess.run(["promtool", *args], cwd=MONITORING, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
