"""Runtime-integrity ("rint") nonces and commitment checks; pure protocol logic, no I/O.

Commitment layouts (chutes-protocol.md §7.1, §7.2):

- v3, 162 bytes: ``03 03`` ‖ secp256k1 pubkey x‖y (64) ‖ nonce (16) ‖ lib_fp (16) ‖ ECDSA r‖s (64) over
  SHA-256(version ‖ pubkey ‖ nonce ‖ lib_fp); nonce = SHA-256("rint-nonce-v3" ‖ lib_fp ‖ issued nonce as
  32 ASCII hex)[:16].
- v4, 146 bytes: ``04 04`` ‖ Ed25519 pubkey (32) ‖ nonce (16) ‖ lib_proof (32) ‖ Ed25519 signature (64) over
  version ‖ pubkey ‖ nonce ‖ lib_proof (signed directly). The public validator checks format and signature
  only and never compares the embedded nonce; so does the default here (``rint.v4_nonce = "validator"``,
  the answer says ``nonce_bound``), while ``"exact"`` requires it to equal the issued nonce's 16 bytes.
  Before OpenSSL sees a v4 signature, the key and the signature must be canonical (y < p, S < L) and
  neither the key nor R may be one of the 8 small-order points: the identity key with R = identity and
  S = 0 "verifies" any message.

Nonces are one-time, scoped to the caller that asked for them, and consumed by a single synchronous
``dict.pop`` on the event loop: of any number of concurrent verifies, exactly one sees the nonce.
"""

from __future__ import annotations

import hashlib
import math
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature

from agent.errors import BadInputError
from agent.serve.admission import ClassBudget, Partition
from agent.serve.errors import ApiError
from agent.serve.peer import CONTAINER, HOST, UNIDENTIFIED, class_of_scope

NONCE_BYTES = 16
V3_LEN = 162
V4_LEN = 146
V3_NONCE_TAG = b"rint-nonce-v3"
_SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
#: Ed25519 field prime and group order (RFC 8032 §5.1).
_ED_P = 2**255 - 19
_ED_L = 2**252 + 27742317777372353535851937790883648493
V4_NONCE_MODES = ("validator", "exact")


def _ed25519_small_order_encodings() -> frozenset[bytes]:
    """Every 32-byte encoding of the 8 small-order points (the curve's 8-torsion), canonical or not.

    The points: identity (0, 1); (0, -1) of order 2; (±sqrt(-1), 0) of order 4; and the four of order 8,
    whose y satisfies y² = (-1 ± sqrt(1 + d)) / d (from 2P = (±sqrt(-1), 0)). Each is listed with its
    sign bit, with the "negative zero" sign bit where x = 0, and with y + p where that still fits in
    255 bits. A blocklist of constants derived at import, not a curve implementation.
    """
    p = _ED_P
    d = (-121665 * pow(121666, -1, p)) % p
    sqrt_m1 = pow(2, (p - 1) // 4, p)

    def sqrt(a: int) -> int | None:
        r = pow(a, (p + 3) // 8, p)
        if r * r % p != a % p:
            r = r * sqrt_m1 % p
        return r if r * r % p == a % p else None

    points: set[tuple[int, int]] = {(0, 1), (0, p - 1), (sqrt_m1, 0), (p - sqrt_m1, 0)}
    root = sqrt((1 + d) % p)
    assert root is not None
    for s in (root, p - root):
        y2 = (-1 + s) * pow(d, -1, p) % p
        y = sqrt(y2)
        if y is None:
            continue
        for yy in (y, p - y):
            x = sqrt((yy * yy - 1) * pow(d * yy * yy + 1, -1, p) % p)
            assert x is not None
            points |= {(x, yy), ((p - x) % p, yy)}
    assert len(points) == 8
    out: set[bytes] = set()
    for x, y in points:
        for y_enc in (y, y + p):
            if y_enc >= 2**255:
                continue
            signs = (0, 1) if x == 0 else (x & 1,)
            out |= {(y_enc | (sign << 255)).to_bytes(32, "little") for sign in signs}
    return frozenset(out)


ED25519_SMALL_ORDER = _ed25519_small_order_encodings()


def ed25519_point_problem(enc: bytes) -> str | None:
    """"non_canonical" (y >= p, or x = 0 with the sign bit set), "small_order", or None."""
    y = int.from_bytes(enc, "little") & ((1 << 255) - 1)
    if y >= _ED_P or (enc[31] & 0x80 and y in (1, _ED_P - 1)):
        return "non_canonical"
    if enc in ED25519_SMALL_ORDER:
        return "small_order"
    return None


def ed25519_strict_problem(pubkey: bytes, signature: bytes) -> str | None:
    """The reason a v4 key/signature pair is refused before verification, or None (RFC 8032 §5.1.7 plus
    the small-order rules libsodium applies): ``non_canonical_pubkey``, ``small_order_pubkey``,
    ``non_canonical_signature`` (R not canonical or S >= L), ``small_order_signature`` (R small order)."""
    problem = ed25519_point_problem(pubkey)
    if problem:
        return f"{problem}_pubkey"
    r_problem = ed25519_point_problem(signature[:32])
    if r_problem == "non_canonical" or int.from_bytes(signature[32:], "little") >= _ED_L:
        return "non_canonical_signature"
    if r_problem == "small_order":
        return "small_order_signature"
    return None


class CommitmentFormatError(BadInputError, ValueError):
    """The commitment is hex of the wrong length/prefix/version; ``reason`` is a stable code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class Commitment:
    """A parsed commitment; ``proof`` is lib_fp (v3, 16 bytes) or lib_proof (v4, 32 bytes)."""

    version: int
    pubkey: bytes
    nonce: bytes
    proof: bytes
    signature: bytes

    @property
    def signed_message(self) -> bytes:
        return bytes([self.version]) + self.pubkey + self.nonce + self.proof

    def fields(self) -> dict[str, object]:
        proof_name = "lib_fp" if self.version == 3 else "lib_proof"
        return {
            "version": self.version,
            "pubkey": self.pubkey.hex(),
            "nonce": self.nonce.hex(),
            proof_name: self.proof.hex(),
            "signature": self.signature.hex(),
        }


def parse_commitment(text: str) -> Commitment:
    """Parse the hex commitment; raises :class:`CommitmentFormatError` (a 200/valid=false case)."""
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise CommitmentFormatError("not_hex", "commitment is not hex") from None
    if len(raw) < 2:
        raise CommitmentFormatError("bad_length", f"commitment is {len(raw)} bytes")
    prefix, version = raw[0], raw[1]
    if prefix != version or prefix not in (3, 4):
        raise CommitmentFormatError(
            "unsupported_version", f"commitment prefix/version {prefix:02x} {version:02x}, expected 03 03 or 04 04"
        )
    want = V3_LEN if version == 3 else V4_LEN
    if len(raw) != want:
        raise CommitmentFormatError("bad_length", f"v{version} commitment is {len(raw)} bytes, expected {want}")
    if version == 3:
        return Commitment(3, raw[2:66], raw[66:82], raw[82:98], raw[98:162])
    return Commitment(4, raw[2:34], raw[34:50], raw[50:82], raw[82:146])


def expected_nonce(version: int, issued_hex: str, proof: bytes) -> bytes:
    """The 16 nonce bytes a commitment for ``issued_hex`` must embed."""
    if version == 3:
        return hashlib.sha256(V3_NONCE_TAG + proof + issued_hex.encode("ascii")).digest()[:NONCE_BYTES]
    return bytes.fromhex(issued_hex)


def check_signature(c: Commitment) -> bool:
    """True when the commitment's signature verifies under its own embedded key (v4: strict keys only)."""
    if c.version == 4 and ed25519_strict_problem(c.pubkey, c.signature):
        return False
    try:
        if c.version == 3:
            r = int.from_bytes(c.signature[:32], "big")
            s = int.from_bytes(c.signature[32:], "big")
            if not (0 < r < _SECP256K1_N and 0 < s < _SECP256K1_N):
                return False
            pub = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256K1(), b"\x04" + c.pubkey)
            digest = hashlib.sha256(c.signed_message).digest()
            pub.verify(encode_dss_signature(r, s), digest, ec.ECDSA(Prehashed(hashes.SHA256())))
        else:
            ed25519.Ed25519PublicKey.from_public_bytes(c.pubkey).verify(c.signature, c.signed_message)
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass(frozen=True)
class VerifyResult:
    valid: bool
    reason: str
    commitment: Commitment | None = None
    #: Whether the embedded nonce is the one derived from the issued nonce (None: not parsed).
    nonce_bound: bool | None = None

    def as_json(self) -> dict[str, object]:
        out: dict[str, object] = {"valid": self.valid, "reason": self.reason}
        if self.nonce_bound is not None:
            out["nonce_bound"] = self.nonce_bound
        if self.commitment is not None:
            out["commitment"] = self.commitment.fields()
        return out


def verify_commitment(commitment_hex: str, issued_hex: str, *, v4_nonce: str = "validator") -> VerifyResult:
    """Check a commitment against an issued nonce that the caller has already consumed.

    v3 always requires the derived nonce. v4 follows ``v4_nonce``: "validator" checks format and
    signature only (a commitment whose nonce is derived differently stays valid, with
    ``nonce_bound: false``); "exact" refuses it as ``nonce_mismatch``.
    """
    if v4_nonce not in V4_NONCE_MODES:
        raise ValueError(f"v4_nonce: expected one of {', '.join(V4_NONCE_MODES)}, got {v4_nonce!r}")
    try:
        c = parse_commitment(commitment_hex)
    except CommitmentFormatError as exc:
        return VerifyResult(False, exc.reason)
    bound = secrets.compare_digest(c.nonce, expected_nonce(c.version, issued_hex, c.proof))
    if not bound and (c.version == 3 or v4_nonce == "exact"):
        return VerifyResult(False, "nonce_mismatch", c, nonce_bound=False)
    if c.version == 4:
        problem = ed25519_strict_problem(c.pubkey, c.signature)
        if problem:
            return VerifyResult(False, problem, c, nonce_bound=bound)
    if not check_signature(c):
        return VerifyResult(False, "bad_signature", c, nonce_bound=bound)
    return VerifyResult(True, "ok", c, nonce_bound=bound)


def iso_utc(epoch: float) -> str:
    """ISO-8601 UTC with second precision, like the validator's ``expires_at``."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class _HexNonces:
    """Fresh 32-hex nonces from ``os.urandom``, drawn 256 at a time: one getrandom() call per 256
    nonces instead of one per request. Each is handed out once; a forked child starts empty."""

    def __init__(self, nbytes: int, batch: int = 256) -> None:
        self._width = 2 * nbytes
        self._batch = batch
        self._pool: list[str] = []
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._pool.clear)

    def __call__(self) -> str:
        pool = self._pool
        if not pool:
            raw = os.urandom(self._batch * self._width // 2).hex()
            w = self._width
            pool.extend(raw[i:i + w] for i in range(0, len(raw), w))
        return pool.pop()


_fresh_nonce = _HexNonces(NONCE_BYTES)


class NonceStoreFull(ApiError):
    """Every live-nonce slot is taken: 503 with Retry-After (when the oldest live nonce expires)."""

    def __init__(self, total: int, retry_after_s: float) -> None:
        super().__init__(503, "nonce_store_full", f"rint nonce store full ({total} live nonces); retry later",
                         headers={"Retry-After": str(max(1, math.ceil(retry_after_s)))})


class NonceStore:
    """One-time nonces with a TTL, scoped per caller, bounded per caller, per caller class and overall.

    ``consume`` answers "ok", "unknown_nonce", "replayed" or "expired"; a nonce issued to another scope
    reads as unknown and is left alone (a neighbour cannot burn it). Over ``per_scope`` a caller's own
    oldest nonce goes; when its class has no room left ``issue`` raises :class:`NonceStoreFull` (503)
    instead of evicting anyone else's nonce.

    Capacity is partitioned by caller class (:mod:`agent.serve.admission`, as connections are): containers
    are guaranteed a quarter of ``max_total``, host processes a sixteenth, unidentified callers (one scope)
    their one ``per_scope`` share (at most a sixteenth) and never more; the rest is pooled for containers
    and host processes. Inside a class the last :attr:`reserved` nonces it can still take go only to
    callers holding none, so a container that never asked still gets one while others hold all they may.

    Memory bound (CPython 3.11, 64-bit, measured with tracemalloc): one live nonce costs about 275 bytes
    (32-hex key str 81, (scope, expiry) tuple 56 + float 24, the ``_live`` dict slot, the per-scope
    OrderedDict entry), up to about 410 bytes when every nonce belongs to a different scope (each scope's
    OrderedDict). A remembered spent nonce costs about 250-260 bytes (bound used: 280). Worst case with the defaults
    (``max_total`` 65,536, ``replay_memory`` 65,536)::

        65,536 x 410 B + 65,536 x 280 B = 26.9 MB + 18.4 MB ~= 45 MB

    under a tenth of the unit's ``MemoryMax=500M``; the old uncapped default (1,000,000 live nonces,
    ~284 MiB) did not fit beside the rest of the service. ``tests/serve/test_hostile_nonces.py`` checks
    the per-entry figure and that the cap holds.
    """

    #: Upper bounds per entry used in the arithmetic above (bytes).
    LIVE_ENTRY_BYTES = 410
    SPENT_ENTRY_BYTES = 280

    def __init__(
        self, ttl_s: float, per_scope: int, *, max_total: int = 65536, replay_memory: int = 65536,
        clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
    ) -> None:
        self.ttl_s = ttl_s
        self.per_scope = per_scope
        self.max_total = max_total
        self._clock = clock
        self._wall = wall
        self._live: dict[str, tuple[str, float]] = {}  # nonce -> (scope, monotonic expiry)
        self._by_scope: dict[str, OrderedDict[str, None]] = {}
        self._spent: OrderedDict[str, tuple[str, float]] = OrderedDict()  # recently spent -> (reason, expiry)
        self._replay_memory = replay_memory
        self.issued = 0
        self.consumed = 0
        self.evicted = 0
        self.refused_full = 0
        self.budget = ClassBudget(Partition.split(max_total, containers=max_total // 4, host=max_total // 16,
                                                  unidentified=min(per_scope, max_total // 16)))
        #: Nonces of each identified class that only callers holding none may take (the unidentified
        #: lane is one caller).
        self.reserved = {CONTAINER: max_total // 32, HOST: max_total // 32, UNIDENTIFIED: 0}
        self._iso: tuple[int, str] = (-1, "")  # expires_at text per whole second (strftime is not free)

    def __len__(self) -> int:
        return len(self._live)

    def live_for(self, scope: str) -> int:
        """Live nonces issued to ``scope``."""
        owned = self._by_scope.get(scope)
        return len(owned) if owned else 0

    def issue(self, scope: str) -> tuple[str, str]:
        """A fresh nonce for ``scope`` -> (32 hex, expires_at ISO-8601 UTC); :class:`NonceStoreFull` at the cap."""
        owned = self._by_scope.get(scope)
        klass = class_of_scope(scope)
        if not (owned and len(owned) >= self.per_scope) and not self._room(klass, owned):  # (at its cap: rotates)
            self.purge_expired()
            owned = self._by_scope.get(scope)
            if not self._room(klass, owned):
                self.refused_full += 1
                oldest = next(iter(self._live.values()))[1] if self._live else self._clock() + self.ttl_s
                raise NonceStoreFull(len(self._live), oldest - self._clock())
        nonce = _fresh_nonce()
        expiry = self._clock() + self.ttl_s
        self._live[nonce] = (scope, expiry)
        self.budget.take(klass)
        if owned is None:
            owned = self._by_scope[scope] = OrderedDict()
        owned[nonce] = None
        if len(owned) > self.per_scope:
            self._drop(next(iter(owned)))
        self.issued += 1
        second = int(self._wall() + self.ttl_s)
        if self._iso[0] != second:
            self._iso = (second, iso_utc(second))
        return nonce, self._iso[1]

    def _room(self, klass: str, owned: OrderedDict[str, None] | None) -> bool:
        return self.budget.free(klass) > (self.reserved[klass] if owned else 0)

    def _drop(self, nonce: str) -> None:
        entry = self._live.pop(nonce, None)
        if entry is None:
            return
        self.budget.give(class_of_scope(entry[0]))
        owned = self._by_scope.get(entry[0])
        if owned is not None:
            owned.pop(nonce, None)
            if not owned:
                del self._by_scope[entry[0]]
        self.evicted += 1

    def _remember_spent(self, nonce: str, reason: str, expiry: float) -> None:
        self._spent[nonce] = (reason, expiry)
        if len(self._spent) > self._replay_memory:
            self._spent.popitem(last=False)

    def consume(self, nonce: str, scope: str) -> str:
        """Take the nonce out of the store (atomically on the event loop) and say why if it can't be."""
        entry = self._live.get(nonce)
        if entry is None:
            spent = self._spent.get(nonce)
            return spent[0] if spent is not None else "unknown_nonce"
        owner, expiry = entry
        if owner != scope:
            return "unknown_nonce"
        del self._live[nonce]
        self.budget.give(class_of_scope(owner))
        owned = self._by_scope.get(owner)
        if owned is not None:
            owned.pop(nonce, None)
            if not owned:
                del self._by_scope[owner]
        if self._clock() > expiry:
            self._remember_spent(nonce, "expired", expiry)
            return "expired"
        self._remember_spent(nonce, "replayed", expiry)
        self.consumed += 1
        return "ok"

    def purge_expired(self) -> int:
        """Drop every expired nonce (run periodically); returns how many went."""
        now = self._clock()
        gone = [n for n, (_, exp) in self._live.items() if exp < now]
        for n in gone:
            expiry = self._live[n][1]
            self._drop(n)
            self._remember_spent(n, "expired", expiry)
        self.evicted -= len(gone)
        while self._spent:
            _reason, exp = next(iter(self._spent.values()))
            if exp + self.ttl_s >= now:
                break
            self._spent.popitem(last=False)
        return len(gone)
