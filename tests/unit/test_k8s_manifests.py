"""The Kubernetes manifests hold their invariants in every overlay and component combination.

Each combination is rendered as `deploy/k8s/render.sh` renders it (`kubectl kustomize`,
offline), then checked: locked-down pods with probes and resources, pinned images, no secret
values, keys without a safe default always from a required Secret, drain-safe grace periods,
one Service per listener and one ServiceAccount per service, the HPA on ingest's CPU, PDBs and
replicas in production, KEDA's replica cap equal to the outbound topic's partitions, pools
consistent across rules, senders, ScaledObjects and KafkaTopics, and every standard object
valid against the Kubernetes 1.30 schemas (kubernetes-validate, strict). Also here: the image
(Dockerfile) and the topics Job's tool (`services/runtime/topics.py`).

Without kubectl the rendering tests are skipped, except under CI (`CI=true`), where they fail:
a skipped manifest test in CI would hide a broken manifest.
"""

import copy
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from itertools import combinations
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import kubernetes_validate
import pytest
import yaml
from pydantic import SecretStr
from pydantic_settings import BaseSettings

from schemas.catalogue import OUTBOUND_TEMPLATE, TOPICS, concrete_topics
from services.bounce.oneclick import UnsubscribeSettings
from services.bounce.settings import BounceSettings
from services.ingest.settings import IngestSettings
from services.router.settings import RouterSettings
from services.runtime import topics as topics_tool
from services.runtime.settings import ServiceSettings
from services.sender.settings import SenderSettings

KUBECTL = shutil.which("kubectl")

Obj = dict[str, Any]

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
K8S_VERSION = "1.30.0"
NAMESPACE = "mailrail"
SECRET_NAMES = {
    "mailrail-api-keys",
    "mailrail-dkim-keys",
    "mailrail-kafka-auth",
    "mailrail-verp-key",
    "mailrail-api-key-pepper",
    "mailrail-unsubscribe-key",
}
#: The settings classes each service reads (see services/<app>/__main__.py).
SETTINGS_OF: dict[str, tuple[type[BaseSettings], ...]] = {
    "ingest": (IngestSettings, UnsubscribeSettings),
    "router": (RouterSettings,),
    "sender": (SenderSettings, UnsubscribeSettings),
    "bounce": (BounceSettings, UnsubscribeSettings),
}
#: Where each service listens for traffic from outside the pod (not health or metrics).
LISTENERS = {"ingest": "http", "bounce": "smtp"}
#: After its drain a service still commits, flushes its producer and closes its clients.
SHUTDOWN_MARGIN_S = 10.0
#: Variables that hold a secret: they must come from a Secret, never a literal or a ConfigMap.
SECRET_VARIABLE = re.compile(r"(PASSWORD|SECRET|TOKEN|_KEY)$")
CUSTOM_KINDS = {
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("keda.sh/v1alpha1", "TriggerAuthentication"),
    ("kafka.strimzi.io/v1beta2", "KafkaTopic"),
}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}
CLUSTER_SCOPED_KINDS = {"Namespace"}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def require_kubectl() -> str:
    """kubectl's path; skips the test without it, or fails it under CI."""
    if KUBECTL is None:
        if in_ci():
            pytest.fail(
                "kubectl is not installed: under CI (CI=true) the manifests must be rendered",
                pytrace=False,
            )
        pytest.skip("kubectl is not installed")
    return KUBECTL


# --- which renderings exist -------------------------------------------------------------


def _subdirs(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if (p / "kustomization.yaml").is_file())


def requires(component: str) -> set[str]:
    """Components this one needs, from its `# requires: a, b` line."""
    text = (K8S / "components" / component / "kustomization.yaml").read_text()
    needed: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# requires:"):
            needed.update(n for n in re.split(r"[\s,]+", line.split(":", 1)[1]) if n)
    return needed


def ordered(components: tuple[str, ...]) -> tuple[str, ...] | None:
    """The set with each component after those it requires; None if a requirement is missing."""
    todo, done = list(components), list[str]()
    while todo:
        ready = [c for c in todo if requires(c) <= set(done)]
        if not ready:
            return None
        done.extend(ready)
        todo = [c for c in todo if c not in ready]
    return tuple(done)


def all_renderings() -> list[tuple[str, tuple[str, ...]]]:
    result = []
    components = _subdirs(K8S / "components")
    for overlay in _subdirs(K8S / "overlays"):
        for size in range(len(components) + 1):
            for subset in combinations(components, size):
                chosen = ordered(subset)
                if chosen is not None:
                    result.append((overlay, chosen))
    return result


RENDERINGS = {"+".join((overlay, *parts)): (overlay, parts) for overlay, parts in all_renderings()}
PRODUCTION = [name for name in RENDERINGS if name.split("+")[0] == "production"]
WITH_KEDA = [name for name in RENDERINGS if "keda" in name.split("+")]
WITH_STRIMZI = [name for name in RENDERINGS if "strimzi-topics" in name.split("+")]


class Renderer:
    """Renders a combination once per test session, as render.sh does."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.cache: dict[str, list[Obj]] = {}

    def __call__(self, name: str) -> list[Obj]:
        if name not in self.cache:
            overlay, components = RENDERINGS[name]
            kdir = self.workdir / name
            kdir.mkdir()
            kustomization: Obj = {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(K8S / "overlays" / overlay, kdir)],
                "components": [os.path.relpath(K8S / "components" / c, kdir) for c in components],
            }
            (kdir / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
            self.cache[name] = kustomize(kdir)
        return self.cache[name]


def kustomize(kdir: Path) -> list[Obj]:
    result = subprocess.run(
        [require_kubectl(), "kustomize", str(kdir)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, f"kubectl kustomize {kdir}:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="session")
def render(tmp_path_factory: pytest.TempPathFactory) -> Renderer:
    require_kubectl()
    return Renderer(tmp_path_factory.mktemp("k8s"))


# --- helpers -----------------------------------------------------------------------------


def of_kind(objs: list[Obj], kind: str) -> list[Obj]:
    return [obj for obj in objs if obj["kind"] == kind]


def name_of(obj: Obj) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def pod_spec(obj: Obj) -> Obj:
    spec: Obj = obj["spec"]["template"]["spec"]
    return spec


def pod_labels(obj: Obj) -> dict[str, str]:
    labels: dict[str, str] = obj["spec"]["template"]["metadata"].get("labels", {})
    return labels


def all_containers(obj: Obj) -> Iterator[Obj]:
    spec = pod_spec(obj)
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def selects(selector: Obj, labels: dict[str, str]) -> bool:
    """Whether a matchLabels selector (the only kind these manifests use) picks `labels`."""
    assert set(selector) <= {"matchLabels"}, selector
    match: dict[str, str] = selector.get("matchLabels", {})
    return bool(match) and all(labels.get(k) == v for k, v in match.items())


def is_standard(obj: Obj) -> bool:
    group = obj["apiVersion"].rpartition("/")[0]
    return "." not in group or group.endswith(".k8s.io")


def app_of(obj: Obj) -> str:
    return str(obj["metadata"]["labels"]["app"])


def env_sources(objs: list[Obj], container: Obj) -> dict[str, Obj]:
    """Variable → where it comes from: `{"value": ...}`, `{"valueFrom": ...}` or, for a key of
    a ConfigMap in envFrom, `{"configMap": name, "value": ...}` (`env` wins over envFrom)."""
    config_maps = {c["metadata"]["name"]: c for c in of_kind(objs, "ConfigMap")}
    found: dict[str, Obj] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            name = source["configMapRef"]["name"]
            for key, value in config_maps[name].get("data", {}).items():
                found[key] = {"configMap": name, "value": value}
    for entry in container.get("env", []):
        found[entry["name"]] = {k: v for k, v in entry.items() if k != "name"}
    return found


def topic_partitions(objs: list[Obj]) -> dict[str, int]:
    """Topic → partitions as this rendering creates them: its KafkaTopics, or else what its
    topics Job creates (the tool's own plan for the Job's arguments and rules ConfigMap)."""
    kafka_topics = of_kind(objs, "KafkaTopic")
    if kafka_topics:
        return {t["spec"]["topicName"]: t["spec"]["partitions"] for t in kafka_topics}
    (job,) = of_kind(objs, "Job")
    args = topics_tool.parser().parse_args(pod_spec(job)["containers"][0]["args"])
    (rules_map,) = [c for c in of_kind(objs, "ConfigMap") if "rules.yaml" in c.get("data", {})]
    pools = [p["name"] for p in yaml.safe_load(rules_map["data"]["rules.yaml"])["pools"]]
    return {t.name: t.partitions for t in topics_tool.plan(pools, args.min_partitions, "")}


def drain_s(objs: list[Obj], deployment: Obj) -> float:
    """The drain timeout the service runs with: MAILRAIL_DRAIN_TIMEOUT_S if the manifests set
    it, else the default of its settings class."""
    container = pod_spec(deployment)["containers"][0]
    source = env_sources(objs, container).get("MAILRAIL_DRAIN_TIMEOUT_S")
    if source is not None:
        return float(source["value"])
    (settings, *_) = SETTINGS_OF[app_of(deployment)]
    return float(settings.model_fields["drain_timeout_s"].default)


def pre_stop_s(deployment: Obj) -> float:
    """How long the preStop hook (`sleep N`) holds the container before SIGTERM."""
    hook = pod_spec(deployment)["containers"][0].get("lifecycle", {}).get("preStop", {})
    command = hook.get("exec", {}).get("command", [])
    return float(command[1]) if command[:1] == ["sleep"] else 0.0


# --- checks: each returns the problems found, [] when all is well --------------------------


def workload_problems(obj: Obj) -> list[str]:
    """Pod-level and container-level hardening, resources and image pinning."""
    problems = []
    where = name_of(obj)
    spec = pod_spec(obj)
    pod_security = spec.get("securityContext", {})
    if spec.get("automountServiceAccountToken") is not False:
        problems.append(f"{where}: automountServiceAccountToken is not false")
    if pod_security.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        problems.append(f"{where}: seccompProfile is not RuntimeDefault")
    tmp_volumes = {v["name"] for v in spec.get("volumes", []) if "emptyDir" in v}
    for container in all_containers(obj):
        at = f"{where} container {container['name']}"
        security = container.get("securityContext", {})
        run_as_non_root = security.get("runAsNonRoot", pod_security.get("runAsNonRoot"))
        run_as_user = security.get("runAsUser", pod_security.get("runAsUser"))
        if run_as_non_root is not True or run_as_user == 0:
            problems.append(f"{at}: may run as root")
        if security.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{at}: root filesystem is writable")
        if security.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{at}: allowPrivilegeEscalation is not false")
        if "ALL" not in security.get("capabilities", {}).get("drop", []):
            problems.append(f"{at}: capabilities are not all dropped")
        if security.get("capabilities", {}).get("add"):
            problems.append(f"{at}: adds capabilities")
        resources = container.get("resources", {})
        for bound in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                if resource not in resources.get(bound, {}):
                    problems.append(f"{at}: no {resource} {bound}")
        image = str(container.get("image", ""))
        tag = image.rpartition(":")[2] if ":" in image.rpartition("/")[2] else ""
        if "@sha256:" not in image and tag in ("", "latest"):
            problems.append(f"{at}: image {image!r} is not pinned to a tag")
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        if mounts.get("/tmp") not in tmp_volumes:
            problems.append(f"{at}: /tmp is not an emptyDir")
    return problems


def probe_problems(deployment: Obj) -> list[str]:
    """Liveness on /healthz and readiness on /readyz, on a port the container declares."""
    problems = []
    for container in deployment["spec"]["template"]["spec"]["containers"]:
        at = f"{name_of(deployment)} container {container['name']}"
        ports = {p.get("name") for p in container.get("ports", [])} | {
            p["containerPort"] for p in container.get("ports", [])
        }
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            http = container.get(probe, {}).get("httpGet")
            if http is None:
                problems.append(f"{at}: no {probe}")
            elif http.get("path") != path or http.get("port") not in ports:
                problems.append(f"{at}: {probe} is not GET {path} on a declared port")
    return problems


def secret_problems(objs: list[Obj]) -> list[str]:
    """No secret values in git: Secrets are referenced by the known names only."""
    problems = [
        f"{name_of(obj)}: carries secret values"
        for obj in of_kind(objs, "Secret")
        if obj.get("data") or obj.get("stringData")
    ]
    for config_map in of_kind(objs, "ConfigMap"):
        problems.extend(
            f"{name_of(config_map)}: holds {key}"
            for key in config_map.get("data", {})
            if SECRET_VARIABLE.search(key)
        )
    for obj in objs:
        if obj["kind"] not in WORKLOAD_KINDS:
            continue
        for container in all_containers(obj):
            problems.extend(
                f"{name_of(obj)}: {e['name']} is a literal"
                for e in container.get("env", [])
                if SECRET_VARIABLE.search(e["name"]) and "valueFrom" not in e
            )
        spec = pod_spec(obj)
        names = {v["secret"]["secretName"] for v in spec.get("volumes", []) if "secret" in v}
        for container in all_containers(obj):
            names |= {
                s["secretRef"]["name"] for s in container.get("envFrom", []) if "secretRef" in s
            }
            names |= {
                e["valueFrom"]["secretKeyRef"]["name"]
                for e in container.get("env", [])
                if "secretKeyRef" in e.get("valueFrom", {})
            }
        problems.extend(f"{name_of(obj)}: unknown Secret {n}" for n in sorted(names - SECRET_NAMES))
    return problems


def pdb_problems(objs: list[Obj]) -> list[str]:
    """Every Deployment has exactly one PodDisruptionBudget, and it lets a node drain."""
    problems = []
    pdbs = of_kind(objs, "PodDisruptionBudget")
    for deployment in of_kind(objs, "Deployment"):
        matching = [p for p in pdbs if selects(p["spec"]["selector"], pod_labels(deployment))]
        if len(matching) != 1:
            problems.append(f"{name_of(deployment)}: {len(matching)} PodDisruptionBudgets")
        elif matching[0]["spec"].get("maxUnavailable", 0) in (0, "0%"):
            problems.append(f"{name_of(matching[0])}: blocks every voluntary disruption")
    return problems


def autoscaled(objs: list[Obj]) -> dict[str, tuple[int, int]]:
    """Deployment name → (min, max) replicas of the HPA or ScaledObject that scales it."""
    scaled = {
        h["spec"]["scaleTargetRef"]["name"]: (
            h["spec"].get("minReplicas", 1),
            h["spec"]["maxReplicas"],
        )
        for h in of_kind(objs, "HorizontalPodAutoscaler")
    }
    for so in of_kind(objs, "ScaledObject"):
        spec = so["spec"]
        scaled[spec["scaleTargetRef"]["name"]] = (
            spec.get("minReplicaCount", 0),
            spec["maxReplicaCount"],
        )
    return scaled


def production_problems(objs: list[Obj]) -> list[str]:
    """Two replicas at least (or an autoscaler that can reach two), spread over nodes."""
    problems = []
    scaled = autoscaled(objs)
    for deployment in of_kind(objs, "Deployment"):
        name = deployment["metadata"]["name"]
        if name in scaled:
            if "replicas" in deployment["spec"]:
                problems.append(f"{name_of(deployment)}: sets replicas and is autoscaled")
            if scaled[name][1] < 2:
                problems.append(f"{name_of(deployment)}: autoscaled to at most one replica")
        elif deployment["spec"].get("replicas", 1) < 2:
            problems.append(f"{name_of(deployment)}: fewer than two replicas")
        anti = pod_spec(deployment).get("affinity", {}).get("podAntiAffinity", {})
        terms = [
            t["podAffinityTerm"]
            for t in anti.get("preferredDuringSchedulingIgnoredDuringExecution", [])
        ] + anti.get("requiredDuringSchedulingIgnoredDuringExecution", [])
        if not any(selects(t["labelSelector"], pod_labels(deployment)) for t in terms):
            problems.append(f"{name_of(deployment)}: no pod anti-affinity to its own replicas")
    return problems


def senders(objs: list[Obj]) -> list[Obj]:
    return [
        d for d in of_kind(objs, "Deployment") if d["metadata"]["labels"].get("app") == "sender"
    ]


def keda_problems(objs: list[Obj]) -> list[str]:
    """One ScaledObject per sender, on its pool's outbound topic, as many replicas at most as
    that topic has partitions in this rendering (not more: idle; not fewer: a capped pool)."""
    problems = []
    partitions = topic_partitions(objs)
    by_target: dict[str, list[Obj]] = {}
    for so in of_kind(objs, "ScaledObject"):
        by_target.setdefault(so["spec"]["scaleTargetRef"]["name"], []).append(so)
        topic = so["spec"]["triggers"][0]["metadata"].get("topic")
        if so["spec"]["maxReplicaCount"] != partitions.get(topic):
            problems.append(
                f"{name_of(so)}: maxReplicaCount {so['spec']['maxReplicaCount']} is not the"
                f" {partitions.get(topic)} partitions of {topic}"
            )
        if so["spec"].get("minReplicaCount", 0) < 1:
            problems.append(f"{name_of(so)}: may scale a pool's senders to zero")
    for sender in senders(objs):
        pool = pod_labels(sender)["pool"]
        found = by_target.pop(sender["metadata"]["name"], [])
        if len(found) != 1:
            problems.append(f"{name_of(sender)}: {len(found)} ScaledObjects")
            continue
        trigger = found[0]["spec"]["triggers"][0]
        if (
            trigger["type"] != "kafka"
            or trigger["metadata"].get("topic") != f"mail.outbound.{pool}"
        ):
            problems.append(f"{name_of(found[0])}: not on topic mail.outbound.{pool}")
        if trigger["metadata"].get("consumerGroup") != f"mailrail-sender-{pool}":
            problems.append(f"{name_of(found[0])}: not on group mailrail-sender-{pool}")
        if "replicas" in sender["spec"]:
            problems.append(f"{name_of(sender)}: sets replicas that KEDA owns")
    problems.extend(f"ScaledObject for {target}: no such sender" for target in by_target)
    return problems


def validation_problems(objs: list[Obj]) -> list[str]:
    """kubernetes-validate (strict) on every standard object; custom kinds are known ones."""
    problems = []
    for obj in objs:
        if not is_standard(obj):
            if (obj["apiVersion"], obj["kind"]) not in CUSTOM_KINDS:
                problems.append(f"{name_of(obj)}: unknown kind {obj['apiVersion']}")
            continue
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            problems.append(f"{name_of(obj)}: {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            problems.append(f"{name_of(obj)}: {exc.message}")
    return problems


def rules_pools() -> list[str]:
    rules = yaml.safe_load((K8S / "base" / "rules.yaml").read_text())
    return [str(pool["name"]) for pool in rules["pools"]]


# --- tests -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", RENDERINGS)
def test_every_object_is_valid_kubernetes(render: Renderer, name: str) -> None:
    assert validation_problems(render(name)) == []


@pytest.mark.parametrize("name", RENDERINGS)
def test_workloads_are_locked_down_with_resources_and_pinned_images(
    render: Renderer, name: str
) -> None:
    workloads = [obj for obj in render(name) if obj["kind"] in WORKLOAD_KINDS]
    assert workloads
    assert [p for obj in workloads for p in workload_problems(obj)] == []


@pytest.mark.parametrize("name", RENDERINGS)
def test_every_deployment_probes_its_health_endpoints(render: Renderer, name: str) -> None:
    deployments = of_kind(render(name), "Deployment")
    assert {d["metadata"]["labels"]["app"] for d in deployments} == {
        "ingest",
        "router",
        "sender",
        "bounce",
    }
    assert [p for d in deployments for p in probe_problems(d)] == []


@pytest.mark.parametrize("name", RENDERINGS)
def test_no_secret_values_and_only_known_secrets(render: Renderer, name: str) -> None:
    assert secret_problems(render(name)) == []


def default_keys(app: str) -> dict[str, str]:
    """MAILRAIL_* variable → field, for every secret a service would take from a built-in
    default when unset (a published value: anyone could forge with it)."""
    return {
        f"{settings.model_config.get('env_prefix', '')}{field}".upper(): field
        for settings in SETTINGS_OF[app]
        for field, info in settings.model_fields.items()
        if isinstance(info.default, SecretStr)
    }


def test_the_keys_with_built_in_defaults_are_known() -> None:
    assert default_keys("sender") == {
        "MAILRAIL_VERP_KEY": "verp_key",
        "MAILRAIL_UNSUBSCRIBE_KEY": "unsubscribe_key",
    }
    assert set(default_keys("bounce")) == {"MAILRAIL_VERP_KEY", "MAILRAIL_UNSUBSCRIBE_KEY"}
    assert set(default_keys("ingest")) == {"MAILRAIL_UNSUBSCRIBE_KEY"}


@pytest.mark.parametrize("name", RENDERINGS)
def test_keys_with_a_built_in_default_always_come_from_a_required_secret(
    render: Renderer, name: str
) -> None:
    """VERP and unsubscribe keys: never the default, so the Secret reference is not optional
    (a pod without the Secret does not start, rather than run with a published key)."""
    objs = render(name)
    expected = {
        "MAILRAIL_VERP_KEY": ("mailrail-verp-key", "verp-key"),
        "MAILRAIL_UNSUBSCRIBE_KEY": ("mailrail-unsubscribe-key", "unsubscribe-key"),
    }
    for deployment in of_kind(objs, "Deployment"):
        env = env_sources(objs, pod_spec(deployment)["containers"][0])
        for variable in default_keys(app_of(deployment)):
            where = f"{name_of(deployment)} {variable}"
            assert variable in expected, f"{where}: a new key; give it a required Secret"
            ref = env.get(variable, {}).get("valueFrom", {}).get("secretKeyRef")
            assert ref is not None, f"{where}: not from a Secret"
            assert (ref["name"], ref["key"]) == expected[variable], where
            assert not ref.get("optional"), f"{where}: optional"


@pytest.mark.parametrize("name", RENDERINGS)
def test_public_url_is_a_configmap_value_every_sender_reads(render: Renderer, name: str) -> None:
    """The senders make the List-Unsubscribe links from it (ingest serves them, bounce reads
    tokens back; neither needs the URL)."""
    objs = render(name)
    for deployment in senders(objs):
        source = env_sources(objs, pod_spec(deployment)["containers"][0])["MAILRAIL_PUBLIC_URL"]
        assert source.get("configMap", "").startswith("mailrail-env"), name_of(deployment)
        assert re.fullmatch(r"https://[a-z0-9.-]+(:\d+)?(/\S*)?", source["value"]), source


@pytest.mark.parametrize("name", RENDERINGS)
def test_deployments_outlast_their_drain(render: Renderer, name: str) -> None:
    """The grace period covers the preStop pause plus the drain the service runs with (its
    settings' `drain_timeout_s`, or MAILRAIL_DRAIN_TIMEOUT_S where the manifests set it),
    with SHUTDOWN_MARGIN_S left for the final commit and close."""
    objs = render(name)
    assert senders(objs)
    for deployment in of_kind(objs, "Deployment"):
        grace = pod_spec(deployment)["terminationGracePeriodSeconds"]
        needed = pre_stop_s(deployment) + drain_s(objs, deployment) + SHUTDOWN_MARGIN_S
        assert grace >= needed, f"{name_of(deployment)}: {grace} s < {needed} s"


def test_sender_drain_is_read_from_the_settings(render: Renderer) -> None:
    objs = copy.deepcopy(render("production"))
    sender = senders(objs)[0]
    assert drain_s(objs, sender) == SenderSettings.model_fields["drain_timeout_s"].default
    pod_spec(sender)["containers"][0]["env"].append(
        {"name": "MAILRAIL_DRAIN_TIMEOUT_S", "value": "600"}
    )
    assert drain_s(objs, sender) == 600


@pytest.mark.parametrize("name", RENDERINGS)
def test_one_sender_per_pool_of_the_rules_file(render: Renderer, name: str) -> None:
    pools = sorted(pod_labels(s)["pool"] for s in senders(render(name)))
    assert pools == sorted(rules_pools())
    for sender in senders(render(name)):
        env = {e["name"]: e for e in pod_spec(sender)["containers"][0]["env"]}
        assert (
            env["MAILRAIL_POOL"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['pool']"
        )


@pytest.mark.parametrize("name", RENDERINGS)
def test_commands_name_real_modules_and_mounts_match_settings(render: Renderer, name: str) -> None:
    objs = render(name)
    config_maps = {c["metadata"]["name"]: c for c in of_kind(objs, "ConfigMap")}
    for obj in (o for o in objs if o["kind"] in WORKLOAD_KINDS):
        for container in all_containers(obj):
            command = container["command"]
            assert command[:2] == ["python", "-m"], name_of(obj)
            module = REPO.joinpath(*command[2].split("."))
            assert module.is_dir() or module.with_suffix(".py").is_file(), command
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    env |= config_maps[source["configMapRef"]["name"]]["data"]
            mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
            for variable in ("MAILRAIL_RULES", "MAILRAIL_DKIM_KEYS", "MAILRAIL_API_KEYS_FILE"):
                if env.get(variable):
                    path = Path(env[variable])
                    assert str(path) in mounts or str(path.parent) in mounts, (
                        name_of(obj),
                        variable,
                    )
            assert env.get("MAILRAIL_KAFKA_BOOTSTRAP"), name_of(obj)


@pytest.mark.parametrize("name", RENDERINGS)
def test_everything_lives_in_one_namespace(render: Renderer, name: str) -> None:
    namespaces = {
        obj["metadata"].get("namespace")
        for obj in render(name)
        if obj["kind"] not in CLUSTER_SCOPED_KINDS
    }
    assert namespaces == {NAMESPACE}


@pytest.mark.parametrize("name", RENDERINGS)
def test_network_policies_deny_by_default_and_open_the_listeners(
    render: Renderer, name: str
) -> None:
    policies = {p["metadata"]["name"]: p["spec"] for p in of_kind(render(name), "NetworkPolicy")}
    deny = policies["default-deny"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny and "egress" not in deny

    def ports(app: str, direction: str) -> set[int]:
        return {
            port["port"]
            for spec in policies.values()
            if spec["podSelector"].get("matchLabels", {}).get("app") == app
            for rule in spec.get(direction, [])
            for port in rule.get("ports", [])
        }

    assert 8080 in ports("ingest", "ingress")
    assert 2525 in ports("bounce", "ingress")
    assert {25, 587} <= ports("sender", "egress")


@pytest.mark.parametrize("name", PRODUCTION)
def test_production_has_pdbs_replicas_and_anti_affinity(render: Renderer, name: str) -> None:
    objs = render(name)
    assert pdb_problems(objs) == []
    assert production_problems(objs) == []
    assert of_kind(objs, "HorizontalPodAutoscaler")


@pytest.mark.parametrize("name", [n for n in RENDERINGS if n.split("+")[0] == "dev"])
def test_dev_runs_one_replica_of_everything(render: Renderer, name: str) -> None:
    objs = render(name)
    assert of_kind(objs, "HorizontalPodAutoscaler") == []
    scaled = autoscaled(objs)
    for deployment in of_kind(objs, "Deployment"):
        if deployment["metadata"]["name"] not in scaled:
            assert deployment["spec"].get("replicas", 1) == 1, name_of(deployment)
        for container in pod_spec(deployment)["containers"]:
            assert container["resources"]["limits"]["memory"] == "256Mi", name_of(deployment)


@pytest.mark.parametrize("name", WITH_KEDA)
def test_keda_scales_each_sender_up_to_its_partitions(render: Renderer, name: str) -> None:
    assert keda_problems(render(name)) == []


@pytest.mark.parametrize("overlay", _subdirs(K8S / "overlays"))
def test_keda_cap_equals_the_outbound_partitions_in_every_variant(
    render: Renderer, overlay: str
) -> None:
    """Whatever creates the topics (the overlay's Job, or Strimzi), mail.outbound.<pool> has
    exactly as many partitions as KEDA may run senders of the pool."""
    caps = {
        so["spec"]["triggers"][0]["metadata"]["topic"]: so["spec"]["maxReplicaCount"]
        for so in of_kind(render(f"{overlay}+keda"), "ScaledObject")
    }
    assert sorted(caps) == sorted(f"mail.outbound.{pool}" for pool in rules_pools())
    for name in (overlay, f"{overlay}+strimzi-topics", f"{overlay}+keda+strimzi-topics"):
        partitions = topic_partitions(render(name))
        assert {t: partitions[t] for t in caps} == caps, name


def test_production_topics_have_more_partitions_but_none_above_the_outbound(
    render: Renderer,
) -> None:
    dev, production = topic_partitions(render("dev")), topic_partitions(render("production"))
    assert sorted(dev) == sorted(production)
    assert all(production[t] >= dev[t] for t in dev)
    assert sum(production.values()) > sum(dev.values())
    outbound = {production[f"mail.outbound.{pool}"] for pool in rules_pools()}
    assert len(outbound) == 1 and max(production.values()) == outbound.pop()
    # mail.submit has a consumer in every ingest replica: one partition each at the HPA's max.
    (hpa,) = of_kind(render("production"), "HorizontalPodAutoscaler")
    assert production["mail.submit"] >= hpa["spec"]["maxReplicas"]


@pytest.mark.parametrize("name", WITH_STRIMZI)
def test_strimzi_topics_replace_the_job_and_match_the_production_job(
    render: Renderer, name: str
) -> None:
    """Every topic of the catalogue, sized as the production topics Job sizes it (the
    component is overlay-independent, like its 3 replicas)."""
    objs = render(name)
    assert of_kind(objs, "Job") == []
    topics = {t["spec"]["topicName"]: t["spec"] for t in of_kind(objs, "KafkaTopic")}
    production_job = topic_partitions(render("production"))
    assert {t: s["partitions"] for t, s in topics.items()} == production_job
    for topic, spec in concrete_topics(rules_pools(), ""):
        config = {k: str(v) for k, v in topics[topic]["config"].items()}
        assert {k: config[k] for k in spec.kafka_config()} == spec.kafka_config(), topic
        assert topics[topic]["replicas"] == 3 and config["min.insync.replicas"] == "2"


def test_every_rendering_without_strimzi_creates_topics_with_the_job(render: Renderer) -> None:
    for name in RENDERINGS:
        if name not in WITH_STRIMZI:
            (job,) = of_kind(render(name), "Job")
            assert pod_spec(job)["containers"][0]["command"][2] == "services.runtime.topics"


def test_generated_strimzi_topics_are_current() -> None:
    result = subprocess.run(
        [sys.executable, str(K8S / "gen_strimzi_topics.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_generated_strimzi_topics_cover_the_catalogue() -> None:
    generated = [
        t
        for path in (
            "components/strimzi-topics/topics.yaml",
            "base/sender/template/kafkatopic.yaml",
        )
        for t in yaml.safe_load_all((K8S / path).read_text())
        if t
    ]
    names = sorted(t["spec"]["topicName"] for t in generated)
    assert names == sorted(
        "mail.outbound.POOL" if spec.name == OUTBOUND_TEMPLATE else spec.name for spec in TOPICS
    )


def test_production_job_and_strimzi_generator_agree_on_sizing(render: Renderer) -> None:
    spec = importlib.util.spec_from_file_location("generator", K8S / "gen_strimzi_topics.py")
    assert spec is not None and spec.loader is not None
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    (job,) = of_kind(render("production"), "Job")
    args = topics_tool.parser().parse_args(pod_spec(job)["containers"][0]["args"])
    assert args.min_partitions == generator.PRODUCTION_MIN_PARTITIONS
    assert args.replication_factor == generator.PRODUCTION_REPLICAS


def test_render_script_is_executable_bash_in_strict_mode() -> None:
    script = K8S / "render.sh"
    assert os.access(script, os.X_OK)
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text


# --- the checks catch what they are meant to catch ----------------------------------------


@pytest.fixture(scope="module")
def production(render: Renderer) -> list[Obj]:
    return render("production")


def _deployment(objs: list[Obj], name: str) -> Obj:
    (found,) = [d for d in of_kind(objs, "Deployment") if d["metadata"]["name"] == name]
    return copy.deepcopy(found)


def test_checks_catch_a_root_unlimited_unpinned_container(production: list[Obj]) -> None:
    bad = _deployment(production, "router")
    container = pod_spec(bad)["containers"][0]
    container["image"] = "ghcr.io/mailrail/mailrail:latest"
    container["securityContext"] = {"runAsUser": 0}
    del container["resources"]["limits"]
    problems = workload_problems(bad)
    assert any("pinned" in p for p in problems)
    assert any("root" in p for p in problems)
    assert any("no cpu limits" in p for p in problems)
    assert any("capabilities" in p for p in problems)


def test_checks_catch_missing_probes_pdbs_and_secret_values(production: list[Obj]) -> None:
    bad = _deployment(production, "bounce")
    del pod_spec(bad)["containers"][0]["readinessProbe"]
    assert probe_problems(bad) == ["Deployment/bounce container bounce: no readinessProbe"]

    without_pdb = [o for o in production if name_of(o) != "PodDisruptionBudget/bounce"]
    assert pdb_problems(without_pdb) == ["Deployment/bounce: 0 PodDisruptionBudgets"]

    literal = _deployment(production, "sender-default")
    pod_spec(literal)["containers"][0]["env"].append({"name": "MAILRAIL_VERP_KEY", "value": "k"})
    assert secret_problems([literal]) == [
        "Deployment/sender-default: MAILRAIL_VERP_KEY is a literal"
    ]

    secret: Obj = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "x"}}
    assert secret_problems([{**secret, "stringData": {"k": "v"}}]) == [
        "Secret/x: carries secret values"
    ]


def test_checks_catch_keda_beyond_or_below_the_partitions(render: Renderer) -> None:
    objs = copy.deepcopy(render("production+keda"))
    so = of_kind(objs, "ScaledObject")[0]
    for cap in (17, 8):
        so["spec"]["maxReplicaCount"] = cap
        assert keda_problems(objs) == [
            f"{name_of(so)}: maxReplicaCount {cap} is not the 16 partitions of"
            f" {so['spec']['triggers'][0]['metadata']['topic']}"
        ]
    # ... and they follow the topics Job: 32 partitions would need a cap of 32.
    so["spec"]["maxReplicaCount"] = 16
    (job,) = of_kind(objs, "Job")
    pod_spec(job)["containers"][0]["args"][-1] = "32"
    assert len(keda_problems(objs)) == len(of_kind(objs, "ScaledObject"))


def test_checks_catch_schema_errors(production: list[Obj]) -> None:
    bad = _deployment(production, "ingest")
    pod_spec(bad)["containers"][0]["livenessProbe"]["httpGet"]["pathh"] = "/healthz"
    assert len(validation_problems([bad])) == 1
    bad["apiVersion"] = "apps/v2"
    assert "Couldn't find schema" in validation_problems([bad])[0]


def test_checks_catch_a_wrong_service_selector_and_port(production: list[Obj]) -> None:
    objs = copy.deepcopy(production)
    (service,) = [s for s in of_kind(objs, "Service") if s["metadata"]["name"] == "bounce"]
    service["spec"]["selector"] = {"app": "ingest"}
    service["spec"]["ports"][0]["targetPort"] = 2526
    problems = service_problems(objs)
    assert "Service/bounce: selects Deployment/ingest, not Deployment/bounce" in problems
    assert "Service/bounce: targetPort 2526 is no containerPort of Deployment/ingest" in problems


# --- scaling, Services and ServiceAccounts -------------------------------------------------


@pytest.mark.parametrize("name", RENDERINGS)
def test_hpa_scales_the_ingest_deployment_on_cpu(render: Renderer, name: str) -> None:
    objs = render(name)
    hpas = of_kind(objs, "HorizontalPodAutoscaler")
    if name.split("+")[0] == "production":
        assert len(hpas) == 1
    for hpa in hpas:
        spec = hpa["spec"]
        assert spec["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": "ingest",
        }
        assert [m["resource"]["name"] for m in spec["metrics"] if m["type"] == "Resource"] == [
            "cpu"
        ]
        assert 2 <= spec["minReplicas"] <= spec["maxReplicas"]
        (ingest,) = [d for d in of_kind(objs, "Deployment") if d["metadata"]["name"] == "ingest"]
        # Utilization is measured against the request: without one the HPA cannot scale.
        assert all("cpu" in c["resources"]["requests"] for c in pod_spec(ingest)["containers"])
        assert "replicas" not in ingest["spec"]


def service_problems(objs: list[Obj]) -> list[str]:
    """One Service per listener; it selects exactly its Deployment's pods and every port
    leads to a port the container declares."""
    problems = []
    deployments = of_kind(objs, "Deployment")
    services = of_kind(objs, "Service")
    for service in services:
        selector = service["spec"].get("selector", {})
        picked = [d for d in deployments if selects({"matchLabels": selector}, pod_labels(d))]
        owner = [d for d in deployments if d["metadata"]["name"] == service["metadata"]["name"]]
        if [name_of(d) for d in picked] != [name_of(d) for d in owner]:
            problems.append(
                f"{name_of(service)}: selects {', '.join(map(name_of, picked)) or 'nothing'},"
                f" not {', '.join(map(name_of, owner)) or 'a Deployment of its name'}"
            )
        for deployment in picked:
            ports = [p for c in pod_spec(deployment)["containers"] for p in c.get("ports", [])]
            declared = {p.get("name") for p in ports} | {p["containerPort"] for p in ports}
            for port in service["spec"]["ports"]:
                target = port.get("targetPort", port["port"])
                if target not in declared:
                    problems.append(
                        f"{name_of(service)}: targetPort {target} is no containerPort of"
                        f" {name_of(deployment)}"
                    )
    listening = {app_of(d): d for d in deployments if app_of(d) in LISTENERS}
    for app, port_name in LISTENERS.items():
        exposing = [
            s
            for s in services
            if s["metadata"]["name"] == app
            and any(p.get("targetPort") == port_name for p in s["spec"]["ports"])
        ]
        if app in listening and len(exposing) != 1:
            problems.append(f"Deployment/{app}: {len(exposing)} Services on its {port_name} port")
    return problems


@pytest.mark.parametrize("name", RENDERINGS)
def test_one_service_per_listener_on_its_deployments_pods_and_ports(
    render: Renderer, name: str
) -> None:
    objs = render(name)
    assert sorted(s["metadata"]["name"] for s in of_kind(objs, "Service")) == sorted(LISTENERS)
    assert service_problems(objs) == []


@pytest.mark.parametrize("name", RENDERINGS)
def test_every_workload_runs_as_its_own_service_account(render: Renderer, name: str) -> None:
    objs = render(name)
    accounts = {a["metadata"]["name"]: a for a in of_kind(objs, "ServiceAccount")}
    used_by: dict[str, set[str]] = {}
    for workload in (o for o in objs if o["kind"] in WORKLOAD_KINDS):
        account = pod_spec(workload).get("serviceAccountName")
        assert account == app_of(workload), name_of(workload)
        assert account in accounts, f"{name_of(workload)}: no ServiceAccount {account}"
        used_by.setdefault(account, set()).add(app_of(workload))
    # Every pool's sender is the same service: they share one account, no one else does.
    assert all(len(apps) == 1 for apps in used_by.values()), used_by
    assert sorted(accounts) == sorted(used_by)
    assert all(a.get("automountServiceAccountToken") is False for a in accounts.values())


@pytest.mark.parametrize("name", RENDERINGS)
def test_every_workload_reads_the_kafka_auth_secret(render: Renderer, name: str) -> None:
    """The MAILRAIL_KAFKA_* variables from the Secret, its ca.crt where the CA location the
    README names points (optional: a PLAINTEXT Kafka needs neither)."""
    for workload in (o for o in render(name) if o["kind"] in WORKLOAD_KINDS):
        container = pod_spec(workload)["containers"][0]
        refs = [s["secretRef"] for s in container.get("envFrom", []) if "secretRef" in s]
        assert refs == [{"name": "mailrail-kafka-auth", "optional": True}], name_of(workload)
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod_spec(workload)["volumes"]}
        assert mounts["kafka-auth"] == "/etc/mailrail/kafka"
        secret = volumes["kafka-auth"]["secret"]
        assert secret["secretName"] == "mailrail-kafka-auth" and secret["optional"] is True
        assert secret["items"] == [{"key": "ca.crt", "path": "ca.crt"}]


@pytest.mark.parametrize("name", RENDERINGS)
def test_dkim_secret_is_the_key_folder_as_it_is(render: Renderer, name: str) -> None:
    """Flat key names need no `items:` mapping; without the Secret the folder is empty and
    the sender sends unsigned, so the volume is optional."""
    objs = render(name)
    for sender in senders(objs):
        container = pod_spec(sender)["containers"][0]
        folder = env_sources(objs, container)["MAILRAIL_DKIM_KEYS"]["value"]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        (volume,) = [v for v in pod_spec(sender)["volumes"] if v["name"] == "dkim"]
        assert mounts["dkim"] == folder
        assert volume["secret"]["secretName"] == "mailrail-dkim-keys"
        assert volume["secret"]["optional"] is True and "items" not in volume["secret"]


# --- pools: one folder each ------------------------------------------------------------------


def test_every_pool_folder_is_listed_and_is_one_file() -> None:
    pools_dir = K8S / "base" / "sender" / "pools"
    listed = yaml.safe_load((pools_dir / "kustomization.yaml").read_text())["resources"]
    folders = sorted(p.name for p in pools_dir.iterdir() if p.is_dir())
    assert sorted(listed) == folders == sorted(rules_pools())
    for folder in folders:
        assert sorted(p.name for p in (pools_dir / folder).iterdir()) == ["kustomization.yaml"]
        assert len((pools_dir / folder / "kustomization.yaml").read_text().splitlines()) <= 25


def test_adding_a_pool_is_one_file_and_one_line(tmp_path: Path) -> None:
    """The README's recipe: copy a pool folder, rename the pool in it, list it, add the pool
    to the rules; the sender, its ScaledObject and its KafkaTopic all follow."""
    require_kubectl()
    k8s = tmp_path / "k8s"
    shutil.copytree(K8S, k8s, ignore=shutil.ignore_patterns("rendered"))
    pools = k8s / "base" / "sender" / "pools"
    (pools / "transactional").mkdir()
    (pools / "transactional" / "kustomization.yaml").write_text(
        (pools / "marketing" / "kustomization.yaml")
        .read_text()
        .replace("marketing", "transactional")
    )
    listing = yaml.safe_load((pools / "kustomization.yaml").read_text())
    listing["resources"].append("transactional")
    (pools / "kustomization.yaml").write_text(yaml.safe_dump(listing))
    rules = yaml.safe_load((k8s / "base" / "rules.yaml").read_text())
    rules["pools"].append({"name": "transactional", "ehlo": "tx.mta.example.com"})
    (k8s / "base" / "rules.yaml").write_text(yaml.safe_dump(rules))

    kdir = tmp_path / "mine"
    kdir.mkdir()
    (kdir / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "resources": ["../k8s/overlays/production"],
                "components": ["../k8s/components/keda", "../k8s/components/strimzi-topics"],
            }
        )
    )
    objs = kustomize(kdir)
    (sender,) = [s for s in senders(objs) if pod_labels(s)["pool"] == "transactional"]
    assert sender["metadata"]["name"] == "sender-transactional"
    assert keda_problems(objs) == []
    topics = {t["spec"]["topicName"]: t for t in of_kind(objs, "KafkaTopic")}
    assert topics["mail.outbound.transactional"]["metadata"]["name"] == (
        "mail-outbound-transactional"
    )
    assert pdb_problems(objs) == [] and production_problems(objs) == []
    assert validation_problems(objs) == []


# --- the image --------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, rest = line.partition(" ")
            result.append((instruction.upper(), rest.strip()))
    return result


def test_image_runs_as_the_manifests_non_root_user() -> None:
    users = [rest for instruction, rest in dockerfile_instructions() if instruction == "USER"]
    assert users, "the Dockerfile sets no USER: the image would run as root"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0 and (not gid or int(gid) != 0), users[-1]
    # The pods' runAsUser is the same uid (a named user could not be checked by kubelet).
    run_as = {
        doc["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
        for path in (K8S / "base").rglob("*.yaml")
        for doc in yaml.safe_load_all(path.read_text())
        if doc and doc.get("kind") in WORKLOAD_KINDS
    }
    assert run_as == {int(uid)}


def test_image_copies_the_shared_code_once_not_per_service() -> None:
    copied = [
        source.rstrip("/")
        for instruction, rest in dockerfile_instructions()
        if instruction in ("COPY", "ADD")
        for source in rest.split()[:-1]
        if not source.startswith("--")
    ]
    assert copied.count("services") == 1 and copied.count("schemas") == 1, copied
    assert not [c for c in copied if c.startswith(("services/", "schemas/"))], copied


# --- the README's TLS/SASL step names the settings the services read -------------------------


def test_k8s_readme_names_every_kafka_security_setting_in_its_secret_step() -> None:
    variables = {
        f"MAILRAIL_{field.upper()}"
        for field in ServiceSettings.model_fields
        if field.startswith("kafka_") and field != "kafka_bootstrap"
    }
    assert variables == {
        "MAILRAIL_KAFKA_SECURITY_PROTOCOL",
        "MAILRAIL_KAFKA_SASL_MECHANISM",
        "MAILRAIL_KAFKA_SASL_USERNAME",
        "MAILRAIL_KAFKA_SASL_PASSWORD",
        "MAILRAIL_KAFKA_SSL_CA_LOCATION",
    }
    readme = (K8S / "README.md").read_text()
    (command,) = re.findall(
        r"kubectl -n mailrail create secret generic mailrail-kafka-auth \\\n(?:.*\\\n)*.*", readme
    )
    assert {v for v in variables if f"--from-literal={v}=" in command} == variables
    assert "--from-literal=MAILRAIL_KAFKA_SSL_CA_LOCATION=/etc/mailrail/kafka/ca.crt" in command


# --- kubectl missing: skipped locally, failed under CI ------------------------------------------


@pytest.mark.parametrize(("ci", "outcome"), [("true", "fail"), ("1", "fail"), ("", "skip")])
def test_without_kubectl_the_tests_skip_except_under_ci(
    ci: str, outcome: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys.modules[__name__], "KUBECTL", None)
    monkeypatch.setenv("CI", ci)
    expected = pytest.fail.Exception if outcome == "fail" else pytest.skip.Exception
    with pytest.raises(expected, match="kubectl is not installed"):
        require_kubectl()


# --- the topics Job's tool -----------------------------------------------------------------------


class FakeFuture:
    def __init__(self, error: Exception | None = None) -> None:
        self.error = error

    def result(self) -> None:
        if self.error is not None:
            raise self.error


class FakeAdmin:
    """The AdminClient calls topics.py makes, against a dict of topic → partition count."""

    def __init__(self, topics: dict[str, int] | None = None) -> None:
        self.topics = dict(topics or {})
        self.created: dict[str, int] = {}
        self.grown: dict[str, int] = {}

    def list_topics(self, timeout: float) -> SimpleNamespace:
        return SimpleNamespace(
            topics={
                name: SimpleNamespace(
                    error=None,
                    partitions={i: SimpleNamespace(leader=1) for i in range(count)},
                )
                for name, count in self.topics.items()
            }
        )

    def create_topics(self, new: list[Any], request_timeout: float) -> dict[str, FakeFuture]:
        for topic in new:
            self.topics[topic.topic] = self.created[topic.topic] = topic.num_partitions
        return {topic.topic: FakeFuture() for topic in new}

    def create_partitions(self, new: list[Any], request_timeout: float) -> dict[str, FakeFuture]:
        for request in new:
            self.topics[request.topic] = self.grown[request.topic] = request.new_total_count
        return {request.topic: FakeFuture() for request in new}


def test_topics_min_partitions_raises_smaller_topics_only() -> None:
    catalogue = {name: spec.partitions for name, spec in concrete_topics(["default"], "")}
    planned = {t.name: t.partitions for t in topics_tool.plan(["default"], 16, "")}
    assert planned == {name: max(count, 16) for name, count in catalogue.items()}
    assert {t.name: t.partitions for t in topics_tool.plan(["default"], 1, "")} == catalogue
    with pytest.raises(ValueError, match="at least 1"):
        topics_tool.plan(["default"], 0, "")


def test_topics_are_created_with_the_planned_partitions() -> None:
    admin = FakeAdmin({"mail.events": 8})
    created = topics_tool.ensure_topics(admin, ["default"], 3, "", min_partitions=16)  # type: ignore[arg-type]
    assert "mail.events" not in created
    assert admin.created["mail.outbound.default"] == 16 and admin.created["mail.control"] == 16
    assert topics_tool.ensure_topics(admin, ["default"], 3, "", min_partitions=16) == []  # type: ignore[arg-type]


def test_a_smaller_existing_topic_is_reported_and_grown_only_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("default_pool: default\nbounce_domain: b.example\npools: [{name: default}]\n")
    existing = {name: spec.partitions for name, spec in concrete_topics(["default"], "")}
    admin = FakeAdmin(existing)
    monkeypatch.setattr(topics_tool, "AdminClient", lambda config: admin)

    topics_tool.main(["--rules", str(rules), "--min-partitions", "16"])
    err = capsys.readouterr().err
    assert admin.created == {} and admin.grown == {}
    assert "topics: WARNING mail.submit has 8 partitions, 16 wanted; left as it is" in err
    assert "--grow-partitions adds them, which moves keys" in err
    assert "mail.outbound.default" not in err  # already 16
    assert err.strip().endswith("with fewer partitions than wanted")
    short = sum(1 for count in existing.values() if count < 16)
    assert f", {short} with fewer partitions than wanted" in err

    topics_tool.main(["--rules", str(rules), "--min-partitions", "16", "--grow-partitions"])
    err = capsys.readouterr().err
    assert admin.grown == {name: 16 for name, count in existing.items() if count < 16}
    assert "topics: mail.submit grown from 8 to 16 partitions" in err
    assert ", 0 with fewer partitions than wanted" in err
    assert set(admin.topics.values()) == {16}


def test_topics_tool_refuses_a_partition_count_below_one() -> None:
    with pytest.raises(SystemExit):
        topics_tool.parser().parse_args(["--min-partitions", "0"])
