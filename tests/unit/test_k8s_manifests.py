"""The Kubernetes manifests hold their invariants in every overlay and component combination.

Each combination is rendered as `deploy/k8s/render.sh` renders it (`kubectl kustomize`,
offline), then checked: locked-down pods with probes and resources, pinned images, no secret
values, drain-safe senders, PDBs and replicas in production, KEDA within the partition count,
pools consistent across rules, senders, ScaledObjects and KafkaTopics, and every standard
object valid against the Kubernetes 1.30 schemas (kubernetes-validate, strict).
"""

import copy
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from itertools import combinations
from pathlib import Path
from typing import Any

import pytest
import yaml

KUBECTL = shutil.which("kubectl")
if KUBECTL is None:
    pytest.skip("kubectl is not installed", allow_module_level=True)

import kubernetes_validate  # noqa: E402

Obj = dict[str, Any]

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
K8S_VERSION = "1.30.0"
OUTBOUND_PARTITIONS = 16
SENDER_DRAIN_S = 60
NAMESPACE = "mailrail"
SECRET_NAMES = {
    "mailrail-api-keys",
    "mailrail-dkim-keys",
    "mailrail-kafka-auth",
    "mailrail-verp-key",
    "mailrail-api-key-pepper",
}
#: Variables that hold a secret: they must come from a Secret, never a literal or a ConfigMap.
SECRET_VARIABLE = re.compile(r"(PASSWORD|SECRET|TOKEN|_KEY)$")
CUSTOM_KINDS = {
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("keda.sh/v1alpha1", "TriggerAuthentication"),
    ("kafka.strimzi.io/v1beta2", "KafkaTopic"),
}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}
CLUSTER_SCOPED_KINDS = {"Namespace"}


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
            assert KUBECTL is not None
            result = subprocess.run(
                [KUBECTL, "kustomize", str(kdir)], capture_output=True, text=True, check=False
            )
            assert result.returncode == 0, f"kubectl kustomize {name}:\n{result.stderr}"
            self.cache[name] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
        return self.cache[name]


@pytest.fixture(scope="session")
def render(tmp_path_factory: pytest.TempPathFactory) -> Renderer:
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
    """One ScaledObject per sender, on its pool's outbound topic, within the partition count."""
    problems = []
    by_target: dict[str, list[Obj]] = {}
    for so in of_kind(objs, "ScaledObject"):
        by_target.setdefault(so["spec"]["scaleTargetRef"]["name"], []).append(so)
        if not 1 <= so["spec"]["maxReplicaCount"] <= OUTBOUND_PARTITIONS:
            problems.append(
                f"{name_of(so)}: maxReplicaCount beyond {OUTBOUND_PARTITIONS} partitions"
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


@pytest.mark.parametrize("name", RENDERINGS)
def test_verp_key_comes_from_a_secret(render: Renderer, name: str) -> None:
    for deployment in of_kind(render(name), "Deployment"):
        if deployment["metadata"]["labels"]["app"] in ("sender", "bounce"):
            env = {e["name"]: e for e in pod_spec(deployment)["containers"][0]["env"]}
            ref = env["MAILRAIL_VERP_KEY"]["valueFrom"]["secretKeyRef"]
            assert ref["name"] == "mailrail-verp-key" and not ref.get("optional")


@pytest.mark.parametrize("name", RENDERINGS)
def test_senders_outlast_their_drain(render: Renderer, name: str) -> None:
    for sender in senders(render(name)):
        assert pod_spec(sender)["terminationGracePeriodSeconds"] > SENDER_DRAIN_S


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
def test_keda_scales_each_sender_within_its_partitions(render: Renderer, name: str) -> None:
    assert keda_problems(render(name)) == []


@pytest.mark.parametrize("name", WITH_STRIMZI)
def test_strimzi_topics_replace_the_job_and_cover_every_pool(render: Renderer, name: str) -> None:
    objs = render(name)
    assert of_kind(objs, "Job") == []
    topics = {t["spec"]["topicName"]: t["spec"] for t in of_kind(objs, "KafkaTopic")}
    for pool in rules_pools():
        assert topics[f"mail.outbound.{pool}"]["partitions"] == OUTBOUND_PARTITIONS


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


def test_generated_strimzi_topics_match_the_catalogue() -> None:
    catalogue = pytest.importorskip("schemas.catalogue")
    generated = yaml.safe_load_all(
        (K8S / "components" / "strimzi-topics" / "topics.yaml").read_text()
    )
    topics = {t["spec"]["topicName"]: t["spec"] for t in generated if t}
    expected = catalogue.concrete_topics(rules_pools())
    assert sorted(topics) == sorted(name for name, _ in expected)
    for name, spec in expected:
        config = {k: str(v) for k, v in topics[name]["config"].items()}
        assert topics[name]["partitions"] == spec.partitions, name
        assert {k: config[k] for k in spec.kafka_config()} == spec.kafka_config(), name


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


def test_checks_catch_keda_beyond_the_partitions(render: Renderer) -> None:
    objs = copy.deepcopy(render("production+keda"))
    of_kind(objs, "ScaledObject")[0]["spec"]["maxReplicaCount"] = OUTBOUND_PARTITIONS + 1
    assert any("maxReplicaCount" in p for p in keda_problems(objs))


def test_checks_catch_schema_errors(production: list[Obj]) -> None:
    bad = _deployment(production, "ingest")
    pod_spec(bad)["containers"][0]["livenessProbe"]["httpGet"]["pathh"] = "/healthz"
    assert len(validation_problems([bad])) == 1
    bad["apiVersion"] = "apps/v2"
    assert "Couldn't find schema" in validation_problems([bad])[0]
