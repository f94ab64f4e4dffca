"""Simulated NVIDIA GPU attestation: a device certificate chain under its own simulated root, and
SPDM GET_MEASUREMENTS reports in the real layout, signed with ECDSA P-384 for any nonce.

Real samples carry fixed nonces, so tests with fresh nonces (and the demo) need a device that can
answer any nonce. These reports parse with the production parser and verify with the production
verifier **only against the simulated root**; against NVIDIA's pinned root the chain check fails,
so simulated evidence can never pass as real. Nothing here is imported by production code paths
unless emulation is explicitly configured (``gpu.emulate``).

Keys are derived deterministically from a seed, so two processes (the agent and a test verifier)
agree on the simulated root without sharing files. The default seed is public: never trust it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import struct
from dataclasses import dataclass, field
from functools import cached_property

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from agent.evidence.spdm import OPAQUE_CODES, SPDM_REQUEST_CODE, SPDM_RESPONSE_CODE

DEFAULT_SEED = b"chutes-attest simulated NVIDIA device identity (public seed, NOT TRUSTED)"
_P384_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973
_NOT_BEFORE = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
_NOT_AFTER = dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC)
_SHA384_OID_DER = bytes.fromhex("0609608648016503040202")
FWID_OID = x509.ObjectIdentifier("2.23.133.5.4.1")
ARCH_HOPPER, ARCH_BLACKWELL = 9, 10


@dataclass(frozen=True)
class GpuModel:
    """What NVML reports for one GPU model (values as seen on real boards)."""

    key: str
    name: str
    memory_total: int
    cuda_major: int
    cuda_minor: int
    max_graphics_clock_mhz: int
    arch: int
    chip: str
    driver_version: str
    vbios_version: str
    project: str
    project_sku: str
    chip_sku: str
    board_id: int


MODELS: dict[str, GpuModel] = {
    "h100": GpuModel("h100", "NVIDIA H100 80GB HBM3", 85520809984, 9, 0, 1980, ARCH_HOPPER, "GH100",
                     "550.90.07", "96.00.9f.00.01", "1010", "0200", "882", 0x3B1),
    "h200": GpuModel("h200", "NVIDIA H200", 150754820096, 9, 0, 1980, ARCH_HOPPER, "GH100",
                     "570.133.20", "96.00.a5.00.01", "G520", "0200", "885", 0x437),
    "b200": GpuModel("b200", "NVIDIA B200", 192265846784, 10, 0, 1965, ARCH_BLACKWELL, "GB100",
                     "575.32", "97.00.88.00.0f", "G525", "0200", "890", 0x500),
}


def derive_key(seed: bytes, label: str) -> ec.EllipticCurvePrivateKey:
    """A P-384 key that is a pure function of (seed, label)."""
    digest = hashlib.sha512(seed + b"\x00" + label.encode()).digest()
    return ec.derive_private_key(int.from_bytes(digest, "big") % (_P384_ORDER - 1) + 1, ec.SECP384R1())


def _name(cn: str, *, serial: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn), x509.NameAttribute(NameOID.ORGANIZATION_NAME,
                                                                              "SIMULATED (not NVIDIA)")]
    if serial:
        attrs.insert(0, x509.NameAttribute(NameOID.SERIAL_NUMBER, serial))
    return x509.Name(attrs)


def _cert(subject: x509.Name, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
          issuer_key: ec.EllipticCurvePrivateKey, serial: int, *, ca: bool,
          extra: list[x509.ExtensionType] | None = None) -> x509.Certificate:
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(_NOT_BEFORE)
        .not_valid_after(_NOT_AFTER)
        .add_extension(x509.KeyUsage(
            digital_signature=not ca, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
            encipher_only=False, decipher_only=False), critical=True)
    )
    if ca:
        b = b.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    for ext in extra or []:
        b = b.add_extension(ext, critical=False)
    return b.sign(issuer_key, hashes.SHA384())


def _der(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    ln = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(ln)]) + ln + content


def fwid_extension(leaf_public: ec.EllipticCurvePublicKey, fwid: bytes) -> x509.UnrecognizedExtension:
    """NVIDIA's Hopper TcbInfo layout: SEQUENCE { INTEGER 1, SPKI, SEQUENCE { sha384, OCTET STRING fwid } }."""
    spki = leaf_public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    body = _der(0x02, b"\x01") + spki + _der(0x30, _SHA384_OID_DER + _der(0x04, fwid))
    return x509.UnrecognizedExtension(FWID_OID, _der(0x30, body))


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


class SimulatedDeviceCA:
    """Simulated root -> identity -> provisioner ICA, shared by every simulated GPU of a seed."""

    def __init__(self, seed: bytes = DEFAULT_SEED) -> None:
        self.seed = seed
        self._root_key = derive_key(seed, "root")
        self._ident_key = derive_key(seed, "identity")
        self._ica_key = derive_key(seed, "ica")
        self._root_name = _name("SIMULATED Device Identity CA (NOT TRUSTED)")
        self._ident_name = _name("SIMULATED GH100 Identity")
        self._ica_name = _name("SIMULATED GH100 Provisioner ICA 1")
        self.root = _cert(self._root_name, self._root_key, self._root_name, self._root_key, 1, ca=True)
        self.identity = _cert(self._ident_name, self._ident_key, self._root_name, self._root_key, 2, ca=True)
        self.ica = _cert(self._ica_name, self._ica_key, self._ident_name, self._ident_key, 3, ca=True)

    @property
    def root_pem(self) -> bytes:
        return _pem(self.root)

    def device(self, label: str, model: GpuModel | str = "h100") -> SimulatedGpuDevice:
        return SimulatedGpuDevice(self, label, MODELS[model] if isinstance(model, str) else model)


@dataclass
class SimulatedGpuDevice:
    """One simulated GPU: per-chip BROM CA, attestation leaf with FWID, and a report generator."""

    ca: SimulatedDeviceCA
    label: str
    model: GpuModel
    feature_flag: int = 0  # SPT
    measurements: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.measurements:
            self.measurements = [
                hashlib.sha384(self.ca.seed + f"{self.model.key}/measurement/{i}".encode()).digest()
                for i in range(64)
            ]

    @cached_property
    def fwid(self) -> bytes:
        return hashlib.sha384(self.ca.seed + f"{self.model.key}/fwid/{self.model.driver_version}".encode()).digest()

    @cached_property
    def _chain(self) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
        seed, label = self.ca.seed, self.label
        brom_key = derive_key(seed, f"brom/{label}")
        leaf_key = derive_key(seed, f"leaf/{label}")
        chip_serial = hashlib.sha256(seed + label.encode()).hexdigest()[:18].upper()
        brom_name = _name(f"SIMULATED {self.model.chip} A01 GSP BROM", serial=chip_serial)
        leaf_name = _name(f"SIMULATED {self.model.chip} A01 GSP FMC LF",
                          serial=hashlib.sha256(b"leaf" + seed + label.encode()).hexdigest()[:40].upper())
        serial = int.from_bytes(hashlib.sha256(label.encode()).digest()[:8], "big")
        brom = _cert(brom_name, brom_key, self.ca._ica_name, self.ca._ica_key, serial, ca=True)
        leaf = _cert(leaf_name, leaf_key, brom_name, brom_key, serial + 1, ca=False,
                     extra=[fwid_extension(leaf_key.public_key(), self.fwid)])
        return leaf_key, _pem(leaf, brom, self.ca.ica, self.ca.identity, self.ca.root)

    @property
    def cert_chain_pem(self) -> bytes:
        """5 PEM certificates, leaf first, simulated root last (NVML's attestationCertChain)."""
        return self._chain[1]

    def _opaque(self) -> bytes:
        m = self.model
        vb = [int(x, 16) for x in m.vbios_version.split(".")]
        vbios = int(f"{vb[0]:02x}{vb[1]:02x}{vb[2]:02x}{vb[3]:02x}", 16).to_bytes(4, "little") + bytes([vb[4], 0, 0, 0])
        entries = [
            ("vbios_version", vbios),
            ("board_id", m.board_id.to_bytes(4, "little")),
            ("chip_sku", m.chip_sku.encode().ljust(9, b"\x00")),
            ("chip_sku_mod", b"0".ljust(5, b"\x00")),
            ("project", m.project.encode() + b"\x00"),
            ("project_sku", m.project_sku.encode() + b"\x00"),
            ("project_sku_mod", b"\x00\x00"),
            ("driver_version", m.driver_version.encode() + b"\x00"),
            ("gpu_info", bytes.fromhex("8001000000000000")),
            ("msrscnt", b"".join(struct.pack("<I", 1 if i < 64 else 0) for i in range(64))),
            ("cprinfo", bytes.fromhex("00c00100")),
            ("nvdec0_status", b"\x55"),
            ("fwid", self.fwid),
            ("protected_pcie_status", b"\xaa" if self.feature_flag == 2 else b"\x55"),
            ("opaque_data_version", struct.pack("<H", 1)),
            ("feature_flag", struct.pack("<H", self.feature_flag)),
        ]
        return b"".join(struct.pack("<HH", OPAQUE_CODES[n], len(v)) + v for n, v in entries)

    def report(self, nonce: bytes, *, responder_nonce: bytes | None = None) -> bytes:
        """A signed SPDM 1.1 GET_MEASUREMENTS request||response for ``nonce`` (exactly 32 bytes)."""
        if len(nonce) != 32:
            raise ValueError(f"nonce: expected 32 bytes, got {len(nonce)}")
        request = bytes([0x11, SPDM_REQUEST_CODE, 0x01, 0xFF]) + bytes(nonce) + b"\x00"
        record = b"".join(
            struct.pack("<BBH", i + 1, 1, 3 + len(d)) + struct.pack("<BH", 0x01, len(d)) + d
            for i, d in enumerate(self.measurements)
        )
        opaque = self._opaque()
        response = (
            bytes([0x11, SPDM_RESPONSE_CODE, 0x00, 0x00, len(self.measurements)])
            + len(record).to_bytes(3, "little") + record
            + (responder_nonce if responder_nonce is not None else os.urandom(32))
            + struct.pack("<H", len(opaque)) + opaque
        )
        leaf_key = self._chain[0]
        r, s = decode_dss_signature(leaf_key.sign(request + response, ec.ECDSA(hashes.SHA384())))
        return request + response + r.to_bytes(48, "big") + s.to_bytes(48, "big")
