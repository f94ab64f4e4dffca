"""Connection admission alone: the class partition, per-caller caps, room for new callers, eviction."""

from __future__ import annotations

import pytest

from agent.serve.admission import Admission, ClassBudget, Partition, caller_key
from agent.serve.peer import CONTAINER, HOST, UNIDENTIFIED, Peer


def test_split_clamps_guarantees_to_a_quarter_and_keeps_the_lane_out_of_the_pool() -> None:
    p = Partition.split(1024, containers=256, host=64, unidentified=8)
    assert p.guaranteed == {CONTAINER: 256, HOST: 64, UNIDENTIFIED: 8} and p.pool == 696
    assert p.limit == {CONTAINER: 1024, HOST: 1024, UNIDENTIFIED: 8}
    small = Partition.split(8, containers=256, host=64, unidentified=8)
    assert small.guaranteed == {CONTAINER: 2, HOST: 2, UNIDENTIFIED: 2} and small.pool == 2
    assert Partition.split(2, containers=9, host=9, unidentified=9).pool == 2  # tiny socket: all pooled


def test_budget_no_class_takes_another_ones_guarantee() -> None:
    b = ClassBudget(Partition.split(100, containers=25, host=10, unidentified=5))  # pool 60
    assert b.free(HOST) == 70 and b.free(CONTAINER) == 85 and b.free(UNIDENTIFIED) == 5
    for _ in range(70):  # host processes take their guarantee and the whole pool
        b.take(HOST)
    assert b.free(HOST) == 0
    assert b.free(CONTAINER) == 25 and b.free(UNIDENTIFIED) == 5  # the others' guarantees are untouched
    for _ in range(5):
        b.take(UNIDENTIFIED)
    assert b.free(UNIDENTIFIED) == 0 and b.free(CONTAINER) == 25
    b.give(HOST)
    assert b.free(CONTAINER) == 26 and b.free(HOST) == 1  # a freed pool slot is anyone's
    b.give(UNIDENTIFIED)
    assert b.free(UNIDENTIFIED) == 1 and b.free(CONTAINER) == 26  # the lane never reaches the pool


def test_caller_key_splits_the_unidentified_scope_by_pid() -> None:
    assert caller_key(Peer(7, 0, 0, container="a" * 64)) == f"container:{'a' * 64}"
    assert caller_key(Peer(7, 0, 0, identified=False)) == "pid:7"


def _never(_klass: str, _key: str) -> bool:
    raise AssertionError("no eviction expected")


def test_per_caller_cap_and_reserved_room_for_new_callers() -> None:
    a = Admission(Partition.split(16, containers=0, host=0, unidentified=0), per_caller=16, reserved=4)
    for _ in range(12):
        assert a.admit(CONTAINER, "c1", _never) is None
    why = a.admit(CONTAINER, "c1", lambda _k, _v: False)  # 4 left: reserved for callers holding none
    assert why is not None and why.reason.startswith("remaining connections are reserved") and why.held == 12
    assert a.admit(CONTAINER, "c2", _never) is None  # a new caller gets in
    assert a.admit(HOST, "h1", _never) is None
    capped = Admission(Partition.split(100, containers=0, host=0, unidentified=0), per_caller=2, reserved=0)
    assert capped.admit(HOST, "h", _never) is None and capped.admit(HOST, "h", _never) is None
    why = capped.admit(HOST, "h", _never)
    assert why is not None and why.reason == "per-caller connection cap reached" and why.limit == 2


def test_full_class_evicts_from_the_biggest_holder_only() -> None:
    a = Admission(Partition.split(8, containers=0, host=0, unidentified=0), per_caller=8, reserved=0)
    for key, n in (("big", 5), ("one", 1), ("two", 2)):
        for _ in range(n):
            assert a.admit(CONTAINER, key, _never) is None
    asked: list[str] = []

    def evict(klass: str, key: str) -> bool:
        asked.append(key)
        if key == "big":
            a.release(klass, key)
            return True
        return False

    assert a.admit(CONTAINER, "new", evict) is None  # full: "big" gives up an idle connection
    assert asked == ["big"] and a.held_by(CONTAINER, "big") == 4 and a.held_by(CONTAINER, "new") == 1
    asked.clear()
    assert a.admit(CONTAINER, "one", evict) is None and asked == ["big"]  # big holds 4 >= 1 + 2: gives one
    asked.clear()
    assert a.admit(CONTAINER, "two", evict) is not None and asked == []  # big holds 3 < 2 + 2: nobody asked
    nothing_idle = a.admit(CONTAINER, "other", lambda _k, key: asked.append(key) is not None)
    assert nothing_idle is not None and "all taken" in nothing_idle.reason
    assert asked == ["big", "two", "one"]  # every caller holding two or more, the biggest first


def test_unidentified_lane_is_shared_fairly() -> None:
    a = Admission(Partition.split(100, containers=25, host=25, unidentified=8), per_caller=32, reserved=8)
    assert a.per_caller[UNIDENTIFIED] == 2 and a.reserved[UNIDENTIFIED] == 0
    for pid in range(4):  # a parker holding the lane, two connections from each of four pids
        for _ in range(2):
            assert a.admit(UNIDENTIFIED, f"pid:{pid}", _never) is None
    assert a.admit(UNIDENTIFIED, "pid:0", _never) is not None  # its own cap
    evicted: list[str] = []

    def evict(klass: str, key: str) -> bool:
        evicted.append(key)
        a.release(klass, key)
        return True

    assert a.admit(UNIDENTIFIED, "pid:99", evict) is None  # another unidentified caller still gets in
    assert len(evicted) == 1 and a.budget.held[UNIDENTIFIED] == 8
    assert a.admit(CONTAINER, "c", _never) is None  # and no other class was touched


@pytest.mark.parametrize("klass", [CONTAINER, HOST, UNIDENTIFIED])
def test_release_gives_the_slot_back(klass: str) -> None:
    a = Admission(Partition.split(8, containers=2, host=2, unidentified=2), per_caller=8, reserved=0)
    assert a.admit(klass, "k", _never) is None
    a.release(klass, "k")
    a.release(klass, "k")  # a second release of the same slot is ignored
    assert a.held_by(klass, "k") == 0 and a.budget.held[klass] == 0
