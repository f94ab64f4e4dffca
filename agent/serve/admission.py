"""Who may hold a connection: one socket's capacity partitioned by caller class, fair per caller inside.

Callers come in three classes (:attr:`agent.serve.peer.Peer.caller_class`): containers, host processes
and unidentified callers. Capacity is split by a :class:`Partition`:

- each class has a *guaranteed* share no other class can take (containers and host processes: at most a
  quarter of the socket each; unidentified callers: their whole lane, ``serve.max_connections_unidentified``,
  at most a quarter);
- what no guarantee covers is a pool that containers and host processes share, first come; unidentified
  callers never use it, so however many of them connect they hold their lane and nothing more.

Inside a class (:class:`Admission`):

- one caller holds at most ``per_caller`` connections (an unidentified caller, keyed by the pid that
  connected: a quarter of the lane);
- the last ``reserved`` connections a class can still use go only to callers holding none there, so a
  new container gets in while its neighbours hold all they may;
- when a class has nothing left for a caller, an idle connection of the caller holding the most is closed
  to make room, provided that caller holds at least ``margin`` more than the newcomer would (2 for
  identified classes: only a caller holding two or more gives one up to one holding none; 1 in the
  unidentified lane, whose keys a caller can mint by forking). Only idle connections go (no request in
  progress or waiting): the caller that loses one loses a keep-alive connection, not an answer.

Everything here is bookkeeping on the event loop: counts per class and per caller key, no I/O, no clock.
The caller (:class:`agent.serve.gate.ServeGate`) owns the connections and does the closing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from agent.serve.peer import CALLER_CLASSES, CONTAINER, HOST, UNIDENTIFIED, Peer


@dataclass(frozen=True, slots=True)
class Partition:
    """``total`` units split into per-class guarantees (summing to at most ``total``) and per-class limits."""

    total: int
    guaranteed: Mapping[str, int]
    limit: Mapping[str, int]

    @property
    def pool(self) -> int:
        """Units no guarantee covers, shared by the classes whose limit reaches beyond their guarantee."""
        return self.total - sum(self.guaranteed.values())

    @classmethod
    def split(cls, total: int, *, containers: int, host: int, unidentified: int) -> Partition:
        """Guarantees of ``containers`` and ``host`` units and an ``unidentified`` lane, each clamped to a
        quarter of ``total`` (so at least a quarter is always pooled); unidentified callers get their lane
        and never the pool."""
        quarter = max(0, total) // 4
        g = {CONTAINER: min(max(0, containers), quarter), HOST: min(max(0, host), quarter),
             UNIDENTIFIED: min(max(0, unidentified), quarter)}
        return cls(total, g, {CONTAINER: total, HOST: total, UNIDENTIFIED: g[UNIDENTIFIED]})


class ClassBudget:
    """Units (connections, rint nonces) held per class against a :class:`Partition`.

    A class may always use what is left of its own guarantee; beyond it, whatever is left of the pool
    (up to its limit). ``take``/``give`` only count: the caller checks :meth:`free` first.
    """

    __slots__ = ("_pool_used", "held", "partition")

    def __init__(self, partition: Partition) -> None:
        self.partition = partition
        self.held: dict[str, int] = dict.fromkeys(CALLER_CLASSES, 0)
        self._pool_used = 0

    def free(self, klass: str) -> int:
        """Units ``klass`` may still take."""
        p, held = self.partition, self.held[klass]
        own = max(0, p.guaranteed[klass] - held)
        return max(0, min(p.limit[klass] - held, own + p.pool - self._pool_used))

    def take(self, klass: str) -> None:
        if self.held[klass] >= self.partition.guaranteed[klass]:
            self._pool_used += 1
        self.held[klass] += 1

    def give(self, klass: str) -> None:
        self.held[klass] -= 1
        if self.held[klass] >= self.partition.guaranteed[klass]:
            self._pool_used -= 1


def caller_key(peer: Peer) -> str:
    """The key fairness inside a class is counted by: the scope; for an unidentified caller (one shared
    scope) the pid that connected, the only thing that tells such callers apart."""
    return peer.scope if peer.identified else f"pid:{peer.pid}"


@dataclass(frozen=True, slots=True)
class Refusal:
    reason: str
    limit: int
    held: int


class Admission:
    """Connections held per class and per caller key on one socket, and the decision for a new one."""

    def __init__(self, partition: Partition, *, per_caller: int, reserved: int) -> None:
        self.budget = ClassBudget(partition)
        lane = partition.limit[UNIDENTIFIED]
        self.per_caller = {CONTAINER: per_caller, HOST: per_caller, UNIDENTIFIED: max(1, lane // 4)}
        quarter = partition.total // 4
        self.reserved = {CONTAINER: min(reserved, quarter), HOST: min(reserved, quarter), UNIDENTIFIED: 0}
        self.margin = {CONTAINER: 2, HOST: 2, UNIDENTIFIED: 1}
        self._keys: dict[str, dict[str, int]] = {c: {} for c in CALLER_CLASSES}  # class -> key -> held

    def held_by(self, klass: str, key: str) -> int:
        return self._keys[klass].get(key, 0)

    def admit(self, klass: str, key: str, evict: Callable[[str, str], bool]) -> Refusal | None:
        """Take a slot for ``key`` (None) or say why not. ``evict(klass, victim_key)`` closes one idle
        connection of that caller and calls :meth:`release` for it (True), or finds none (False)."""
        keys = self._keys[klass]
        held = keys.get(key, 0)
        cap = self.per_caller[klass]
        if held >= cap:
            return Refusal("per-caller connection cap reached" if klass != UNIDENTIFIED
                           else "unidentified-caller cap reached", cap, held)
        floor = self.reserved[klass] if held else 0
        if self.budget.free(klass) <= floor and not self._evict_for(klass, key, held, evict):
            if floor and self.budget.free(klass):
                return Refusal("remaining connections are reserved for callers holding none", floor, held)
            return Refusal(f"connections for {klass} callers are all taken", self.budget.partition.limit[klass],
                           held)
        self.budget.take(klass)
        keys[key] = held + 1
        return None

    def _evict_for(self, klass: str, key: str, held: int, evict: Callable[[str, str], bool]) -> bool:
        """Make room for ``key`` by closing an idle connection of a caller holding ``margin`` more."""
        need = held + self.margin[klass]
        victims = sorted(((n, k) for k, n in self._keys[klass].items() if n >= need and k != key), reverse=True)
        return any(evict(klass, k) for _, k in victims)

    def release(self, klass: str, key: str) -> None:
        """A connection admitted for ``key`` is gone (closed, evicted, or its transport never made)."""
        keys = self._keys[klass]
        held = keys.get(key, 0) - 1
        if held < 0:
            return
        self.budget.give(klass)
        if held:
            keys[key] = held
        else:
            del keys[key]
