"""Unit tests for `loader.registry`: shard indices are sample-id prefixes, so they must never move."""

from __future__ import annotations

import pytest

from loader.registry import OK, PENDING, QUARANTINED, ShardRecord, ShardRegistry


def test_indices_are_assigned_in_order() -> None:
    registry = ShardRegistry()
    added = registry.add(["a", "b", "c"])
    assert [(r.index, r.uri, r.state) for r in added] == [(0, "a", PENDING), (1, "b", PENDING), (2, "c", PENDING)]


def test_re_adding_a_uri_returns_its_index() -> None:
    registry = ShardRegistry()
    registry.add(["a", "b"])
    again = registry.add(["b", "c", "a"])
    assert [(r.uri, r.index) for r in again] == [("b", 1), ("c", 2), ("a", 0)]
    assert len(registry.records()) == 3


def test_duplicate_uri_in_one_call_gets_one_index() -> None:
    registry = ShardRegistry()
    added = registry.add(["a", "a"])
    assert [r.index for r in added] == [0, 0]
    assert len(registry.records()) == 1


def test_returned_records_are_copies() -> None:
    registry = ShardRegistry()
    record = registry.add(["a"])[0]
    record.state, record.index = QUARANTINED, 9
    assert registry.records()[0] == ShardRecord(index=0, uri="a")
    registry.records()[0].rows = 5
    assert registry.readable()[0].rows == 0


def test_mark_read_records_rows() -> None:
    registry = ShardRegistry()
    registry.add(["a", "b"])
    registry.mark_read(1, 42)
    assert registry.records_of(["b", "a"]) == [
        ShardRecord(index=1, uri="b", state=OK, rows=42),
        ShardRecord(index=0, uri="a", state=PENDING),
    ]


def test_quarantine_keeps_the_index_and_hides_the_shard() -> None:
    registry = ShardRegistry()
    registry.add(["a", "b", "c"])
    registry.mark_read(1, 10)
    registry.quarantine(1, "truncated tar")
    assert [r.uri for r in registry.readable()] == ["a", "c"]
    record = registry.records_of(["b"])[0]
    assert (record.index, record.state, record.reason, record.rows) == (1, QUARANTINED, "truncated tar", 0)
    # A quarantined uri keeps its index, so a later shard cannot reuse it and alias its ids.
    assert registry.add(["b", "d"])[0].index == 1
    assert registry.add(["d"])[0].index == 3


def test_mark_read_after_quarantine_does_not_restore_the_shard() -> None:
    registry = ShardRegistry()
    registry.add(["a"])
    registry.quarantine(0, "bad schema")
    # A read finishing late (it was in flight when the shard was quarantined) must not undo it.
    registry.mark_read(0, 100)
    record = registry.records()[0]
    assert (record.state, record.rows, record.reason) == (QUARANTINED, 0, "bad schema")
    assert registry.readable() == []


def test_records_of_unknown_uri_raises() -> None:
    registry = ShardRegistry()
    registry.add(["a"])
    with pytest.raises(KeyError):
        registry.records_of(["nope"])


def test_state_round_trip() -> None:
    registry = ShardRegistry()
    registry.add(["a", "b", "c"])
    registry.mark_read(0, 7)
    registry.quarantine(2, "unreadable")
    state = registry.get_state()

    restored = ShardRegistry.from_state(state)
    assert restored.records() == registry.records()
    assert restored.readable() == registry.readable()
    assert restored.get_state() == state
    # Indices continue where they left off, and known uris keep theirs.
    assert [(r.uri, r.index) for r in restored.add(["c", "d"])] == [("c", 2), ("d", 3)]


def test_state_is_plain_data() -> None:
    registry = ShardRegistry()
    registry.add(["a"])
    state = registry.get_state()
    assert state == {"records": [{"index": 0, "uri": "a", "state": PENDING, "reason": "", "rows": 0}]}
    # The snapshot is detached: later changes do not leak into it.
    registry.mark_read(0, 3)
    assert state["records"][0]["state"] == PENDING
