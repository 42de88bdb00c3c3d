"""A token's byte quota (`max_bytes` in its auth file entry) on a real server: one tenant cannot
fill the store for the others, and sees its quota and its use in Stats."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest

from nestkv.client import GrpcStore, Quota, StoreFullError
from tests.pki import AuthFile
from tests.polling import eventually
from tests.serverproc import ServerProcess

QUOTA = 256 * 1024
VALUE = b"x" * 1024


async def fill(store: GrpcStore, prefix: str, limit: int = 10_000) -> tuple[int, StoreFullError]:
    """Write 1 KiB values one by one until the store refuses one: how many went in, and the refusal."""
    for n in range(limit):
        try:
            await store.set(f"{prefix}{n}", VALUE)
        except StoreFullError as refusal:
            return n, refusal
    raise AssertionError(f"{limit} writes and no refusal")


async def test_a_tenant_at_its_quota_is_refused_and_the_others_still_write(tmp_path: Path) -> None:
    auth_file = AuthFile(tmp_path / "tokens.toml")
    quoted = auth_file.mint("quoted", ["a"], max_bytes=QUOTA)
    other = auth_file.mint("other", ["b"])
    admin = auth_file.mint("admin", [])
    with ServerProcess("--auth-file", str(auth_file.path), "--max-memory", "4M") as server:
        async with (
            GrpcStore.with_client(server.target, token=quoted) as a,
            GrpcStore.with_client(server.target, token=other) as b,
            GrpcStore.with_client(server.target, token=admin) as whole,
        ):
            written, refusal = await fill(a.with_namespace("deep"), "k")
            # No figures to a scoped caller (a quota above its root would tell others' use); the
            # operator, unscoped, is told them.
            assert str(refusal).endswith(
                "a byte quota over this namespace is reached (a token's max_bytes): "
                "delete keys under it to make room"
            )
            assert QUOTA // 2 < written * len(VALUE) < QUOTA
            with pytest.raises(StoreFullError, match=rf"namespace \['a'\] holds \d+ B .* quota of {QUOTA} B"):
                await whole.with_namespace("a").set("one-more", VALUE)
            assert await a.with_namespace("deep").get("k0") == VALUE  # what went in stays

            stats = await a.stats()
            assert stats.quota is not None
            assert stats.quota.max_bytes == QUOTA
            assert QUOTA - 2 * len(VALUE) < stats.quota.used_bytes <= QUOTA
            assert stats.quota.used_bytes == stats.namespace.bytes
            assert stats.quota.path == ()  # the tenant's own root
            assert (await a.with_namespace("deep").stats()).quota == stats.quota  # the quota above it
            assert (await whole.with_namespace("a").stats()).quota == Quota(
                QUOTA, stats.quota.used_bytes, ("a",)
            )
            assert (await whole.stats()).quota is None

            # The others write on: four times the tenant's quota, which --max-memory holds.
            await b.set_many({f"k{n}": VALUE for n in range(4 * QUOTA // len(VALUE))})
            assert (await b.stats()).quota is None

            # A larger quota, read on SIGHUP: the tenant writes again.
            text = auth_file.path.read_text().replace(f"max_bytes = {QUOTA}\n", f"max_bytes = {2 * QUOTA}\n")
            auth_file.path.write_text(text)
            server.process.send_signal(signal.SIGHUP)
            await eventually(lambda: any("reloaded" in line for line in server.log), within=15)
            more, _ = await fill(a.with_namespace("deep"), "more")
            assert more * len(VALUE) > QUOTA // 2
            raised = (await a.stats()).quota
            assert raised is not None
            assert raised == Quota(max_bytes=2 * QUOTA, used_bytes=raised.used_bytes)
            assert 2 * QUOTA - 2 * len(VALUE) < raised.used_bytes <= 2 * QUOTA


async def test_a_quota_above_a_tenants_root_shows_it_no_figures(tmp_path: Path) -> None:
    # A quota on the whole store (the operator's token): its figures are every tenant's.
    auth_file = AuthFile(tmp_path / "tokens.toml")
    tenant = auth_file.mint("tenant", ["t"])
    operator = auth_file.mint("operator", [], max_bytes=QUOTA)
    with ServerProcess("--auth-file", str(auth_file.path)) as server:
        async with (
            GrpcStore.with_client(server.target, token=tenant) as store,
            GrpcStore.with_client(server.target, token=operator) as whole,
        ):
            await whole.with_namespace("others").set_many({f"k{n}": VALUE for n in range(100)})
            assert (await whole.stats()).quota is not None
            assert (await store.stats()).quota is None
            _, refusal = await fill(store, "k")
            assert not re.search(r"\d", str(refusal).split(": ", 1)[1])
