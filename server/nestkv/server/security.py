"""Who may call, and on what: TLS credentials that reload on SIGHUP, tokens confined to a namespace.

TLS (`TlsFiles`): the server's certificate and key, and for mutual TLS the CA
that client certificates must chain to, read from files. `reload()` reads
them again (cert-manager and the like rotate them in place); new handshakes
use the new files, connections already open keep theirs. Files that fail to
load leave the previous credentials in place.

Tokens (`Gate`): with `--auth-file`, every StoreService call needs
`authorization: Bearer <token>` metadata naming a token of the file, a TOML
list of entries such as

    [[tokens]]
    name = "tenant-a"                # for logs and metrics
    sha256 = "<64 hex digits>"       # SHA-256 of the token: the file never holds a token
    path = ["tenant-a"]              # the token's root; [] is the whole store
    access = "readwrite"             # or "read": get (without renewal), exists, expires_in, stats
    max_bytes = 67108864             # optional: a byte quota for the root's subtree, on each node

A token's `Grant` is where its caller stands: its root is put in front of the
path of every request it sends, so no path it can send (namespace segments
are opaque, non-empty strings) names anything outside its subtree. Health
checks and reflection are other services and stay open: they hold no data.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import ssl
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import grpc
import msgspec
import msgspec.toml

from nestkv.server.errors import (
    InvalidArgument,
    PermissionDenied,
    ReplicaRefused,
    TokenMissing,
    Unauthenticated,
)
from nestkv.server.limits import Limits
from nestkv.server.metrics import Denials
from nestkv.wire.channel import is_loopback_host

if TYPE_CHECKING:
    from nestkv.server.config import ServerConfig

log = logging.getLogger("nestkv.server")

READS = frozenset({"get", "exists", "expires_in", "stats"})
"""The operations a `read` token may run (a `get` only without renew_for: a renewal changes the
expiry). An allow list: an operation added later is refused to `read` tokens until listed here."""
TOKEN_BYTES = 32
"""Randomness of a minted token: 256 bits."""
TOKEN_PREFIX = "nkv_"
"""Marks a string as a nestkv token, for secret scanners."""
_DIGEST_PREFIX = 8  # bytes of a digest that index the lookup; the whole digest is compared in constant time


class SecurityConfigError(Exception):
    """A TLS or token file cannot be used; the message names the file and the problem."""


class TokenEntry(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One token of the auth file."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    sha256: Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$")]
    path: list[str]
    access: Literal["read", "readwrite"]
    max_bytes: Annotated[int, msgspec.Meta(ge=1)] | None = None
    """A byte quota for the subtree at `path` on each node, counted as --max-memory counts."""


class AuthFile(msgspec.Struct, forbid_unknown_fields=True):
    """The whole auth file: its `[[tokens]]` entries, and nothing else."""

    tokens: list[TokenEntry] = []


class Grant:
    """What the holder of one token may do, and under which root."""

    __slots__ = ("denials", "limits", "name", "root", "writes")
    forwarded = False
    """True for operations another cluster node scoped and forwarded (nestkv.server.cluster.PeerGrant)."""

    def __init__(
        self, name: str, root: tuple[str, ...], writes: bool, limits: Limits, denials: Denials | None = None
    ) -> None:
        self.name = name
        self.root = root
        self.writes = writes
        self.limits = limits
        self.denials = denials

    def scope(self, kind: str, request: Any) -> None:
        """Admit one operation: check its path against the limits and this grant's access, then
        root the path at the grant's root. The one check of every request's path.

        The limits apply to the path the caller sent: a token's root is the root of its caller's
        store, with the same max_depth below it as the whole store has for an unscoped caller.
        """
        self.limits.check_path(request.path)
        if kind == "replica":  # a copy merged as given, version and all: for the members only
            raise ReplicaRefused("replica is for the members of a cluster only")
        if not self.writes and (kind not in READS or (kind == "get" and request.HasField("renew_for"))):
            if self.denials is not None:
                self.denials.count(self.name, "read_only")
            action = "get with renew_for" if kind == "get" else kind
            raise PermissionDenied(f"token {self.name!r} has read access; {action} needs readwrite")
        if self.root:
            request.path[:0] = self.root


def digest(token: str) -> str:
    """The SHA-256 of a token, as the auth file holds it (64 hex digits)."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A fresh random token: TOKEN_PREFIX and 256 bits in URL-safe base64 (printable ASCII)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)


Quotas = dict[tuple[str, ...], int]
"""Byte quotas by root namespace (NamespacedStorage.quotas)."""


def load_tokens(
    path: str, limits: Limits, denials: Denials | None
) -> tuple[dict[bytes, list[tuple[bytes, Grant]]], Quotas]:
    """The grants of an auth file, indexed by the first bytes of their digests, and its quotas."""
    try:
        data = Path(path).read_bytes()
        parsed = msgspec.toml.decode(data, type=AuthFile)
    except OSError as error:
        raise SecurityConfigError(f"cannot read auth file {path}: {error.strerror}") from None
    except msgspec.MsgspecError as error:
        raise SecurityConfigError(f"auth file {path}: {error}") from None
    index: dict[bytes, list[tuple[bytes, Grant]]] = {}
    quotas: Quotas = {}
    names: set[str] = set()
    digests: set[str] = set()
    for number, entry in enumerate(parsed.tokens):
        where = f"auth file {path}: token {entry.name!r} (entry {number + 1})"
        if entry.name in names:
            raise SecurityConfigError(f"{where}: the name is taken by an earlier entry; names must be unique")
        if entry.sha256 in digests:
            raise SecurityConfigError(f"{where}: the same sha256 as an earlier entry")
        try:
            limits.check_path(entry.path)
        except InvalidArgument as error:
            raise SecurityConfigError(f"{where}: path: {error}") from None
        root = tuple(entry.path)
        if entry.max_bytes is not None and quotas.setdefault(root, entry.max_bytes) != entry.max_bytes:
            raise SecurityConfigError(
                f"{where}: max_bytes {entry.max_bytes} differs from an earlier token's with the same "
                f"path ({quotas[root]}): the quota is the namespace's, give its tokens one"
            )
        names.add(entry.name)
        digests.add(entry.sha256)
        full = bytes.fromhex(entry.sha256)
        grant = Grant(entry.name, root, entry.access == "readwrite", limits, denials)
        index.setdefault(full[:_DIGEST_PREFIX], []).append((full, grant))
    return index, quotas


class Gate:
    """Admits StoreService calls: everyone without an auth file, holders of its tokens with one."""

    __slots__ = ("_index", "_limits", "denials", "everything", "path", "quotas", "version")

    def __init__(self, path: str, limits: Limits, denials: Denials | None = None) -> None:
        """Raises SecurityConfigError if the auth file `path` cannot be used ("": no auth file)."""
        self.path = path
        self.denials = denials
        self._limits = limits
        self._index: dict[bytes, list[tuple[bytes, Grant]]] | None = None
        self.quotas: Quotas = {}
        """The byte quotas of the namespaces the tokens are rooted at (their max_bytes)."""
        if path:
            self._index, self.quotas = load_tokens(path, limits, denials)
        self.everything = Grant("", (), True, limits)
        """The grant of every call when there is no auth file."""
        self.version = 0
        """Bumped by every successful reload: streams admitted before it are admitted again."""

    @property
    def required(self) -> bool:
        """Whether calls need a token (the server has an auth file)."""
        return self._index is not None

    def tokens(self) -> str:
        """How many tokens the auth file holds, for the log: `1 token`, `3 tokens`."""
        count = sum(len(grants) for grants in (self._index or {}).values())
        return f"{count} token" if count == 1 else f"{count} tokens"

    def admit(self, context: Any) -> Grant:
        """The grant of the call of a grpc.aio ServicerContext, by its token; raises Unauthenticated."""
        index = self._index
        if index is None:
            return self.everything
        headers = [value for key, value in context.invocation_metadata() or () if key == "authorization"]
        if len(headers) > 1:  # proxies differ on which of two headers counts: refuse both
            self._deny("", "ambiguous_token")
            raise TokenMissing("the call carries more than one authorization header; send one")
        token = _bearer(headers[0]) if headers else None
        if token is None:
            self._deny("", "missing_token")
            raise TokenMissing(
                "this server requires a token: send `authorization: Bearer <token>` metadata "
                "(GrpcStore.with_client(..., token=...), nestkv --token)"
            )
        presented = hashlib.sha256(token.encode()).digest()
        for full, grant in index.get(presented[:_DIGEST_PREFIX], ()):
            if hmac.compare_digest(full, presented):
                return grant
        self._deny("", "unknown_token")
        raise Unauthenticated("the token is not valid on this server (unknown or revoked)")

    def reload(self) -> None:
        """Read the auth file again; if it cannot be used, keep the tokens held so far and log why."""
        if not self.path:
            return
        try:
            index, quotas = load_tokens(self.path, self._limits, self.denials)
        except SecurityConfigError as error:
            log.error("kept the previous tokens: %s", error)
            return
        if not index and self._index:
            # Most likely caught half-written (`>` truncates first): taking it would lock every caller out.
            log.error(
                "kept the previous tokens: auth file %s holds none now; replace the file in one step "
                "(write another, then rename it over), or restart the server to revoke every token",
                self.path,
            )
            return
        self._index, self.quotas = index, quotas
        self.version += 1
        log.info("auth file %s reloaded: %s", self.path, self.tokens())

    def _deny(self, name: str, reason: str) -> None:
        if self.denials is not None:
            self.denials.count(name, reason)


def _bearer(header: Any) -> str | None:
    """The token of an `authorization: Bearer <token>` header; None if it holds none."""
    if not isinstance(header, str):
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


class TlsFiles:
    """The server's TLS credentials from files: certificate chain, key, and the client CA (mutual TLS)."""

    __slots__ = ("_pending", "cert", "client_ca", "credentials", "key")

    def __init__(self, cert: str, key: str, client_ca: str = "") -> None:
        """Raises SecurityConfigError if the files cannot be used."""
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self._pending: Any = None
        self.credentials = grpc.dynamic_ssl_server_credentials(
            self._load(), self._fetch, require_client_authentication=bool(client_ca)
        )

    def reload(self) -> None:
        """Read the files again for the next handshakes; if they cannot be used, keep the old ones."""
        try:
            self._pending = self._load()
        except SecurityConfigError as error:
            log.error("kept the previous TLS credentials: %s", error)
            return
        # gRPC builds its handshaker from them at the next handshake; one it cannot build (a key
        # type Python's OpenSSL reads and gRPC's BoringSSL does not) is logged by gRPC there.
        log.info("TLS credentials reloaded from %s: new handshakes use them", self.cert)

    def _fetch(self) -> Any:
        # Called by gRPC before every handshake: a new configuration once, then None (no change).
        pending, self._pending = self._pending, None
        return pending

    def _load(self) -> Any:
        cert, key = _read(self.cert, "--tls-cert"), _read(self.key, "--tls-key")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            # A password callback, or OpenSSL would ask for a pass phrase on the terminal and block.
            context.load_cert_chain(self.cert, self.key, password=_no_pass_phrase)
        except _EncryptedKey:
            raise SecurityConfigError(
                f"--tls-key {self.key} is encrypted; gRPC needs an unencrypted PEM key "
                "(openssl pkey -in KEY -out PLAIN), readable by the server only"
            ) from None
        except (ssl.SSLError, OSError) as error:
            raise SecurityConfigError(
                f"--tls-cert {self.cert} and --tls-key {self.key} are not a PEM certificate chain "
                f"and its private key: {error}"
            ) from None
        client_ca = None
        if self.client_ca:
            client_ca = _read(self.client_ca, "--tls-client-ca")
            try:
                context.load_verify_locations(cadata=client_ca.decode("ascii"))
            except (ssl.SSLError, UnicodeDecodeError, ValueError) as error:
                raise SecurityConfigError(
                    f"--tls-client-ca {self.client_ca} holds no PEM CA certificate: {error}"
                ) from None
        # The checks above read the files by name: they must not have changed since they were read.
        if cert != _read(self.cert, "--tls-cert") or key != _read(self.key, "--tls-key"):
            raise SecurityConfigError(f"{self.cert} or {self.key} changed while being read; try again")
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=client_ca)


class _EncryptedKey(Exception):
    pass


def _no_pass_phrase() -> str:
    raise _EncryptedKey


def _read(path: str, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise SecurityConfigError(f"cannot read {flag} {path}: {error.strerror}") from None


def open_security(config: ServerConfig, denials: Denials | None = None) -> tuple[TlsFiles | None, Gate]:
    """The TLS credentials and the gate `config` asks for; SecurityConfigError if they cannot be used.

    As Redis's protected mode, a server reachable from other machines must know who
    calls: by client certificate (mutual TLS) or by token, unless `insecure` says that
    serving anyone who reaches the port is meant. TLS alone encrypts; it does not say who calls.
    """
    if bool(config.tls_cert) != bool(config.tls_key):
        raise SecurityConfigError("--tls-cert and --tls-key go together: give both, or neither")
    if config.tls_client_ca and not config.tls_cert:
        raise SecurityConfigError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    authenticated = config.tls_client_ca or config.auth_file
    if not (authenticated or config.insecure or is_loopback_host(config.host)):
        what = (
            "TLS alone (no client certificates, no tokens)" if config.tls_cert else "neither TLS nor tokens"
        )
        raise SecurityConfigError(
            f"refusing to serve {config.host} with {what}: anyone who reaches the port could read, "
            "overwrite and delete every namespace. Add --tls-client-ca for mutual TLS (with --tls-cert "
            "and --tls-key), --auth-file for tokens, or both; or --insecure to serve anyone who "
            "reaches the port on purpose"
        )
    tls = TlsFiles(config.tls_cert, config.tls_key, config.tls_client_ca) if config.tls_cert else None
    return tls, Gate(config.auth_file, config.limits, denials)


def toml_entry(
    name: str, token_digest: str, path: Iterable[str], access: str, max_bytes: int | None = None
) -> str:
    """The auth file entry of a token, as `nestkv-server token new` prints it."""
    return (
        "[[tokens]]\n"
        f"name = {_toml_string(name)}\n"
        f'sha256 = "{token_digest}"\n'
        f"path = [{', '.join(_toml_string(segment) for segment in path)}]\n"
        f'access = "{access}"\n'
    ) + (f"max_bytes = {max_bytes}\n" if max_bytes is not None else "")


def _toml_string(text: str) -> str:
    # A JSON string is a TOML basic string, but for DEL, which TOML wants escaped and JSON does not.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")
