"""Placement: the committed test vectors, spread over members, and what moves when members change."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from nestkv.wire.placement import HASH_NAME, Placement, encode, h64, key_hash, mix, topology_version

VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).parents[1] / "placement_vectors.json").read_text(encoding="utf-8")
)
KEYS = [(["tenant", f"t{n % 7}"], f"key-{n}") for n in range(100_000)]


def test_the_vectors_name_this_hash() -> None:
    assert VECTORS["hash"] == HASH_NAME


@pytest.mark.parametrize("vector", VECTORS["vectors"], ids=lambda v: f"{v['path']}/{v['key'][:12]!r}")
def test_placement_matches_the_committed_vectors(vector: dict[str, Any]) -> None:
    path, key = vector["path"], vector["key"]
    assert encode(path, key).hex() == vector["encoding_hex"]
    assert f"{key_hash(path, key):016x}" == vector["key_hash"]
    for member, score in vector["scores"].items():
        assert f"{mix(key_hash(path, key) ^ h64(member.encode())):016x}" == score
    for members, owner in vector["owners"].items():
        assert Placement(members.split(",")).owner(path, key) == owner


def test_the_same_key_in_a_b_and_in_a_underscore_b_hashes_independently() -> None:
    spellings = [
        (["a", "b"], "k"),
        (["a_b"], "k"),
        (["ab"], "k"),
        (["a"], "bk"),
        ([], "abk"),
        (["a", "b", ""], "k"),
    ]
    assert len({encode(path, key) for path, key in spellings}) == len(spellings)
    assert len({key_hash(path, key) for path, key in spellings}) == len(spellings)


def test_owner_does_not_depend_on_the_order_members_are_given_in() -> None:
    one, other = Placement(["n0", "n1", "n2", "n3"]), Placement(["n3", "n1", "n0", "n2", "n1"])
    assert one.members == other.members
    assert all(one.owner(path, key) == other.owner(path, key) for path, key in KEYS[:2_000])


def test_100k_keys_over_4_members_give_each_a_quarter_within_5_points() -> None:
    placement = Placement([f"nestkv-{n}" for n in range(4)])
    counts = Counter(placement.owner(path, key) for path, key in KEYS)
    assert set(counts) == set(placement.members)
    for member, count in counts.items():
        assert 0.20 <= count / len(KEYS) <= 0.30, (member, count)


def test_adding_a_fifth_member_moves_at_most_22_percent_all_to_it_and_removing_it_moves_them_back() -> None:
    four = Placement([f"nestkv-{n}" for n in range(4)])
    five = Placement([f"nestkv-{n}" for n in range(5)])
    before = [four.owner(path, key) for path, key in KEYS]
    after = [five.owner(path, key) for path, key in KEYS]
    moved = [(old, new) for old, new in zip(before, after, strict=True) if old != new]
    assert len(moved) <= 0.22 * len(KEYS)
    assert len(moved) >= 0.15 * len(KEYS)  # the new member takes its share
    assert {new for _, new in moved} == {"nestkv-4"}


def test_removing_a_member_moves_only_its_own_keys() -> None:
    three = Placement(["nestkv-0", "nestkv-1", "nestkv-2"])
    two = Placement(["nestkv-0", "nestkv-2"])
    for path, key in KEYS[:20_000]:
        old = three.owner(path, key)
        if old != "nestkv-1":
            assert two.owner(path, key) == old


def test_a_cluster_of_one_owns_everything_and_none_is_refused() -> None:
    assert Placement(["solo"]).owner(["a"], "k") == "solo"
    with pytest.raises(ValueError, match="at least one member"):
        Placement([])


def test_the_topology_version_is_a_digest_of_ids_and_addresses_in_any_order() -> None:
    members = {"n0": "10.0.0.1:50051", "n1": "10.0.0.2:50051"}
    assert topology_version(members) == topology_version(dict(reversed(members.items())))
    assert topology_version(members) != topology_version({**members, "n1": "10.0.0.3:50051"})
    assert topology_version(members) != topology_version({"n0": "10.0.0.1:50051"})
    assert len(topology_version(members)) == 16


def test_a_keys_ranking_starts_with_its_owner_and_removing_a_member_keeps_the_others_order() -> None:
    five = Placement(["a", "b", "c", "d", "e"])
    four = Placement(["a", "b", "c", "e"])
    for path, key in KEYS[:2_000]:
        ranked = five.ranked(path, key)
        assert sorted(ranked) == ["a", "b", "c", "d", "e"]
        assert ranked[0] == five.owner(path, key)
        assert four.ranked(path, key) == [member for member in ranked if member != "d"]
