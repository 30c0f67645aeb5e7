"""Readers for deploy/: Kubernetes documents, the Compose file, the Dockerfile, and the check that
an environment variable name is a real ``Settings`` field."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml

from services.common.queues import SERVICES
from services.common.settings import Settings

# The annotators' HTTP studio: deployed like SERVICES (same image, `dataengine serve studio`) but
# no gRPC server, queue, model or GPU; it is a client of the orchestrator and the decoder.
STUDIO = "studio"
DEPLOYED = (*SERVICES, STUDIO)
HEALTHZ = "/healthz"
# Celery's monitoring UI: its official image next to the services, on the services' broker
FLOWER = "flower"
FLOWER_PORT = 5555
METRICS_PATH = "/metrics"  # every service's, the studio's and Flower's

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
MONITORING = DEPLOY / "monitoring"
PROMETHEUS_SCALING = DEPLOY / "k8s-prometheus-scaling"
PREFIX = "DATAENGINE_"


def settings_field(env_name: str) -> str | None:
    """The Settings field that ``env_name`` sets, or None when it sets none (a typo)."""
    if not env_name.startswith(PREFIX):
        return None
    name = env_name[len(PREFIX):].lower()
    return name if name in Settings.model_fields else None


def load_yaml_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def k8s_objects() -> list[dict]:
    """Every object in deploy/k8s, kustomization.yaml excluded."""
    return [doc for path in sorted(K8S.glob("*.yaml")) if path.name != "kustomization.yaml"
            for doc in load_yaml_docs(path)]


def k8s_by_kind(kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in k8s_objects() if o["kind"] == kind}


def kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def kustomize(path: Path) -> list[dict]:
    """``kubectl kustomize path``: the objects it renders (the caller skips without kubectl)."""
    out = subprocess.run(["kubectl", "kustomize", str(path)], capture_output=True, text=True, check=True)
    return [o for o in yaml.safe_load_all(out.stdout) if o]


def configmap_env() -> dict[str, str]:
    return dict(k8s_by_kind("ConfigMap")["dataengine-config"]["data"])


def only_container(workload: dict) -> dict:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, f"{workload['metadata']['name']}: expected one container"
    return containers[0]


_VAR = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def interpolate(value) -> str:
    """Compose interpolation with no variables set: ``${X:-default}`` -> default, ``$$`` -> ``$``."""
    return _VAR.sub(lambda m: m.group(2) or "", str(value)).replace("$$", "$")


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())  # safe_load resolves the << merge keys


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """Instructions per stage name ((INSTRUCTION, arguments) with continuations joined);
    instructions before the first FROM go under ""."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: dict[str, list[tuple[str, str]]] = {"": []}
    current = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instr, _, args = line.partition(" ")
        instr = instr.upper()
        if instr == "FROM":
            match = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", args.strip(), re.IGNORECASE)
            assert match, f"cannot parse FROM {args}"
            current = match.group(2) or f"stage{len(stages)}"
            stages[current] = [("FROM", match.group(1))]
        else:
            stages[current].append((instr, args.strip()))
    return stages


_IGNORE_PART = re.compile(r"\*\*/?|\*|\?|[^*?]+")


def _ignore_regex(pattern: str) -> re.Pattern:
    """A .dockerignore pattern (Go filepath.Match per path, ``**`` any number of directories,
    anchored at the context root) as a regex on a relative path."""
    out = []
    for part in _IGNORE_PART.findall(pattern.strip().strip("/")):
        if part.startswith("**"):
            out.append("(?:.*/)?" if part.endswith("/") else ".*")
        elif part == "*":
            out.append("[^/]*")
        elif part == "?":
            out.append("[^/]")
        else:
            out.append(re.escape(part))
    return re.compile("".join(out))


def docker_ignored(rel_path: str) -> bool:
    """Whether the repository's .dockerignore keeps ``rel_path`` (relative to the root) out of the
    build context: a pattern matching the path or a directory above it, later ``!`` lines re-including."""
    parts = rel_path.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        regex = _ignore_regex(line[1:] if negate else line)
        if any(regex.fullmatch(c) for c in candidates):
            ignored = not negate
    return ignored
