"""TLS and mutual TLS against real server processes: refusals, certificate rotation, safe defaults."""

from __future__ import annotations

import asyncio
import shutil
import signal
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization

from nestkv.client import GrpcStore, StoreUnavailableError
from tests.client.test_cli import nestkv
from tests.pki import Authority, Pki
from tests.polling import eventually
from tests.serverproc import ServerProcess, server_command


def tls_flags(pki: Pki) -> tuple[str, ...]:
    return ("--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key))


def fails_to_start(*args: str) -> str:
    """Run the server with `args`; it must exit with status 1 without serving: its last line of stderr."""
    done = server_command("--port", "0", *args)
    assert done.returncode == 1, done.stderr
    assert "serving on" not in done.stderr
    return done.stderr.strip().splitlines()[-1]


async def round_trip(store: GrpcStore) -> None:
    await store.set("k", b"v")
    assert await store.get("k") == b"v"


async def test_tls_server_serves_a_client_that_trusts_its_ca(pki: Pki) -> None:
    with ServerProcess(*tls_flags(pki)) as server:
        assert "TLS" in server.log[-1]
        async with GrpcStore.with_client(server.target, credentials=pki.credentials()) as store:
            await round_trip(store)


async def test_plaintext_client_against_tls_server_fails_clearly(pki: Pki) -> None:
    with ServerProcess(*tls_flags(pki)) as server:
        async with GrpcStore.with_client(server.target, timeout=2) as store:
            with pytest.raises(StoreUnavailableError, match="UNAVAILABLE"):
                await store.get("k")
        done = nestkv("get", "k", target=server.target)
        assert done.returncode == 2
        assert b"if the server serves TLS, connect with --ca FILE or --tls" in done.stderr
        # A client trusting another CA does not accept the server's certificate.
        other = grpc.ssl_channel_credentials(pki.other_ca.cert_bytes())
        async with GrpcStore.with_client(server.target, credentials=other, timeout=2) as store:
            with pytest.raises(StoreUnavailableError, match="CERTIFICATE_VERIFY_FAILED"):
                await store.get("k")
        # The command line, given the CA, gets through.
        assert nestkv("--ca", str(pki.ca.cert), "set", "k", "v", target=server.target).returncode == 0
        assert nestkv("--ca", str(pki.ca.cert), "get", "k", target=server.target).stdout == b"v"
        assert nestkv("--ca", str(pki.ca.cert), "ping", target=server.target).stdout == b"SERVING\n"


async def test_mutual_tls_refuses_clients_without_a_certificate_of_its_ca(pki: Pki) -> None:
    with ServerProcess(*tls_flags(pki), "--tls-client-ca", str(pki.ca.cert)) as server:
        assert "mutual TLS" in server.log[-1]
        async with GrpcStore.with_client(server.target, credentials=pki.credentials()) as store:
            with pytest.raises(StoreUnavailableError):
                await store.get("k")
        foreign = pki.credentials(client=pki.other_client)
        async with GrpcStore.with_client(server.target, credentials=foreign) as store:
            with pytest.raises(StoreUnavailableError):
                await store.get("k")
        async with GrpcStore.with_client(
            server.target, credentials=pki.credentials(client=pki.client)
        ) as store:
            await round_trip(store)
        cli_tls = ("--ca", str(pki.ca.cert), "--cert", str(pki.client.cert), "--key", str(pki.client.key))
        assert nestkv(*cli_tls, "get", "k", target=server.target).stdout == b"v"
        assert nestkv("--ca", str(pki.ca.cert), "get", "k", target=server.target).returncode == 2


async def test_sighup_rotates_the_certificate_without_dropping_connections(pki: Pki, tmp_path: Path) -> None:
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    shutil.copy(pki.server.cert, cert)
    shutil.copy(pki.server.key, key)
    rotated_ca = Authority(tmp_path, "rotated-ca")
    rotated = rotated_ca.issue("rotated-server", server=True)
    trusts_old = pki.credentials()
    trusts_new = grpc.ssl_channel_credentials(rotated_ca.cert_bytes())
    with ServerProcess("--tls-cert", str(cert), "--tls-key", str(key)) as server:
        async with GrpcStore.with_client(server.target, credentials=trusts_old) as store:
            await round_trip(store)
            calls = 0
            stop = asyncio.Event()

            async def keep_calling() -> None:
                nonlocal calls
                while not stop.is_set():
                    await asyncio.gather(*(store.set(f"k{i}", b"v") for i in range(20)))
                    calls += 20

            caller = asyncio.create_task(keep_calling())
            await eventually(lambda: calls > 100)
            shutil.copy(rotated.cert, cert)
            shutil.copy(rotated.key, key)
            server.process.send_signal(signal.SIGHUP)
            await eventually(lambda: any("TLS credentials reloaded" in line for line in server.log))
            before = calls
            await eventually(lambda: calls > before + 100)
            stop.set()
            await caller  # not one call failed, before, during or after the rotation
            # The connection open since before the rotation still serves the old-CA client.
            assert await store.get("k0") == b"v"
        # New handshakes present the new certificate.
        async with GrpcStore.with_client(server.target, credentials=trusts_new) as store:
            assert await store.get("k0") == b"v"
        async with GrpcStore.with_client(server.target, credentials=trusts_old, timeout=2) as store:
            with pytest.raises(StoreUnavailableError, match="CERTIFICATE_VERIFY_FAILED"):
                await store.get("k0")


async def test_sighup_with_a_broken_certificate_keeps_the_old_one(pki: Pki, tmp_path: Path) -> None:
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    shutil.copy(pki.server.cert, cert)
    shutil.copy(pki.server.key, key)
    with ServerProcess("--tls-cert", str(cert), "--tls-key", str(key)) as server:
        cert.write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
        server.process.send_signal(signal.SIGHUP)
        await eventually(lambda: any("kept the previous TLS credentials" in line for line in server.log))
        assert any(str(cert) in line for line in server.log if "kept the previous" in line)
        # Another pair that does not match: the key of a different certificate.
        shutil.copy(pki.server.cert, cert)
        shutil.copy(pki.client.key, key)
        server.process.send_signal(signal.SIGHUP)
        await eventually(lambda: sum("kept the previous TLS credentials" in line for line in server.log) == 2)
        async with GrpcStore.with_client(server.target, credentials=pki.credentials()) as store:
            await round_trip(store)


def test_non_loopback_host_needs_client_certificates_or_tokens_or_insecure(pki: Pki, tmp_path: Path) -> None:
    # 192.0.2.1 (TEST-NET-1) is on no interface here: a server let past the check fails to bind it instead.
    refused = fails_to_start("--host", "192.0.2.1")
    assert "refusing to serve 192.0.2.1 with neither TLS nor tokens" in refused
    for flag in ("--tls-cert", "--tls-key", "--tls-client-ca", "--auth-file", "--insecure"):
        assert flag in refused
    # TLS encrypts, it does not say who calls: any TLS client could set and delete_all.
    refused = fails_to_start("--host", "192.0.2.1", *tls_flags(pki))
    assert "refusing to serve 192.0.2.1 with TLS alone (no client certificates, no tokens)" in refused
    assert "refusing" in fails_to_start("--host", "0.0.0.0", *tls_flags(pki))
    auth_file = tmp_path / "tokens.toml"
    auth_file.write_text("")
    for allowed in (
        ("--insecure",),
        (*tls_flags(pki), "--insecure"),
        (*tls_flags(pki), "--tls-client-ca", str(pki.ca.cert)),
        (*tls_flags(pki), "--auth-file", str(auth_file)),
        ("--auth-file", str(auth_file)),
    ):
        assert "cannot listen on 192.0.2.1" in fails_to_start("--host", "192.0.2.1", *allowed)
    assert "refusing" in fails_to_start("--host", "0.0.0.0")


def test_an_encrypted_key_stops_the_start_with_the_reason_and_never_asks_for_a_pass_phrase(
    pki: Pki, tmp_path: Path
) -> None:
    key = serialization.load_pem_private_key(pki.server.key_bytes(), password=None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    line = fails_to_start("--tls-cert", str(pki.server.cert), "--tls-key", str(encrypted))
    assert f"--tls-key {encrypted} is encrypted; gRPC needs an unencrypted PEM key" in line


def test_tls_flags_that_cannot_work_stop_the_start(pki: Pki, tmp_path: Path) -> None:
    assert "--tls-cert and --tls-key go together" in fails_to_start("--tls-cert", str(pki.server.cert))
    assert "--tls-client-ca (mutual TLS) needs --tls-cert" in fails_to_start(
        "--tls-client-ca", str(pki.ca.cert)
    )
    missing = tmp_path / "missing.crt"
    assert f"cannot read --tls-cert {missing}" in fails_to_start(
        "--tls-cert", str(missing), "--tls-key", str(pki.server.key)
    )
    assert "are not a PEM certificate chain and its private key" in fails_to_start(
        "--tls-cert", str(pki.server.cert), "--tls-key", str(pki.client.key)
    )
    assert "holds no PEM CA certificate" in fails_to_start(
        *tls_flags(pki), "--tls-client-ca", str(pki.server.key)
    )
