"""Typed views of the validator's JSON answers (chutes-protocol.md §2.3, §2.5, §2.7).

Parsing is strict about the fields the agent uses and tolerant of extra ones: newer validator
generations add fields (``luks_quote_nonce``, ``root_next``, ...), which are kept and recorded by
name, never by value. Secret fields are wrapped in :class:`agent.log.Secret` at once.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from agent.log import Secret
from agent.validator.errors import ValidatorError, ValidatorProtocolError
from agent.validator.proof import validator_ss58_problem

_HEX64 = re.compile(r"[0-9a-f]{64}")
_DECODER = json.JSONDecoder()

#: Fields of ``BootAttestationResponse`` across validator generations (names only are recorded).
KNOWN_BOOT_FIELDS = ("key", "boot_token", "luks_quote_nonce", "root_next", "root_confirm_nonce", "vm_auth_ss58")


def parse_json_object(endpoint: str, body: bytes) -> dict[str, Any]:
    """Decode a JSON object body, or raise a protocol error that says what was wrong (never the body)."""
    try:
        text = body.decode("utf-8")
        data, end = _DECODER.raw_decode(text, len(text) - len(text.lstrip(" \t\n\r")))
    except UnicodeDecodeError:
        raise ValidatorProtocolError(endpoint, f"body is not UTF-8 ({len(body)} bytes)") from None
    except json.JSONDecodeError as exc:
        raise ValidatorProtocolError(
            endpoint, f"body is not JSON ({exc.msg} at char {exc.pos}, {len(body)} bytes)") from None
    except RecursionError:
        raise ValidatorProtocolError(endpoint, f"body nests too deeply ({len(body)} bytes)") from None
    if text[end:].strip(" \t\n\r"):
        raise ValidatorProtocolError(
            endpoint, f"trailing data after the JSON object ({len(text) - end} characters from char {end})")
    if not isinstance(data, dict):
        raise ValidatorProtocolError(endpoint, f"body is JSON {type(data).__name__}, expected an object")
    return data


def _str_field(endpoint: str, data: dict[str, Any], name: str, *, required: bool = True) -> str | None:
    value = data.get(name)
    if value is None:
        if required:
            raise ValidatorProtocolError(endpoint, f"field {name!r} missing")
        return None
    if not isinstance(value, str) or not value:
        raise ValidatorProtocolError(endpoint, f"field {name!r} must be a non-empty string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from "\ud800" escapes: not text, never usable as a key
        raise ValidatorProtocolError(endpoint, f"field {name!r} is not valid Unicode text") from None
    return value


@dataclass(frozen=True)
class NonceResponse:
    """``GET /servers/nonce`` → ``{"nonce": 64 lowercase hex, "expires_at": ISO-8601}``."""

    nonce: str
    expires_at: str

    @classmethod
    def parse(cls, body: bytes) -> NonceResponse:
        ep = "GET /servers/nonce"
        data = parse_json_object(ep, body)
        nonce = _str_field(ep, data, "nonce")
        assert nonce is not None
        if not _HEX64.fullmatch(nonce):
            raise ValidatorProtocolError(
                ep, f"field 'nonce' must be 64 lowercase hex characters (got {len(nonce)} chars)")
        expires = _str_field(ep, data, "expires_at", required=False) or ""
        return cls(nonce=nonce, expires_at=expires)


@dataclass
class BootAttestationResponse:
    """``POST /servers/boot/attestation`` → root ``key`` plus, by generation, ``boot_token`` or newer fields."""

    key: Secret
    boot_token: Secret | None
    luks_quote_nonce: str | None = None
    root_next: Secret | None = None
    root_confirm_nonce: str | None = None
    vm_auth_ss58: str | None = None
    #: Every top-level field name the validator sent (for boot-status.json; values never recorded).
    fields_seen: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, body: bytes) -> BootAttestationResponse:
        ep = "POST /servers/boot/attestation"
        data = parse_json_object(ep, body)
        key = _str_field(ep, data, "key")
        boot_token = _str_field(ep, data, "boot_token", required=False)
        luks_quote_nonce = _str_field(ep, data, "luks_quote_nonce", required=False)
        if boot_token is None and luks_quote_nonce is None:
            # Baseline validators send boot_token, >= 1.3.0 send luks_quote_nonce instead; one must be there.
            raise ValidatorProtocolError(ep, "field 'boot_token' missing (and no 'luks_quote_nonce' either)")
        root_next = _str_field(ep, data, "root_next", required=False)
        resp = cls(
            key=Secret(key or ""),
            boot_token=Secret(boot_token) if boot_token is not None else None,
            luks_quote_nonce=luks_quote_nonce,
            root_next=Secret(root_next) if root_next is not None else None,
            root_confirm_nonce=_str_field(ep, data, "root_confirm_nonce", required=False),
            vm_auth_ss58=_str_field(ep, data, "vm_auth_ss58", required=False),
            fields_seen=sorted(data),
        )
        data.clear()
        return resp

    def wipe(self) -> None:
        """Zero every secret this response holds."""
        for s in (self.key, self.boot_token, self.root_next):
            if s is not None:
                s.wipe()


@dataclass
class VolumeKeyResponse:
    """``GET``/``PUT /servers/{vm_name}/luks`` → ``{"passphrase": "…"}``."""

    passphrase: Secret

    @classmethod
    def parse(cls, endpoint: str, body: bytes) -> VolumeKeyResponse:
        data = parse_json_object(endpoint, body)
        value = _str_field(endpoint, data, "passphrase")
        data.clear()
        return cls(passphrase=Secret(value or ""))


_HEX128 = re.compile(r"[0-9a-f]{128}")
GENERATION_FIELDS = {"1.4": ("root_next", "vm_auth_ss58", "root_confirm_nonce"), "1.3": ("luks_quote_nonce",),
                     "1.2": ("boot_token",)}


def classify_generation(resp: BootAttestationResponse, pinned: str = "auto") -> str:
    """The generation the validator's answer speaks (reference §4, §10), checked field by field.

    ``root_next``/``vm_auth_ss58`` → 1.4 (``key``, ``luks_quote_nonce``, ``vm_auth_ss58`` missing → retry,
    a ``root_*`` field missing → stop); ``luks_quote_nonce`` → 1.3; ``boot_token`` → 1.2. Raises
    :class:`ValidatorProtocolError` (the retry loop tries again) or :class:`GenerationError` (stop).
    """
    ep = "POST /servers/boot/attestation"
    if resp.root_next is not None or resp.vm_auth_ss58 is not None or resp.root_confirm_nonce is not None:
        gen = "1.4"
        if resp.luks_quote_nonce is None or resp.vm_auth_ss58 is None:
            missing = [n for n in ("luks_quote_nonce", "vm_auth_ss58") if getattr(resp, n) is None]
            raise ValidatorProtocolError(ep, f"1.4.0 answer without {', '.join(missing)}")
        if resp.root_next is None or resp.root_confirm_nonce is None:
            missing = [n for n in ("root_next", "root_confirm_nonce") if getattr(resp, n) is None]
            raise GenerationError(f"1.4.0 answer without {', '.join(missing)}: root rotation impossible")
        if not _HEX128.fullmatch(resp.root_next.reveal().decode("ascii", "replace")):
            raise GenerationError("field 'root_next' must be 128 lowercase hex characters")
        if not _HEX64.fullmatch(resp.root_confirm_nonce):
            raise GenerationError("field 'root_confirm_nonce' must be 64 lowercase hex characters")
        # The full rule (shape, prefix 42, blake2b checksum) here, before the root rotation: a typo'd
        # validator address found only at write-validator-auth would stop the boot after the rotation.
        problem = validator_ss58_problem(resp.vm_auth_ss58)
        if problem is not None:
            raise GenerationError(f"field 'vm_auth_ss58' is not a valid SS58 address: {problem}")
    elif resp.luks_quote_nonce is not None:
        gen = "1.3"
    elif resp.boot_token is not None:
        gen = "1.2"
        if not _HEX64.fullmatch(resp.boot_token.reveal().decode("ascii", "replace")):
            raise ValidatorProtocolError(ep, "field 'boot_token' must be 64 lowercase hex characters")
    else:  # parse() already refuses this; kept so the rule reads whole here
        raise GenerationError(f"answer fits no generation (fields: {', '.join(resp.fields_seen) or 'none'})")
    if resp.luks_quote_nonce is not None and not _HEX64.fullmatch(resp.luks_quote_nonce):
        raise ValidatorProtocolError(ep, "field 'luks_quote_nonce' must be 64 lowercase hex characters")
    if pinned != "auto" and gen != pinned:
        raise GenerationError(f"boot.protocol = {pinned!r} but the validator answered as {gen} "
                              f"(fields: {', '.join(resp.fields_seen)})")
    return gen


class GenerationError(ValidatorError):
    """The answer is complete JSON but belongs to no usable generation (or not the pinned one): stop."""

    #: The retry helper stops at once on errors marked final (a retry gets the same answer).
    final = True


@dataclass
class VolumeAnswer:
    """One volume of ``luks/attest`` / ``provision``: ``current`` (None on first use) and ``next``."""

    current: Secret | None
    next: Secret | None


@dataclass
class StorageKeysResponse:
    """``/luks/attest`` (1.3.x), ``/provision`` (1.4.0): volume keys, confirm nonce, k3s key (reference §5)."""

    volumes: dict[str, VolumeAnswer]
    confirm_nonce: str | None
    k3s_encryption_key: Secret | None

    @classmethod
    def parse(cls, endpoint: str, body: bytes, labels: tuple[str, ...]) -> StorageKeysResponse:
        data = parse_json_object(endpoint, body)
        try:
            vols = data.get("volumes")
            if not isinstance(vols, dict):
                raise ValidatorProtocolError(endpoint, "field 'volumes' missing or not an object")
            out: dict[str, VolumeAnswer] = {}
            for label in labels:
                entry = vols.get(label)
                if not isinstance(entry, dict):
                    raise ValidatorProtocolError(endpoint, f"field 'volumes.{label}' missing or not an object")
                cur = _str_field(endpoint, entry, "current", required=False)
                nxt = _str_field(endpoint, entry, "next", required=False)
                if cur is None and nxt is None:
                    raise ValidatorProtocolError(endpoint, f"volumes.{label}: neither 'current' nor 'next'")
                out[label] = VolumeAnswer(Secret(cur) if cur is not None else None,
                                          Secret(nxt) if nxt is not None else None)
                entry.clear()
            nonce = _str_field(endpoint, data, "confirm_nonce", required=False)
            if nonce is not None and not _HEX64.fullmatch(nonce):
                raise ValidatorProtocolError(endpoint, "field 'confirm_nonce' must be 64 lowercase hex characters")
            k3s = _str_field(endpoint, data, "k3s_encryption_key", required=False)
            return cls(out, nonce, Secret(k3s) if k3s is not None else None)
        finally:
            data.clear()

    def wipe(self) -> None:
        for v in self.volumes.values():
            for s in (v.current, v.next):
                if s is not None:
                    s.wipe()
        if self.k3s_encryption_key is not None:
            self.k3s_encryption_key.wipe()


@dataclass
class LegacyVolumesResponse:
    """≤1.2 ``POST /servers/{vm}/luks`` → ``{volume: passphrase}``."""

    passphrases: dict[str, Secret]

    @classmethod
    def parse(cls, endpoint: str, body: bytes, labels: tuple[str, ...]) -> LegacyVolumesResponse:
        data = parse_json_object(endpoint, body)
        try:
            out = {}
            for label in labels:
                value = _str_field(endpoint, data, label)
                out[label] = Secret(value or "")
            return cls(out)
        finally:
            data.clear()

    def wipe(self) -> None:
        for s in self.passphrases.values():
            s.wipe()


#: Per-volume ``result`` values of a confirm (reference §4.3 step 9; the validator's ``_promote``).
CONFIRM_RESULTS = ("promoted", "discarded", "no_pending")


@dataclass(frozen=True)
class ConfirmResponse:
    """``/provision/confirm`` (root or storage) and ``/luks/confirm`` answered 200:
    ``{"status": "confirmed", "volumes": {name: {"result": "promoted|discarded|no_pending"}}}``.

    Only this body proves what the validator did; a bare 200 does not (an HTML error page from a proxy,
    an empty or partial JSON body). ``parse`` raises :class:`ValidatorProtocolError` when the body is not
    a confirmation at all (not JSON, ``status`` not ``"confirmed"``, no ``volumes`` object). A volume
    the body does not name, or names with a ``result`` outside :data:`CONFIRM_RESULTS`, is left out of
    ``results``: nothing is proven for it.
    """

    results: dict[str, str]

    @classmethod
    def parse(cls, endpoint: str, body: bytes, volumes: tuple[str, ...]) -> ConfirmResponse:
        data = parse_json_object(endpoint, body)
        if data.get("status") != "confirmed":
            got = data.get("status")
            shown = repr(got)[:40] if isinstance(got, str) else ("missing" if got is None else type(got).__name__)
            raise ValidatorProtocolError(endpoint, f"field 'status' is {shown}, expected 'confirmed'")
        vols = data.get("volumes")
        if not isinstance(vols, dict):
            raise ValidatorProtocolError(endpoint, "field 'volumes' missing or not an object")
        results: dict[str, str] = {}
        for name in volumes:
            entry = vols.get(name)
            result = entry.get("result") if isinstance(entry, dict) else None
            if isinstance(result, str) and result in CONFIRM_RESULTS:
                results[name] = result
        return cls(results)

    def result(self, volume: str) -> str:
        """The proven result for ``volume``, or ``"unproven"``."""
        return self.results.get(volume, "unproven")
