"""Certificates and auth files for the security tests, made at set-up."""

from __future__ import annotations

import datetime
import ipaddress
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from nestkv.server.security import digest, new_token, toml_entry

# The --cluster-name of the clusters the tests run under mutual TLS.
CLUSTER_NAME = "nestkv.test"


@dataclass(frozen=True)
class Issued:
    """A certificate and its key, as PEM files."""

    cert: Path
    key: Path

    def cert_bytes(self) -> bytes:
        return self.cert.read_bytes()

    def key_bytes(self) -> bytes:
        return self.key.read_bytes()


class Authority:
    """A certificate authority that writes what it issues into `directory`."""

    def __init__(self, directory: Path, name: str) -> None:
        self.directory = directory
        self.name = name
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self._certificate = (
            _builder(subject, subject, self._key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self._key, hashes.SHA256())
        )
        self.cert = directory / f"{name}.crt"
        self.cert.write_bytes(self._certificate.public_bytes(serialization.Encoding.PEM))

    def cert_bytes(self) -> bytes:
        return self.cert.read_bytes()

    def issue(self, name: str, *, server: bool) -> Issued:
        """A certificate for 127.0.0.1 and localhost (server), or a client certificate named `name`."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = _builder(subject, self._certificate.subject, key.public_key())
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        else:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
            )
        certificate = builder.sign(self._key, hashes.SHA256())
        return self._write(name, key, certificate)

    def _write(self, name: str, key: ec.EllipticCurvePrivateKey, certificate: x509.Certificate) -> Issued:
        """`name`.crt and `name`.key (readable by its owner only) in the authority's directory."""
        issued = Issued(self.directory / f"{name}.crt", self.directory / f"{name}.key")
        issued.cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        issued.key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        issued.key.chmod(0o600)
        return issued

    def issue_node(self, name: str, node_ids: Sequence[str], cluster_name: str = CLUSTER_NAME) -> Issued:
        """A certificate for the nodes of a cluster, named `name`: each serves with it (localhost,
        127.0.0.1) and presents it to the others when forwarding, which admit a forwarded call only
        from a certificate carrying the DNS name NODE_ID.CLUSTER_NAME (--cluster-name); so each id
        of `node_ids` is one of its DNS names that way, and it is good for serverAuth and clientAuth."""
        return self.issue_with_names(
            name, [x509.DNSName(f"{node_id}.{cluster_name}") for node_id in node_ids]
        )

    def issue_with_names(self, name: str, names: Sequence[x509.GeneralName]) -> Issued:
        """A certificate with the common name `name` and the subject alternative names `names` (with
        localhost and 127.0.0.1), good for serverAuth and clientAuth."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        every_name: list[x509.GeneralName] = [
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            *names,
        ]
        certificate = (
            _builder(subject, self._certificate.subject, key.public_key())
            .add_extension(x509.SubjectAlternativeName(every_name), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        return self._write(name, key, certificate)


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
    )


@dataclass(frozen=True)
class Pki:
    """A CA with a server and a client certificate, and a second, unrelated CA with a client certificate."""

    ca: Authority
    server: Issued
    client: Issued
    other_ca: Authority
    other_client: Issued

    def credentials(self, *, client: Issued | None = None) -> grpc.ChannelCredentials:
        """Channel credentials trusting `ca`, presenting `client`'s certificate if given."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.cert_bytes(),
            private_key=client.key_bytes() if client else None,
            certificate_chain=client.cert_bytes() if client else None,
        )


def make_pki(directory: Path) -> Pki:
    ca = Authority(directory, "ca")
    other = Authority(directory, "other-ca")
    return Pki(
        ca=ca,
        server=ca.issue("server", server=True),
        client=ca.issue("client", server=False),
        other_ca=other,
        other_client=other.issue("other-client", server=False),
    )


class AuthFile:
    """An --auth-file in the making: `mint` adds a token, as `nestkv-server token new` does."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.write_text("")

    def mint(
        self, name: str, path: Sequence[str], access: str = "readwrite", max_bytes: int | None = None
    ) -> str:
        token = new_token()
        with self.path.open("a") as file:
            file.write("\n" + toml_entry(name, digest(token), path, access, max_bytes))
        return token

    def revoke(self, name: str) -> None:
        """Drop the entry named `name` (the file's entries are blocks between blank lines)."""
        blocks = self.path.read_text().split("\n\n")
        kept = [block for block in blocks if f"name = {json.dumps(name)}\n" not in block + "\n"]
        assert len(kept) == len(blocks) - 1, f"no token named {name!r}"
        self.path.write_text("\n\n".join(kept))
