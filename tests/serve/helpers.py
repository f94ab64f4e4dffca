"""Shared helpers for the serve tests: configs, an in-process service, unix-socket clients, commitments."""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature

from agent.config import AgentConfig

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "agent.cli"]


def make_cfg(tmp: Path, sim_dir: Path, **serve: Any) -> AgentConfig:
    cfg = AgentConfig()
    cfg.quote.source = "simulated"
    cfg.quote.simulated_state_dir = str(sim_dir)
    cfg.gpu.emulate = "h100x2"
    cfg.tpm.mode = "off"
    cfg.log.format = "json"
    s = cfg.serve
    s.compat_socket = str(tmp / "compat" / "attestation.sock")
    s.chute_socket = str(tmp / "chute" / "chutes.sock")
    s.cert_path = str(tmp / "certs" / "server.crt")
    s.key_path = str(tmp / "certs" / "server.key")
    s.handoff_cert_path = str(tmp / "proxy-tls" / "server.crt")  # absent: self-signed unless a test adds them
    s.handoff_key_path = str(tmp / "proxy-tls" / "server.key")
    s.vm_root_ca_path = str(tmp / "vm-root-ca" / "ca.crt")
    s.boot_status_path = str(tmp / "boot-status.json")
    s.validator_hosts = ["api.chutes.ai"]
    for k, v in serve.items():  # "section__key" names another section's key
        section, _, key = k.rpartition("__")
        setattr(getattr(cfg, section) if section else s, key, v)
    return cfg


def toml_for(cfg: AgentConfig) -> str:
    """The same configuration as a TOML file (for subprocess tests)."""
    import dataclasses
    import json

    lines = []
    for section in ("quote", "gpu", "tpm", "serve", "log"):
        lines.append(f"[{section}]")
        for f in dataclasses.fields(getattr(cfg, section)):
            v = getattr(getattr(cfg, section), f.name)
            lines.append(f"{f.name} = {json.dumps(v) if not isinstance(v, bool) else str(v).lower()}")
    return "\n".join(lines) + "\n"


def spki_sha256_of(cert_path: str) -> bytes:
    """Independent of agent code: SHA-256 of the DER SubjectPublicKeyInfo."""
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).digest()


def report_data_of(quote: bytes) -> bytes:
    """REPORTDATA of a v4 TDX quote: header 48 bytes + TD body offset 520, 64 bytes (tdx-quote.md)."""
    return quote[48 + 520: 48 + 584]


@contextlib.asynccontextmanager
async def unix_client(path: str, limit: int = 100) -> AsyncIterator[aiohttp.ClientSession]:
    conn = aiohttp.UnixConnector(path=path, limit=limit)
    async with aiohttp.ClientSession(connector=conn, base_url="http://localhost") as session:
        yield session


# -- rint commitments, built here with cryptography only ---------------------------------------------

def v3_commitment(issued_hex: str, *, key: ec.EllipticCurvePrivateKey | None = None,
                  lib_fp: bytes | None = None, nonce_override: bytes | None = None) -> str:
    key = key or ec.generate_private_key(ec.SECP256K1())
    lib_fp = lib_fp if lib_fp is not None else os.urandom(16)
    pub = key.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)[1:]
    nonce = nonce_override if nonce_override is not None else \
        hashlib.sha256(b"rint-nonce-v3" + lib_fp + issued_hex.encode()).digest()[:16]
    digest = hashlib.sha256(b"\x03" + pub + nonce + lib_fp).digest()
    r, s = decode_dss_signature(key.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256()))))
    sig = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    blob = b"\x03\x03" + pub + nonce + lib_fp + sig
    assert len(blob) == 162
    return blob.hex()


def v4_commitment(issued_hex: str, *, key: ed25519.Ed25519PrivateKey | None = None,
                  lib_proof: bytes | None = None, nonce_override: bytes | None = None) -> str:
    key = key or ed25519.Ed25519PrivateKey.generate()
    lib_proof = lib_proof if lib_proof is not None else os.urandom(32)
    pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    nonce = nonce_override if nonce_override is not None else bytes.fromhex(issued_hex)
    sig = key.sign(b"\x04" + pub + nonce + lib_proof)
    blob = b"\x04\x04" + pub + nonce + lib_proof + sig
    assert len(blob) == 146
    return blob.hex()


def flip(hex_text: str, byte_index: int) -> str:
    raw = bytearray.fromhex(hex_text)
    raw[byte_index] ^= 0x01
    return raw.hex()
