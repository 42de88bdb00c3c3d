"""The container image, as the Containerfile builds it: three nodes started from it serve one store.

The image is built with podman and each node runs from the image's own filesystem with the
StatefulSet's command, arguments and environment (read from deploy/kubernetes, as
tests/test_deploy.py reads them), the image's user, and a read-only root with /data its own
volume, as the pod's securityContext asks. Each node has a network namespace of its own (all of
them listen on 50051, as pods do), joined by a bridge, and /etc/hosts gives the headless
Service's names. The member list is the ConfigMap's.

Facts of the machines this runs on (.ci/run installs podman and debootstrap from Debian's
packages):
- no image registry is reachable, so the base image is a stand-in built from Debian's packages
  (debootstrap, with a venv on PATH since the Containerfile calls `pip`), cached in podman's
  storage between runs under a tag that names its recipe;
- pip inside the build reaches the package index only with this machine's CA bundle, so the
  stand-in carries it and points PIP_CERT at it;
- `podman build --isolation chroot --network host` works; `podman run` does not (it cannot set
  rlimits here), so a node runs as `chroot --userspec` in the mounted filesystem of a container
  made with `podman create`, which is what `podman run` would start.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nestkv.client import GrpcStore, channel_options
from tests.pki import AuthFile, make_pki
from tests.serverproc import ServerProcess
from tests.test_deploy import (
    ROOT,
    mount_of,
    node_args,
    node_config,
    pod_env,
    pod_volume,
    resource,
    server_container,
    statefulset,
)

# What the test needs besides podman: root, for network namespaces, bind mounts and chroot.
pytestmark = [
    pytest.mark.skipif(
        shutil.which("podman") is None, reason="podman is not installed (.ci/run installs it from Debian)"
    ),
    pytest.mark.skipif(
        os.geteuid() != 0 or not (shutil.which("ip") and shutil.which("mount") and shutil.which("chroot")),
        reason="runs the nodes in network namespaces with bind mounts and chroot: needs root, ip and mount",
    ),
]

DEBIAN_MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = "python3,python3-venv,ca-certificates"
BASE_VENV = "/opt/venv"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
BASE_RECIPE = f"debootstrap --variant=minbase --include={BASE_PACKAGES} bookworm; venv {BASE_VENV}"
BASE_IMAGE = "localhost/nestkv-test-base:" + hashlib.sha256(BASE_RECIPE.encode()).hexdigest()[:12]
NODES = 3
# A subnet of its own per run, so that two runs on one machine do not meet.
RUN = os.getpid() % 50000
SUBNET = f"10.{200 + RUN // 250 % 50}.{RUN % 250}"


def run(*command: str, timeout: float = 600, stdin: bytes | None = None) -> str:
    done = subprocess.run(command, capture_output=True, input=stdin, timeout=timeout, check=False)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited {done.returncode}:\n{done.stderr.decode()[-4000:]}")
    return done.stdout.decode()


def build_base_image() -> None:
    """The stand-in for python:3.12-slim: Debian bookworm's Python with a venv on PATH."""
    if subprocess.run(["podman", "image", "exists", BASE_IMAGE], check=False).returncode == 0:
        return
    assert shutil.which("debootstrap"), "the stand-in base image needs debootstrap (.ci/run installs it)"
    with tempfile.TemporaryDirectory(prefix="nestkv-base-") as directory:
        root = Path(directory) / "root"
        run(
            "debootstrap",
            "--variant=minbase",
            f"--include={BASE_PACKAGES}",
            "bookworm",
            str(root),
            DEBIAN_MIRROR,
        )
        run("chroot", str(root), "python3", "-m", "venv", BASE_VENV)
        shutil.copyfile(CA_BUNDLE, root / CA_BUNDLE.relative_to("/"))
        archive = subprocess.run(["tar", "-C", str(root), "-c", "."], capture_output=True, check=True).stdout
        path = f"{BASE_VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        run(
            "podman", "import",
            "--change", f"ENV PATH={path}",
            "--change", f"ENV PIP_CERT={CA_BUNDLE}",
            "-", BASE_IMAGE,
            stdin=archive,
        )  # fmt: skip


def dangling_images() -> set[str]:
    listed = run("podman", "images", "--quiet", "--no-trunc", "--filter", "dangling=true")
    return set(listed.split())


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    build_base_image()
    tag = f"localhost/nestkv-test:{RUN}"
    before = dangling_images()
    try:
        run(
            "podman", "build", "--isolation", "chroot", "--network", "host",
            "--build-arg", f"BASE={BASE_IMAGE}", "-t", tag, "-f", str(ROOT / "Containerfile"), str(ROOT),
        )  # fmt: skip
        yield tag
    finally:
        # The image, and the build stage's image it leaves untagged; the stand-in base stays.
        left = dangling_images() - before
        subprocess.run(["podman", "rmi", "--force", tag, *left], capture_output=True, check=False)


@dataclass
class Node:
    """One pod: its ordinal, its address on the bridge, its server process and its volume."""

    ordinal: int
    address: str
    process: ServerProcess
    data: Path

    @property
    def name(self) -> str:
        return node_config(self.ordinal).node_id


def write_file(rootfs: Path, path: str, content: bytes, mode: int, gid: int = 0) -> None:
    target = rootfs / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(content)
    os.chown(target, 0, gid)
    target.chmod(mode)


class Pods:
    """What Kubernetes would set up for the StatefulSet's pods, torn down in reverse on close."""

    def __init__(self, image: str, directory: Path) -> None:
        self.image = image
        self.directory = directory
        self.config = json.loads(run("podman", "image", "inspect", image, "--format", "{{json .Config}}"))
        self.bridge = f"nkvbr{RUN}"
        self.undo: list[list[str]] = []
        self.processes: list[ServerProcess] = []
        self.nodes: list[Node] = []

    def step(self, command: list[str], undo: list[str]) -> str:
        done = run(*command)
        self.undo.append(undo)
        return done

    def start(self) -> None:
        self.step(["ip", "link", "add", self.bridge, "type", "bridge"], ["ip", "link", "del", self.bridge])
        run("ip", "addr", "add", f"{SUBNET}.1/24", "dev", self.bridge)
        run("ip", "link", "set", self.bridge, "up")
        (self.directory / "pki").mkdir()
        pki = make_pki(self.directory / "pki")
        headless = statefulset()["spec"]["serviceName"]
        ids = [node_config(n).node_id for n in range(NODES)]
        # As the deploy README's recipe: the names clients dial, and the one peers are known by.
        names = [*(f"{i}.{headless}" for i in ids), *(f"{i}.{node_config(0).cluster_name}" for i in ids)]
        node_cert = pki.ca.issue_with_names("nodes", [x509.DNSName(name) for name in names])
        auth = AuthFile(self.directory / "tokens.toml")
        self.token = auth.mint("tenant", ["tenant"])
        self.credentials = grpc.composite_channel_credentials(
            pki.credentials(client=pki.client), grpc.access_token_call_credentials(self.token)
        )
        hosts = "127.0.0.1 localhost\n" + "".join(
            f"{SUBNET}.{n + 2} {ids[n]}.{headless}\n" for n in range(NODES)
        )
        secrets = {
            node_config(0).tls_cert: node_cert.cert_bytes(),
            node_config(0).tls_key: node_cert.key_bytes(),
            node_config(0).tls_client_ca: pki.ca.cert_bytes(),
            node_config(0).auth_file: auth.path.read_bytes(),
        }
        members_path = node_config(0).cluster.removeprefix("@")
        mount, file = mount_of(members_path)
        config_map = resource("ConfigMap", pod_volume(mount["name"])["configMap"]["name"])
        uid, _, gid = self.config["User"].partition(":")
        for n in range(NODES):
            self.nodes.append(
                self.pod(n, hosts, secrets, members_path, config_map["data"][str(file)], uid, gid)
            )

    def pod(
        self,
        n: int,
        hosts: str,
        secrets: dict[str, bytes],
        members_path: str,
        members: str,
        uid: str,
        gid: str,
    ) -> Node:
        container = f"nestkv-test-{RUN}-{n}"
        self.step(
            ["podman", "create", "--name", container, self.image], ["podman", "rm", "--force", container]
        )
        rootfs = Path(self.step(["podman", "mount", container], ["podman", "umount", container]).strip())
        write_file(rootfs, "/etc/hosts", hosts.encode(), 0o644)
        for path, content in secrets.items():
            write_file(rootfs, path, content, 0o440, int(gid))  # a Secret: defaultMode 0440, fsGroup
        write_file(rootfs, members_path, members.encode(), 0o644)
        # readOnlyRootFilesystem, and the data directory a volume of its own, writable by fsGroup.
        self.step(["mount", "--bind", str(rootfs), str(rootfs)], ["umount", str(rootfs)])
        run("mount", "-o", "remount,bind,ro", str(rootfs))
        data = self.directory / f"data-{n}"
        data.mkdir()
        os.chown(data, 0, int(gid))
        data.chmod(0o2775)
        data_dir = node_config(n).data_dir
        self.step(
            ["mount", "--bind", str(data), str(rootfs / data_dir.lstrip("/"))],
            ["umount", str(rootfs / data_dir.lstrip("/"))],
        )

        namespace = f"nestkv-test-{RUN}-{n}"
        host_end = f"nkv{RUN}h{n}"
        self.step(["ip", "netns", "add", namespace], ["ip", "netns", "del", namespace])
        run("ip", "link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", namespace)
        run("ip", "link", "set", host_end, "master", self.bridge, "up")
        address = f"{SUBNET}.{n + 2}"
        run("ip", "-n", namespace, "addr", "add", f"{address}/24", "dev", "eth0")
        run("ip", "-n", namespace, "link", "set", "eth0", "up")
        run("ip", "-n", namespace, "link", "set", "lo", "up")

        env = [*self.config["Env"], *(f"{name}={value}" for name, value in pod_env(n).items())]
        command = [
            "ip", "netns", "exec", namespace,
            "chroot", f"--userspec={uid}:{gid}", f"--groups={gid}", str(rootfs),
            "/usr/bin/env", "-i", *env, *server_container()["command"], *node_args(n),
        ]  # fmt: skip
        self.processes.append(ServerProcess(command=command))
        return Node(n, address, self.processes[-1].start(timeout=120), data)

    def close(self) -> None:
        for process in self.processes:
            if process.process.poll() is None:
                process.stop(signal.SIGKILL)
        for command in reversed(self.undo):
            subprocess.run(command, capture_output=True, check=False, timeout=120)


@pytest.fixture
def pods(image: str, tmp_path: Path) -> Iterator[Pods]:
    pods = Pods(image, tmp_path)
    try:
        pods.start()
        yield pods
    finally:
        pods.close()


def store_of(pods: Pods, node: Node) -> tuple[GrpcStore, grpc.aio.Channel]:
    """A client of one node over mutual TLS with the tenant's token, by the node's DNS name."""
    headless = statefulset()["spec"]["serviceName"]
    options = [("grpc.ssl_target_name_override", f"{node.name}.{headless}"), *channel_options()]
    port = node_config(node.ordinal).port
    channel = grpc.aio.secure_channel(f"{node.address}:{port}", pods.credentials, options=options)
    return GrpcStore(channel), channel


async def health(node: Node, service: str) -> int:
    port = node_config(node.ordinal).health_port
    async with grpc.aio.insecure_channel(f"{node.address}:{port}") as channel:
        answer = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
        status: int = answer.status
        return status


async def test_three_nodes_from_the_image_serve_one_store_and_stop_cleanly(pods: Pods) -> None:
    serving = health_pb2.HealthCheckResponse.SERVING
    readiness = server_container()["readinessProbe"]["grpc"]["service"]
    for node in pods.nodes:
        assert await health(node, "") == serving  # liveness: the process is up
        async with asyncio.timeout(60):  # readiness: once a member took this node's list
            while await health(node, readiness) != serving:  # noqa: ASYNC110 - another process
                await asyncio.sleep(0.2)

    clients = [store_of(pods, node) for node in pods.nodes]
    try:
        for node, (store, _) in zip(pods.nodes, clients, strict=True):
            await store.set(f"through-{node.name}", node.name.encode())
        for store, _ in clients:
            for node in pods.nodes:
                assert await store.get(f"through-{node.name}") == node.name.encode()
    finally:
        for _, channel in clients:
            await channel.close()

    for node in pods.nodes:
        node.process.process.send_signal(signal.SIGTERM)
    grace = statefulset()["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
    for node in pods.nodes:
        code = await asyncio.to_thread(node.process.process.wait, grace)
        assert code == 0, "\n".join(node.process.log[-20:])
        assert any(node.data.iterdir()), "nothing was written to the data volume"
