"""sr25519 request proof of the 1.4.0 boot calls (chutes-vm-generations.md §3.5).

Every boot / provision / confirm call carries ``X-Chutes-Hotkey`` (the miner hotkey as SS58),
``X-Chutes-Nonce`` (that call's server nonce) and ``X-Chutes-Signature``: the lower-case hex of the
64-byte sr25519 signature over ``"{ss58}:{nonce}:{sha256hex(exact body bytes)}"``. The validator
rebuilds the message from the bytes it received, so the caller must send exactly the bytes it hashed.

Conventions (each a silent-failure trap if it drifts; all pinned by tests against published vectors):
Substrate seed expansion (``sr25519.pair_from_seed`` = schnorrkel ``ExpansionMode::Ed25519``), the
signing context ``substrate`` (built into py-sr25519-bindings), SS58 network prefix 42 with the
blake2b-512 checksum over ``"SS58PRE" ‖ payload``, and the 64-byte private key in schnorrkel's
``scalar ‖ nonce`` layout (what a bittensor hotkey file calls ``privateKey``).

Secret hygiene, honestly: the seed and the expanded secret are kept in ``bytearray`` objects that
:meth:`Hotkey.wipe` zeroes. The binding only accepts immutable ``bytes``, so each derivation and each
signature makes a short-lived ``bytes`` copy that Python cannot overwrite (it is freed, not cleared),
and the Rust side's own copies are outside our reach. A ``str`` handed to the parsers is immutable
too: pass ``bytes``/``bytearray`` read from the file (and wipe it) to keep the hex out of ``str``.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import NoReturn

import base58
import sr25519

from agent.errors import AgentError
from agent.exitcodes import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_USAGE
from agent.log import REDACTED

SS58_PREFIX = 42
SEED_LEN = 32
PRIVATE_KEY_LEN = 64
PUBLIC_KEY_LEN = 32
SIGNATURE_LEN = 64
_CHECKSUM_LEN = 2
_SS58_PRE = b"SS58PRE"
BASE58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_BASE58_SET = frozenset(BASE58_ALPHABET)
_HEX = {c: i for i, c in enumerate(b"0123456789abcdef")} | {c: i + 10 for i, c in enumerate(b"ABCDEF")}
_WHITESPACE = frozenset(b" \t\r\n\v\f")

HEADER_HOTKEY = "X-Chutes-Hotkey"
HEADER_NONCE = "X-Chutes-Nonce"
HEADER_SIGNATURE = "X-Chutes-Signature"


class ProofError(AgentError, ValueError):
    """Base class: ``str(exc)`` is one operator-readable line that never contains key material."""

    exit_code = EXIT_FAILED
    reason = "hotkey_proof"


class KeyMaterialError(ProofError):
    """A miner seed / private key that does not parse (length, prefix, non-hex, rejected by sr25519)."""

    exit_code = EXIT_USAGE
    reason = "miner_key_invalid"


class SS58Error(ProofError):
    """An SS58 address that does not decode (alphabet, length, network prefix, checksum)."""

    exit_code = EXIT_BAD_INPUT
    reason = "ss58_invalid"


class HotkeyMismatchError(ProofError):
    """The seed-derived hotkey differs from the config volume's ``miner-ss58``."""

    exit_code = EXIT_USAGE
    reason = "hotkey_mismatch"


class WipedKeyError(ProofError):
    """The hotkey was used after :meth:`Hotkey.wipe`."""

    reason = "hotkey_wiped"


# ── SS58 ──────────────────────────────────────────────────────────────────────


def _checksum(payload: bytes) -> bytes:
    return hashlib.blake2b(_SS58_PRE + payload, digest_size=64).digest()[:_CHECKSUM_LEN]


def ss58_encode(public_key: bytes, prefix: int = SS58_PREFIX) -> str:
    """``base58(prefix ‖ public key ‖ blake2b-512("SS58PRE" ‖ prefix ‖ public key)[:2])`` (simple prefix < 64)."""
    if len(public_key) != PUBLIC_KEY_LEN:
        raise SS58Error(f"public key: expected {PUBLIC_KEY_LEN} bytes, got {len(public_key)}")
    if not 0 <= prefix < 64:
        raise SS58Error(f"SS58 prefix {prefix}: only the one-byte prefixes 0-63 are supported")
    payload = bytes([prefix]) + bytes(public_key)
    return base58.b58encode(payload + _checksum(payload)).decode("ascii")


def ss58_decode(address: str) -> bytes:
    """The 32-byte public key of a prefix-42 SS58 address; :class:`SS58Error` says exactly what is wrong."""
    if not isinstance(address, str):
        raise SS58Error(f"SS58 address: expected text, got {type(address).__name__}")
    if not address:
        raise SS58Error("SS58 address is empty")
    for pos, ch in enumerate(address):
        if ch not in _BASE58_SET:
            raise SS58Error(f"SS58 address: character {ch!r} at position {pos} is not in the base58 alphabet")
    raw = base58.b58decode(address)
    expected = 1 + PUBLIC_KEY_LEN + _CHECKSUM_LEN
    if len(raw) != expected:
        raise SS58Error(f"SS58 address decodes to {len(raw)} bytes, expected {expected} "
                        "(prefix + 32-byte key + checksum)")
    if raw[0] != SS58_PREFIX:
        raise SS58Error(f"SS58 address has network prefix {raw[0]}, expected {SS58_PREFIX}")
    payload, checksum = raw[:-_CHECKSUM_LEN], raw[-_CHECKSUM_LEN:]
    if not hmac.compare_digest(_checksum(payload), checksum):
        raise SS58Error("SS58 address checksum mismatch (typo in the address?)")
    return payload[1:]


def validator_ss58_problem(text: object) -> str | None:
    """Why ``text`` is not a usable ``vm_auth_ss58`` (None: it is). The rule of :func:`is_valid_validator_ss58`.

    Checked where the boot answer arrives (:func:`agent.validator.schemas.classify_generation`), before
    any rotation, and again where ``validator-auth.env`` is written.
    """
    if not isinstance(text, str):
        return f"expected text, got {type(text).__name__}"
    if not 40 <= len(text) <= 50 or not text.startswith("5"):
        start = "" if text.startswith("5") else ", not starting with 5"
        return f"{len(text)} characters{start} (expected 40-50, starting with 5)"
    if not set(text) <= _BASE58_SET:
        return "a character outside the base58 alphabet"
    try:
        ss58_decode(text)
    except SS58Error as exc:
        return str(exc)
    return None


def is_valid_validator_ss58(text: str) -> bool:
    """§4.3 step 11: 40-50 characters, starts with ``5``, base58 alphabet only, and decodes as prefix 42.

    The shell rule alone lets a typo'd address through (the proxy would then reject every validator);
    the decode adds the checksum (blake2b-512 of ``"SS58PRE"`` ‖ prefix ‖ key, first 2 bytes). The value
    lands in an env file, so the alphabet check also keeps shell metacharacters and newlines out.
    """
    return validator_ss58_problem(text) is None


# ── Key material ─────────────────────────────────────────────────────────────


def _parse_hex(text: str | bytes | bytearray, nbytes: int, what: str) -> bytearray:
    """Strict key hex into a fresh ``bytearray``: surrounding whitespace trimmed, no ``0x``, exact length.

    Decoded by hand into a preallocated buffer so no intermediate ``bytes`` copy of the key exists; the
    errors name lengths and positions, never characters.
    """
    raw = text.encode("ascii", "replace") if isinstance(text, str) else text
    start, end = 0, len(raw)
    while start < end and raw[start] in _WHITESPACE:
        start += 1
    while end > start and raw[end - 1] in _WHITESPACE:
        end -= 1
    if end - start >= 2 and raw[start] == ord("0") and raw[start + 1] in (ord("x"), ord("X")):
        raise KeyMaterialError(f"{what}: must not have a 0x prefix")
    if end - start != 2 * nbytes:
        raise KeyMaterialError(f"{what}: expected {2 * nbytes} hex characters, got {end - start}")
    out = bytearray(nbytes)
    for i in range(nbytes):
        hi = _HEX.get(raw[start + 2 * i])
        lo = _HEX.get(raw[start + 2 * i + 1])
        if hi is None or lo is None:
            pos = 2 * i if hi is None else 2 * i + 1
            out[:] = bytes(nbytes)
            raise KeyMaterialError(f"{what}: non-hex character at position {pos}")
        out[i] = (hi << 4) | lo
    return out


class Hotkey:
    """The miner hotkey (sr25519 keypair) that signs the 1.4.0 boot calls.

    Holds the 64-byte expanded secret in a ``bytearray`` (wiped by :meth:`wipe`); ``repr``/``str`` show
    only the public SS58, and the object refuses to be pickled.
    """

    __slots__ = ("_public", "_secret", "_ss58")

    def __init__(self, public_key: bytes, secret: bytearray) -> None:
        self._public = bytes(public_key)
        self._secret = secret
        self._ss58 = ss58_encode(self._public)

    @classmethod
    def from_seed_hex(cls, text: str | bytes | bytearray) -> Hotkey:
        """From ``miner-seed``: 32-byte seed as 64 hex characters, no ``0x``, Substrate seed expansion."""
        seed = _parse_hex(text, SEED_LEN, "miner-seed")
        try:
            public, secret = sr25519.pair_from_seed(bytes(seed))
        except (TypeError, ValueError):
            raise KeyMaterialError("miner-seed: rejected by sr25519") from None
        finally:
            seed[:] = bytes(SEED_LEN)
        return cls(public, bytearray(secret))

    @classmethod
    def from_private_key_hex(cls, text: str | bytes | bytearray) -> Hotkey:
        """From ``miner-private-key``: the 64-byte sr25519 secret (scalar ‖ nonce) as 128 hex characters."""
        secret = _parse_hex(text, PRIVATE_KEY_LEN, "miner-private-key")
        try:
            public = sr25519.public_from_secret_key(bytes(secret))
        except (TypeError, ValueError):
            secret[:] = bytes(PRIVATE_KEY_LEN)
            raise KeyMaterialError("miner-private-key: not a valid sr25519 secret key") from None
        return cls(public, secret)

    @property
    def ss58(self) -> str:
        return self._ss58

    @property
    def public_key(self) -> bytes:
        return self._public

    @property
    def wiped(self) -> bool:
        return not self._secret

    def sign(self, message: bytes) -> bytes:
        """64-byte sr25519 signature (context ``substrate``; randomized: compare by verifying, never by bytes)."""
        if not self._secret:
            raise WipedKeyError("hotkey was wiped after the last signed call; it cannot sign again")
        sig: bytes = sr25519.sign((self._public, bytes(self._secret)), bytes(message))  # untyped binding
        return sig

    def wipe(self) -> None:
        """Zero and drop the secret (see the module docstring for what Python cannot reach)."""
        self._secret[:] = bytes(len(self._secret))
        self._secret.clear()

    def __repr__(self) -> str:
        return f"Hotkey(ss58={self._ss58!r}, secret={REDACTED})"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("Hotkey values cannot be pickled")


# ── The request proof ────────────────────────────────────────────────────────


def proof_message(ss58: str, nonce: str, body: bytes) -> bytes:
    """``"{ss58}:{nonce}:{sha256hex(body)}"`` as UTF-8 (what the validator's get_signing_message rebuilds)."""
    return f"{ss58}:{nonce}:{hashlib.sha256(body).hexdigest()}".encode()


def proof_headers(hotkey: Hotkey, nonce: str, body: bytes) -> dict[str, str]:
    """The three proof headers for one call; ``body`` must be the exact bytes that are sent."""
    signature = hotkey.sign(proof_message(hotkey.ss58, nonce, body))
    return {HEADER_HOTKEY: hotkey.ss58, HEADER_NONCE: nonce, HEADER_SIGNATURE: signature.hex()}


def verify_proof(ss58: str, nonce: str, body: bytes, signature_hex: str) -> bool:
    """True when ``signature_hex`` is a valid proof by ``ss58`` over ``nonce`` and ``body`` (the validator's side).

    Anything malformed (bad address, non-hex or wrong-length signature, a signature schnorrkel rejects)
    is simply ``False``: the caller answers 401 either way.
    """
    try:
        public = ss58_decode(ss58)
        signature = bytes.fromhex(signature_hex)
    except (SS58Error, ValueError, TypeError):
        return False
    if len(signature) != SIGNATURE_LEN:
        return False
    try:
        return bool(sr25519.verify(signature, proof_message(ss58, nonce, body), public))
    except (TypeError, ValueError):
        return False


def check_cross(hotkey: Hotkey, miner_ss58_text: str | None) -> None:
    """Cross-check the seed-derived hotkey against ``miner-ss58`` when the config volume has one.

    ≥1.4.0 the seed wins (AC): ``None``/blank text is no check. A ``miner-ss58`` that is present but
    malformed or different raises (fail closed): a typo'd config would otherwise boot under a hotkey the
    operator did not intend. Like ≤1.3 reads it, only the first 64 characters count.
    """
    if miner_ss58_text is None:
        return
    text = miner_ss58_text.strip()[:64].strip()
    if not text:
        return
    try:
        ss58_decode(text)
    except SS58Error as exc:
        raise HotkeyMismatchError(f"miner-ss58 is not a valid SS58 address: {exc}") from None
    if text != hotkey.ss58:
        raise HotkeyMismatchError(
            f"miner-ss58 {text} does not match the hotkey {hotkey.ss58} derived from the miner key"
        )
