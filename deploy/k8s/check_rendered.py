"""Split one rendered manifest into standard Kubernetes objects and custom resources.

The standard objects are written to --standard-out for kubernetes-validate, whose bundled
schemas know no custom resources. The custom resources Mailrail uses (KEDA ScaledObject and
TriggerAuthentication, Strimzi KafkaTopic) get the structural checks below instead; any other
custom kind is an error, so a misspelt apiVersion cannot slip past both. A ScaledObject's
`maxReplicaCount` must equal the partitions of its topic as the same rendering creates it
(its KafkaTopic, or the plan of its topics Job: `services/runtime/topics.py`).

    python deploy/k8s/check_rendered.py deploy/k8s/rendered/dev.yaml --standard-out std.yaml
"""

import argparse
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeGuard

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from services.runtime.topics import parser as topics_parser
from services.runtime.topics import plan

Obj = dict[str, Any]

DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
KAFKA_TOPIC_NAME = re.compile(r"^[a-zA-Z0-9._-]{1,249}$")

SCALED_OBJECT_SPEC_KEYS = {
    "scaleTargetRef",
    "envSourceContainerName",
    "pollingInterval",
    "cooldownPeriod",
    "initialCooldownPeriod",
    "idleReplicaCount",
    "minReplicaCount",
    "maxReplicaCount",
    "advanced",
    "fallback",
    "triggers",
}
TRIGGER_KEYS = {"type", "name", "metadata", "authenticationRef", "metricType", "useCachedMetrics"}
KAFKA_TOPIC_SPEC_KEYS = {"topicName", "partitions", "replicas", "config"}


def api_group(obj: Obj) -> str:
    api_version = str(obj.get("apiVersion", ""))
    return api_version.rpartition("/")[0] if "/" in api_version else ""


def is_standard(obj: Obj) -> bool:
    """Core and `*.k8s.io` API groups: what kubernetes-validate has schemas for."""
    group = api_group(obj)
    return "." not in group or group.endswith(".k8s.io")


def ref(obj: Obj) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def check_metadata(obj: Obj) -> list[str]:
    metadata = obj.get("metadata")
    if not isinstance(metadata, dict):
        return [f"{ref(obj)}: no metadata"]
    problems = []
    name = metadata.get("name")
    if not isinstance(name, str) or not DNS_SUBDOMAIN.match(name) or len(name) > 253:
        problems.append(f"{ref(obj)}: metadata.name {name!r} is not a DNS subdomain")
    if not isinstance(metadata.get("namespace"), str):
        problems.append(f"{ref(obj)}: no metadata.namespace")
    for field in ("labels", "annotations"):
        values = metadata.get(field, {})
        if not isinstance(values, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in values.items()
        ):
            problems.append(f"{ref(obj)}: metadata.{field} must map strings to strings")
    return problems


def _container_env_names(deployment: Obj, container_name: str | None, objs: list[Obj]) -> set[str]:
    """Names of the variables one container gets from `env` and from ConfigMaps in `envFrom`."""
    containers = deployment["spec"]["template"]["spec"]["containers"]
    container = next(
        (c for c in containers if container_name is None or c["name"] == container_name), None
    )
    if container is None:
        return set()
    names = {item["name"] for item in container.get("env", [])}
    config_maps = {o["metadata"]["name"]: o for o in objs if o.get("kind") == "ConfigMap"}
    for source in container.get("envFrom", []):
        config_map = config_maps.get(source.get("configMapRef", {}).get("name"))
        if config_map is not None:
            names.update(config_map.get("data", {}))
    return names


def topic_partitions(objs: list[Obj]) -> dict[str, int]:
    """Topic → partitions, as this rendering creates them: its KafkaTopics, or else what its
    topics Job would create (its arguments, the pools of its rules ConfigMap)."""
    topics = {
        str(o["spec"].get("topicName")): o["spec"].get("partitions")
        for o in objs
        if o.get("kind") == "KafkaTopic" and isinstance(o.get("spec"), dict)
    }
    jobs = [
        c
        for o in objs
        if o.get("kind") == "Job"
        for c in o["spec"]["template"]["spec"]["containers"]
        if c.get("command", [])[2:3] == ["services.runtime.topics"]
    ]
    rules = [o for o in objs if o.get("kind") == "ConfigMap" and "rules.yaml" in o.get("data", {})]
    if topics or len(jobs) != 1 or len(rules) != 1:
        return {k: v for k, v in topics.items() if _is_int(v)}
    args = topics_parser().parse_args([str(a) for a in jobs[0].get("args", [])])
    pools = [str(p["name"]) for p in yaml.safe_load(rules[0]["data"]["rules.yaml"])["pools"]]
    return {t.name: t.partitions for t in plan(pools, args.min_partitions, prefix="")}


def check_scaled_object(obj: Obj, objs: list[Obj]) -> list[str]:
    name = ref(obj)
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        return [f"{name}: no spec"]
    problems = [
        f"{name}: unknown spec.{key}" for key in sorted(set(spec) - SCALED_OBJECT_SPEC_KEYS)
    ]
    lowest, highest = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount")
    if not _is_int(lowest) or not _is_int(highest):
        problems.append(f"{name}: minReplicaCount and maxReplicaCount must be integers")
    elif not 0 <= lowest <= highest:
        problems.append(f"{name}: want 0 <= minReplicaCount ({lowest}) <= maxReplicaCount")
    target_name = spec.get("scaleTargetRef", {}).get("name")
    deployments = {
        o["metadata"]["name"]: o
        for o in objs
        if o.get("kind") == "Deployment"
        and o["metadata"].get("namespace") == obj["metadata"].get("namespace")
    }
    target = deployments.get(target_name)
    if target is None:
        problems.append(f"{name}: scaleTargetRef names no Deployment here: {target_name!r}")
    elif "replicas" in target["spec"]:
        problems.append(f"{name}: Deployment {target_name} still sets replicas; KEDA owns them")
    auths = {o["metadata"]["name"] for o in objs if o.get("kind") == "TriggerAuthentication"}
    triggers = spec.get("triggers")
    if not isinstance(triggers, list) or not triggers:
        return [*problems, f"{name}: no triggers"]
    for index, trigger in enumerate(triggers):
        where = f"{name}: triggers[{index}]"
        problems.extend(
            f"{where}: unknown key {key}" for key in sorted(set(trigger) - TRIGGER_KEYS)
        )
        metadata = trigger.get("metadata", {})
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            problems.append(f"{where}: metadata values must all be strings (quote numbers)")
            continue
        auth = trigger.get("authenticationRef", {}).get("name")
        if auth is not None and auth not in auths:
            problems.append(f"{where}: authenticationRef names no TriggerAuthentication: {auth}")
        if trigger.get("type") != "kafka":
            continue
        # As many consumers as the topic has partitions: more would idle, fewer cap the pool.
        topic = metadata.get("topic")
        partitions = topic_partitions(objs).get(str(topic))
        if partitions is None:
            problems.append(f"{where}: no KafkaTopic or topics Job here creates {topic!r}")
        elif highest != partitions:
            problems.append(
                f"{name}: maxReplicaCount {highest} is not the {partitions} partitions of {topic}"
            )
        for field in ("bootstrapServers", "consumerGroup", "topic"):
            if not (metadata.get(field) or metadata.get(f"{field}FromEnv")):
                problems.append(f"{where}: kafka trigger without {field}")
        from_env = metadata.get("bootstrapServersFromEnv")
        if from_env and target is not None:
            env = _container_env_names(target, spec.get("envSourceContainerName"), objs)
            if from_env not in env:
                problems.append(f"{where}: {target_name} has no variable {from_env}")
    return problems


def check_trigger_authentication(obj: Obj, objs: list[Obj]) -> list[str]:
    problems = []
    used = {
        trigger.get("authenticationRef", {}).get("name")
        for o in objs
        if o.get("kind") == "ScaledObject"
        for trigger in o.get("spec", {}).get("triggers", [])
    }
    if obj["metadata"].get("name") not in used:
        problems.append(f"{ref(obj)}: no ScaledObject uses it (components applied out of order?)")
    refs = obj.get("spec", {}).get("secretTargetRef")
    if not isinstance(refs, list) or not refs:
        return [*problems, f"{ref(obj)}: no spec.secretTargetRef"]
    for index, item in enumerate(refs):
        if set(item) != {"parameter", "name", "key"} or not all(
            isinstance(v, str) and v for v in item.values()
        ):
            problems.append(f"{ref(obj)}: secretTargetRef[{index}] needs parameter, name, key")
    return problems


def check_kafka_topic(obj: Obj, objs: list[Obj]) -> list[str]:
    name = ref(obj)
    problems = []
    if not obj["metadata"].get("labels", {}).get("strimzi.io/cluster"):
        problems.append(f"{name}: no strimzi.io/cluster label")
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        return [*problems, f"{name}: no spec"]
    problems.extend(f"{name}: unknown spec.{k}" for k in sorted(set(spec) - KAFKA_TOPIC_SPEC_KEYS))
    if not KAFKA_TOPIC_NAME.match(str(spec.get("topicName", ""))):
        problems.append(f"{name}: spec.topicName {spec.get('topicName')!r} is not a topic name")
    for field in ("partitions", "replicas"):
        value = spec.get(field)
        if not _is_int(value) or not 1 <= value <= 32767:
            problems.append(f"{name}: spec.{field} must be an integer from 1")
    config = spec.get("config", {})
    if not isinstance(config, dict) or not all(
        isinstance(v, str | int | float | bool) for v in config.values()
    ):
        problems.append(f"{name}: spec.config must map names to scalars")
    return problems


CUSTOM_CHECKS: dict[tuple[str, str], Callable[[Obj, list[Obj]], list[str]]] = {
    ("keda.sh", "ScaledObject"): check_scaled_object,
    ("keda.sh", "TriggerAuthentication"): check_trigger_authentication,
    ("kafka.strimzi.io", "KafkaTopic"): check_kafka_topic,
}


def check_custom(objs: list[Obj]) -> list[str]:
    """Problems of every custom resource in one rendering; [] when all is well."""
    problems = []
    topic_names: set[str] = set()
    for obj in objs:
        if is_standard(obj):
            continue
        check = CUSTOM_CHECKS.get((api_group(obj), str(obj.get("kind"))))
        if check is None:
            problems.append(f"{ref(obj)}: unknown kind {obj.get('apiVersion')}/{obj.get('kind')}")
            continue
        problems.extend(check_metadata(obj))
        problems.extend(check(obj, objs))
        if obj.get("kind") == "KafkaTopic":
            topic = str(obj.get("spec", {}).get("topicName"))
            if topic in topic_names:
                problems.append(f"{ref(obj)}: topic {topic} declared twice")
            topic_names.add(topic)
    return problems


def load(path: Path) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def dump(objs: Iterable[Obj]) -> str:
    return yaml.safe_dump_all(list(objs), sort_keys=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rendered", type=Path)
    parser.add_argument("--standard-out", type=Path, required=True)
    args = parser.parse_args(argv)

    objs = load(args.rendered)
    standard = [obj for obj in objs if is_standard(obj)]
    args.standard_out.write_text(dump(standard))
    problems = check_custom(objs)
    for problem in problems:
        print(f"ERROR {args.rendered.name}: {problem}", file=sys.stderr)
    custom = len(objs) - len(standard)
    print(f"{len(objs)} {len(standard)} {custom}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
