"""The Kubernetes deployment (deploy/kubernetes) and the Containerfile, checked offline.

The manifests are validated against Kubernetes' own schemas (shipped inside kubernetes-validate,
strict: an unknown field fails), and the StatefulSet's arguments are parsed by the server's own
flag parser, so that the paths, ports and timeouts the other manifests rely on are the ones the
server will actually use.
"""

from __future__ import annotations

import functools
import json
import re
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from nestkv.server.__main__ import parse_config
from nestkv.server.config import ServerConfig
from nestkv.server.service import SERVICE_NAME

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "kubernetes"
KUSTOMIZATION = "kustomization.yaml"
MANIFEST_FILES = sorted(path.name for path in DEPLOY.glob("*.yaml") if path.name != KUSTOMIZATION)
# The oldest release deploy/kubernetes/README.md promises (gRPC probes), and the newest with schemas
# in the pinned kubernetes-validate.
KUBERNETES_VERSIONS = ("1.27", "1.37")

Manifest = dict[str, Any]


@functools.cache
def documents(name: str) -> tuple[Manifest, ...]:
    return tuple(document for document in yaml.safe_load_all((DEPLOY / name).read_text()) if document)


def resource(kind: str, name: str) -> Manifest:
    (found,) = (
        document
        for file in MANIFEST_FILES
        for document in documents(file)
        if document["kind"] == kind and document["metadata"]["name"] == name
    )
    return found


def statefulset() -> Manifest:
    return resource("StatefulSet", "nestkv")


def pod_spec() -> Manifest:
    spec: Manifest = statefulset()["spec"]["template"]["spec"]
    return spec


def pod_labels() -> dict[str, str]:
    labels: dict[str, str] = statefulset()["spec"]["template"]["metadata"]["labels"]
    return labels


def server_container() -> Manifest:
    container: Manifest
    (container,) = pod_spec()["containers"]
    return container


# The namespace the tests deploy to, as `kubectl apply -n NAMESPACE` would.
NAMESPACE = "default"


def pod_env(ordinal: int) -> dict[str, str]:
    """The environment variables Kubernetes sets from pod `ordinal`'s name and namespace."""
    fields = {
        "metadata.name": f"{statefulset()['metadata']['name']}-{ordinal}",
        "metadata.namespace": NAMESPACE,
    }
    env = {}
    for variable in server_container().get("env", []):
        field = variable.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        assert field in fields, f"{variable['name']} is set from {field}, which the tests do not know"
        env[variable["name"]] = fields[field]
    return env


def node_args(ordinal: int) -> list[str]:
    """The arguments the server of pod `ordinal` runs with, as Kubernetes expands them."""
    values = pod_env(ordinal)

    def expand(match: re.Match[str]) -> str:
        assert match[1] in values, f"$({match[1]}) in the args is not set from the pod's fields"
        return values[match[1]]

    return [re.sub(r"\$\((\w+)\)", expand, arg) for arg in server_container()["args"]]


def node_config(ordinal: int) -> ServerConfig:
    """The config the server of pod `ordinal` runs with."""
    return parse_config(node_args(ordinal))


def containerfile_final_stage() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the image's last stage, continuation lines joined."""
    text = (ROOT / "Containerfile").read_text().replace("\\\n", " ")
    instructions = [
        (words[0].upper(), words[1] if len(words) > 1 else "")
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
        for words in [line.split(None, 1)]
    ]
    last_from = max(i for i, (instruction, _) in enumerate(instructions) if instruction == "FROM")
    return instructions[last_from:]


def containerfile(instruction: str) -> list[str]:
    return [arguments for name, arguments in containerfile_final_stage() if name == instruction]


def server_script() -> str:
    scripts: dict[str, str] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    (name,) = (name for name, target in scripts.items() if target.startswith("nestkv.server."))
    return name


def mount_of(path: str) -> tuple[Manifest, PurePosixPath]:
    """The volume mount holding `path`, the deepest if mounts nest, and `path` relative to it."""
    mounts = [
        mount
        for mount in server_container()["volumeMounts"]
        if PurePosixPath(path).is_relative_to(mount["mountPath"])
    ]
    assert mounts, f"no volume is mounted at {path} or above it"
    mount = max(mounts, key=lambda mount: len(PurePosixPath(mount["mountPath"]).parts))
    return mount, PurePosixPath(path).relative_to(mount["mountPath"])


def pod_volume(name: str) -> Manifest:
    volume: Manifest
    (volume,) = (volume for volume in pod_spec().get("volumes", []) if volume["name"] == name)
    return volume


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("file", MANIFEST_FILES)
def test_the_manifest_is_valid_for_kubernetes(file: str, version: str) -> None:
    assert documents(file), f"{file} holds no resource"
    for document in documents(file):
        kubernetes_validate.validate(document, version, strict=True)


def test_the_kustomization_lists_every_manifest() -> None:
    (kustomization,) = documents(KUSTOMIZATION)
    assert sorted(kustomization["resources"]) == MANIFEST_FILES


def test_the_container_args_parse_into_the_intended_config() -> None:
    config = node_config(0)
    assert config.host == "0.0.0.0"
    assert (config.port, config.health_port) == (50051, 50052)
    assert config.node_id == "nestkv-0"
    assert config.cluster == "@/etc/nestkv/cluster/members"
    assert config.cluster_name == f"{statefulset()['spec']['serviceName']}.{NAMESPACE}.svc"
    assert (config.data_dir, config.fsync) == ("/data", "everysec")
    assert config.tls_cert == "/etc/nestkv/tls/tls.crt"
    assert config.tls_key == "/etc/nestkv/tls/tls.key"
    assert config.tls_client_ca == "/etc/nestkv/tls/ca.crt"
    assert config.auth_file == "/etc/nestkv/auth/tokens.toml"
    assert (config.drain_timeout, config.shutdown_grace) == (60, 10)
    assert config.log_format == "json"
    assert (config.replicas, config.copies_needed) == (2, 2)


def test_each_pod_takes_its_own_name_as_node_id() -> None:
    assert [node_config(n).node_id for n in range(3)] == ["nestkv-0", "nestkv-1", "nestkv-2"]


def test_the_container_command_is_the_servers_console_script() -> None:
    assert server_container()["command"] == [server_script()]


def test_the_named_ports_are_the_ones_the_server_listens_on() -> None:
    config = node_config(0)
    ports = {port["name"]: port["containerPort"] for port in server_container()["ports"]}
    assert ports == {"grpc": config.port, "health": config.health_port}


def test_the_probes_ask_the_plaintext_health_port() -> None:
    config = node_config(0)
    container = server_container()
    probes = {name: container[name]["grpc"] for name in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert {probe["port"] for probe in probes.values()} == {config.health_port}
    assert probes["readinessProbe"]["service"] == SERVICE_NAME
    assert probes["livenessProbe"].get("service", "") == ""
    assert probes["startupProbe"].get("service", "") == ""


def test_the_startup_probe_waits_minutes_for_a_large_data_dir_to_load() -> None:
    probe = server_container()["startupProbe"]
    assert probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3) >= 300


def test_the_grace_period_outlasts_the_drain_and_the_in_flight_calls() -> None:
    config = node_config(0)
    grace = pod_spec().get("terminationGracePeriodSeconds", 30)
    assert grace > config.drain_timeout + config.shutdown_grace


@pytest.mark.parametrize("flag", ["cluster", "tls_cert", "tls_key", "tls_client_ca", "auth_file"])
def test_the_file_a_flag_names_is_mounted_from_its_configmap_or_secret(flag: str) -> None:
    path = getattr(node_config(0), flag).removeprefix("@")
    mount, file = mount_of(path)
    volume = pod_volume(mount["name"])
    assert mount.get("readOnly") is True
    assert "subPath" not in mount, "a subPath mount never sees the ConfigMap or Secret change"
    if "configMap" in volume:
        config_map = resource("ConfigMap", volume["configMap"]["name"])
        items = volume["configMap"].get("items") or [{"key": key, "path": key} for key in config_map["data"]]
        assert {"key": str(file), "path": str(file)} in items
        assert str(file) in config_map["data"]
    else:
        assert {"key": str(file), "path": str(file)} in volume["secret"]["items"]


def test_the_data_dir_is_the_pods_own_persistent_volume() -> None:
    mount, file = mount_of(node_config(0).data_dir)
    assert file == PurePosixPath(".")
    assert mount.get("readOnly") is not True
    (claim,) = (
        claim
        for claim in statefulset()["spec"]["volumeClaimTemplates"]
        if claim["metadata"]["name"] == mount["name"]
    )
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert mount["name"] not in {volume["name"] for volume in pod_spec().get("volumes", [])}


def test_the_pod_runs_as_the_images_user_and_can_write_its_volume() -> None:
    (user,) = containerfile("USER")
    uid, _, gid = user.partition(":")
    security = pod_spec()["securityContext"]
    assert security["runAsNonRoot"] is True
    assert str(security["runAsUser"]) == uid
    assert str(security["fsGroup"]) == (gid or uid)
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    container = server_container()["securityContext"]
    assert container["readOnlyRootFilesystem"] is True
    assert container["allowPrivilegeEscalation"] is False
    assert container["capabilities"]["drop"] == ["ALL"]


def test_the_statefulset_is_governed_by_a_headless_service_of_its_pods() -> None:
    service = resource("Service", statefulset()["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"].items() <= pod_labels().items()
    ports = [(port["name"], port["port"]) for port in service["spec"]["ports"]]
    assert ports == [("grpc", node_config(0).port)]


def test_the_client_service_reaches_the_pods_grpc_port() -> None:
    service = resource("Service", "nestkv-client")
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert service["spec"]["selector"].items() <= pod_labels().items()
    assert [(port["port"], port["targetPort"]) for port in service["spec"]["ports"]] == [(50051, "grpc")]


def test_the_members_name_every_replica_at_its_stable_address() -> None:
    config = node_config(0)
    mount, file = mount_of(config.cluster.removeprefix("@"))
    members = resource("ConfigMap", pod_volume(mount["name"])["configMap"]["name"])["data"][str(file)]
    replicas = statefulset()["spec"]["replicas"]
    headless = statefulset()["spec"]["serviceName"]
    expected = [
        f"{node_config(n).node_id}={node_config(n).node_id}.{headless}:{config.port}" for n in range(replicas)
    ]
    assert members.splitlines() == expected


def test_the_disruption_budget_covers_the_statefulsets_pods_one_at_a_time() -> None:
    budget = resource("PodDisruptionBudget", "nestkv")
    assert budget["spec"]["selector"] == statefulset()["spec"]["selector"]
    assert budget["spec"]["maxUnavailable"] == 1


def test_every_key_keeps_a_copy_up_through_the_disruptions_the_budget_allows() -> None:
    config = node_config(0)
    budget = resource("PodDisruptionBudget", "nestkv")
    assert budget["spec"]["maxUnavailable"] < config.replicas <= statefulset()["spec"]["replicas"]


def test_the_image_runs_the_servers_console_script() -> None:
    (entrypoint,) = containerfile("ENTRYPOINT")
    assert json.loads(entrypoint) == [server_script()]


def test_the_image_exposes_the_ports_the_manifests_use() -> None:
    exposed = {int(port.split("/")[0]) for line in containerfile("EXPOSE") for port in line.split()}
    assert exposed == {port["containerPort"] for port in server_container()["ports"]}
