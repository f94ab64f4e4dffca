"""Simulated AMD SEV-SNP guest: version-5 reports under a simulated VCEK <- ASK <- ARK. NEVER TRUSTED.

Why it exists: no machine here is an SEV-SNP guest, yet the parser, the local verifier, the collector
over the configfs-tsm emulator, the boot and the validator should all run on real bytes with real
signatures. The reports follow sev-snp.md §1 byte for byte (1184 bytes, v5 layout, ECDSA P-384 /
SHA-384 over [0, 0x2A0), r and s as 72-byte little-endian numbers) and the certificates follow AMD's
profile (§3.1, §3.2): the ARK (``ARK-<Product>``, self-signed) and the ASK (``SEV-<Product>``) are
RSA-4096 with RSASSA-PSS SHA-384, MGF1-SHA-384, salt 48; the VCEK (``SEV-VCEK``) is EC P-384, has no
basicConstraints / key usage / key identifiers, and carries AMD's extensions (1.3.6.1.4.1.3704.1.*:
structVersion, productName, the TCB SPLs equal to REPORTED_TCB (+ fmcSPL on Turin), hwID = CHIP_ID as
raw bytes without a DER tag). Every name says SIMULATED in O and OU, so nothing here can pass for AMD's:
the packaged AMD roots (:func:`agent.quote.snp_verify.pinned_arks`) never verify it, and a verifier
trusts it only when given :func:`sim_amd_roots` explicitly (tests, the demo, the simulated validator).

Deliberate differences from AMD: the VCEK serial number is 1, not 0 (``cryptography`` refuses to build
a certificate with serial 0); ARK and ASK serials are random.

State (``state_dir``, shared with the simulated TDX PCK chain of :mod:`agent.sim.quote_sim`; dir 0700,
keys 0600): ``sim-snp-seed`` (32 random bytes: CHIP_ID, MEASUREMENT and REPORT_ID derive from it, so they
are stable for the state dir) and, per product line, ``sim-amd-<product>-{ark,ask,vcek}.{key,pem}``.
Made once under a lock file (two RSA-4096 keys: about 0.3 to 1 s per product line), then loaded.

Report defaults: VERSION 5, POLICY 0x30000 (what Chutes launches with), VMPL 0, SIGNATURE_ALGO 1,
KEY_INFO 0 (VCEK), PLATFORM_INFO 0x25, REPORT_ID_MA all 0xFF, the TCB and firmware version of the
public sample of the product line (sev-snp.md §4: Genoa ``0a00000000001b58`` fw 1.55.49, CPUID
19/11/01; Milan ``04000000000018db`` fw 1.55.29, 19/01/01; Turin ``0001000200000047`` fw 1.55.61,
1A/02/01, an 8-byte CHIP_ID/hwID).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import os
import secrets
import struct
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID, ObjectIdentifier

from agent.evidence.base import TeeEvidence
from agent.fsutil import write_atomic
from agent.log import get_logger
from agent.quote.snp_parser import decode_tcb

log = get_logger(__name__)

REPORT_SIZE = 0x4A0
SIGNED_SIZE = 0x2A0
REPORT_VERSION = 5
#: What Chutes' host launches guests with (sev-snp.md §0.1): SMT allowed, bit 17 (reserved, 1), no DEBUG.
DEFAULT_POLICY = 0x30000
POLICY_DEBUG = 1 << 19
SIGNATURE_ALGO_ECDSA_P384_SHA384 = 1
DEFAULT_PLATFORM_INFO = 0x25  # SMT_EN | ECC_EN | ALIAS_CHECK_COMPLETE, as in the Genoa/Milan samples
RSA_BITS = 4096
ARK_YEARS, ASK_YEARS, VCEK_YEARS = 25, 25, 7

#: AMD's VCEK extension OIDs (sev-snp.md §3.2).
AMD_OID = "1.3.6.1.4.1.3704.1."
OID_STRUCT_VERSION = AMD_OID + "1"
OID_PRODUCT_NAME = AMD_OID + "2"
OID_HWID = AMD_OID + "4"
_TCB_OID = {"bl": AMD_OID + "3.1", "tee": AMD_OID + "3.2", "snp": AMD_OID + "3.3", "ucode": AMD_OID + "3.8",
            "fmc": AMD_OID + "3.9"}

#: GHCB extended-request certificate table GUIDs (sev-snp.md §2.3), stored in RFC 4122 byte order.
GUID_VCEK = uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd")
GUID_VLEK = uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1")
GUID_ASK = uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782")
GUID_ARK = uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae")
_CERT_TABLE_ENTRY = 24

_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
_ORG = "SIMULATED chutes-attest AMD hierarchy (not Advanced Micro Devices)"
_OU = "SIMULATED - never trusted"
_SEED_FILE = "sim-snp-seed"
_LOCK_FILE = "sim-amd.lock"


@dataclass(frozen=True)
class ProductSpec:
    """What a simulated chip of one product line reports and what its VCEK says."""

    name: str  # the product line: "Milan", "Genoa", "Turin" (ARK-<name>, SEV-<name>)
    product_name: str  # the VCEK productName extension ("Milan-B0": stepping included; Genoa/Turin: none)
    cpuid: tuple[int, int, int]  # CPUID_FAM_ID, CPUID_MOD_ID, CPUID_STEP
    struct_version: int  # VCEK structVersion: 0 Milan/Genoa, 1 Turin
    tcb: bytes  # CURRENT/REPORTED/COMMITTED/LAUNCH_TCB (8 bytes, report order)
    firmware: tuple[int, int, int]  # major, minor, build
    hwid_len: int  # 64, or 8 on Turin (CHIP_ID[0:8], the rest zero)


PRODUCTS: dict[str, ProductSpec] = {
    "Milan": ProductSpec("Milan", "Milan-B0", (0x19, 0x01, 0x01), 0, bytes.fromhex("04000000000018db"),
                         (1, 55, 29), 64),
    "Genoa": ProductSpec("Genoa", "Genoa", (0x19, 0x11, 0x01), 0, bytes.fromhex("0a00000000001b58"),
                         (1, 55, 49), 64),
    "Turin": ProductSpec("Turin", "Turin", (0x1A, 0x02, 0x01), 1, bytes.fromhex("0001000200000047"),
                         (1, 55, 61), 8),
}
DEFAULT_PRODUCT = "Genoa"


def _spec(product: str) -> ProductSpec:
    try:
        return PRODUCTS[product]
    except KeyError:
        raise ValueError(f"product: must be one of {', '.join(PRODUCTS)}, got {product!r}") from None


# --- derived identity ------------------------------------------------------------------------------------

def _derive(label: str, seed: bytes, n: int) -> bytes:
    return hashlib.shake_256(f"chutes-attest simulated SEV-SNP {label}\0".encode() + seed).digest(n)


def chip_id_for(seed: bytes, product: str) -> bytes:
    """The simulated CHIP_ID (64 bytes; Turin: 8 bytes then 56 zero bytes)."""
    spec = _spec(product)
    ident = _derive(f"CHIP_ID {product}", seed, spec.hwid_len)
    return ident + bytes(64 - len(ident))


def measurement_for(seed: bytes) -> bytes:
    """The simulated launch digest (MEASUREMENT, 48 bytes)."""
    return _derive("MEASUREMENT", seed, 48)


# --- certificates ----------------------------------------------------------------------------------------

def _name(cn: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
        x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "CA"),
        x509.NameAttribute(NameOID.LOCALITY_NAME, "Santa Clara"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORG),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, _OU),
        x509.NameAttribute(NameOID.COMMON_NAME, cn),
    ])


def _der_int(value: int) -> bytes:
    """A DER INTEGER (non-negative; 219 is ``02 02 00 db``, as AMD's ucodeSPL)."""
    content = value.to_bytes((value.bit_length() + 8) // 8, "big")
    return bytes([0x02, len(content)]) + content


def _der_ia5(text: str) -> bytes:
    raw = text.encode("ascii")
    return bytes([0x16, len(raw)]) + raw


def _ext(oid: str, value: bytes) -> x509.UnrecognizedExtension:
    return x509.UnrecognizedExtension(ObjectIdentifier(oid), value)


def _ca(subject: str, key: rsa.RSAPrivateKey, issuer: str, issuer_key: rsa.RSAPrivateKey, *,
        path_len: int | None, years: int, now: dt.datetime) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=365 * years))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_len), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    return builder.sign(issuer_key, hashes.SHA384(), rsa_padding=_PSS)


def _vcek(spec: ProductSpec, key: ec.EllipticCurvePrivateKey, ask: x509.Certificate, ask_key: rsa.RSAPrivateKey,
          chip_id: bytes, now: dt.datetime) -> x509.Certificate:
    """AMD's VCEK profile: no standard extensions at all, only AMD's (serial 1 here, 0 at AMD)."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name("SEV-VCEK"))
        .issuer_name(ask.subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=365 * VCEK_YEARS))
        .add_extension(_ext(OID_STRUCT_VERSION, _der_int(spec.struct_version)), critical=False)
        .add_extension(_ext(OID_PRODUCT_NAME, _der_ia5(spec.product_name)), critical=False)
    )
    tcb = decode_tcb(spec.tcb, spec.name)
    spls = [(_TCB_OID[c], tcb[c]) for c in ("bl", "tee", "snp")]
    # reserved spl4..spl7 = 0 (the Turin VCEK has .3.5-.3.7 but not .3.4, sev-snp.md §3.2)
    spls += [(f"{AMD_OID}3.{i}", 0) for i in range(5 if spec.name == "Turin" else 4, 8)]
    spls.append((_TCB_OID["ucode"], tcb["ucode"]))
    if "fmc" in tcb:
        spls.append((_TCB_OID["fmc"], tcb["fmc"]))
    for oid, value in spls:
        builder = builder.add_extension(_ext(oid, _der_int(value)), critical=False)
    builder = builder.add_extension(_ext(OID_HWID, chip_id[:spec.hwid_len]), critical=False)  # raw, no DER tag
    return builder.sign(ask_key, hashes.SHA384(), rsa_padding=_PSS)


@dataclass(frozen=True)
class SimAmdChain:
    """One simulated chip of a product line: ARK -> ASK -> VCEK, the VCEK's key, and the state seed.

    (The ARK and ASK keys stay in the state dir: only the VCEK key signs anything after creation.)
    """

    spec: ProductSpec
    ark: x509.Certificate
    ask: x509.Certificate
    vcek: x509.Certificate
    vcek_key: ec.EllipticCurvePrivateKey
    seed: bytes

    @property
    def product(self) -> str:
        return self.spec.name

    @property
    def chip_id(self) -> bytes:
        return chip_id_for(self.seed, self.spec.name)

    @property
    def measurement(self) -> bytes:
        return measurement_for(self.seed)

    @property
    def ark_der(self) -> bytes:
        return self.ark.public_bytes(serialization.Encoding.DER)

    @property
    def ask_der(self) -> bytes:
        return self.ask.public_bytes(serialization.Encoding.DER)

    @property
    def vcek_der(self) -> bytes:
        return self.vcek.public_bytes(serialization.Encoding.DER)

    @property
    def chain_pem(self) -> bytes:
        """ASK then ARK, PEM: what AMD's KDS serves as ``/vcek/v1/<Product>/cert_chain``."""
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (self.ask, self.ark))

    @property
    def cert_table(self) -> bytes:
        """The GHCB certificate table a host that provisions certificates would give (VCEK, ASK, ARK)."""
        return cert_table(self.vcek_der, self.ask_der, self.ark_der)


def cert_table(vcek_der: bytes, ask_der: bytes | None = None, ark_der: bytes | None = None, *,
               vlek: bool = False) -> bytes:
    """A configfs ``auxblob`` (sev-snp.md §2.3): 24-byte entries ``{GUID, u32 offset, u32 length}`` (LE, GUID in
    RFC 4122 byte order), an all-zero terminator, then the DER certificates; offsets count from the start
    of the blob. ``vlek`` files the first certificate under the VLEK GUID instead of the VCEK one."""
    certs = [(GUID_VLEK if vlek else GUID_VCEK, bytes(vcek_der))]
    if ask_der is not None:
        certs.append((GUID_ASK, bytes(ask_der)))
    if ark_der is not None:
        certs.append((GUID_ARK, bytes(ark_der)))
    offset = (len(certs) + 1) * _CERT_TABLE_ENTRY
    header, body = bytearray(), bytearray()
    for guid, der in certs:
        header += guid.bytes + struct.pack("<II", offset + len(body), len(der))
        body += der
    return bytes(header + bytes(_CERT_TABLE_ENTRY) + body)


# --- state directory -------------------------------------------------------------------------------------

@contextlib.contextmanager
def _locked(d: Path) -> Iterator[None]:
    """One creator at a time per state dir (the emulator child and its parent may race on first use)."""
    fd = os.open(d / _LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _state(state_dir: str | os.PathLike[str]) -> Path:
    d = Path(state_dir)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    return d


def _seed(d: Path) -> bytes:
    path = d / _SEED_FILE
    if not path.exists():
        write_atomic(path, secrets.token_bytes(32), 0o600)
    seed = path.read_bytes()
    if len(seed) != 32:
        raise ValueError(f"{path}: expected 32 bytes, got {len(seed)}")
    return seed


def _paths(d: Path, product: str) -> dict[str, tuple[Path, Path]]:
    return {n: (d / f"sim-amd-{product.lower()}-{n}.key", d / f"sim-amd-{product.lower()}-{n}.pem")
            for n in ("ark", "ask", "vcek")}


def _save(kpath: Path, cpath: Path, key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
          cert: x509.Certificate) -> None:
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    write_atomic(kpath, key_pem, 0o600)
    write_atomic(cpath, cert.public_bytes(serialization.Encoding.PEM), 0o600)


def _create(d: Path, spec: ProductSpec, seed: bytes) -> None:
    now = dt.datetime.now(dt.UTC)
    ark_key = rsa.generate_private_key(65537, RSA_BITS)
    ask_key = rsa.generate_private_key(65537, RSA_BITS)
    vcek_key = ec.generate_private_key(ec.SECP384R1())
    ark = _ca(f"ARK-{spec.name}", ark_key, f"ARK-{spec.name}", ark_key, path_len=None, years=ARK_YEARS, now=now)
    ask = _ca(f"SEV-{spec.name}", ask_key, f"ARK-{spec.name}", ark_key, path_len=0, years=ASK_YEARS, now=now)
    vcek = _vcek(spec, vcek_key, ask, ask_key, chip_id_for(seed, spec.name), now)
    paths = _paths(d, spec.name)
    # VCEK last: its presence marks a complete hierarchy
    for n, key, cert in (("ark", ark_key, ark), ("ask", ask_key, ask), ("vcek", vcek_key, vcek)):
        _save(*paths[n], key, cert)
    log.warning("sim.amd_chain_created", state_dir=str(d), product=spec.name,
                reason="simulated AMD ARK/ASK/VCEK, never trusted")


def load_or_create_sim_amd(state_dir: str | os.PathLike[str], product: str = DEFAULT_PRODUCT) -> SimAmdChain:
    """The simulated AMD hierarchy of ``product`` in ``state_dir``, made on first use (keys 0600, dir 0700)."""
    spec = _spec(product)
    d = _state(state_dir)
    paths = _paths(d, spec.name)
    with _locked(d):
        seed = _seed(d)
        if not all(k.exists() and c.exists() for k, c in paths.values()):
            _create(d, spec, seed)
        vcek_key = serialization.load_pem_private_key(paths["vcek"][0].read_bytes(), password=None)
        ark, ask, vcek = (x509.load_pem_x509_certificate(paths[n][1].read_bytes()) for n in ("ark", "ask", "vcek"))
    if not isinstance(vcek_key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{paths['vcek'][0]}: not an EC private key")
    return SimAmdChain(spec, ark, ask, vcek, vcek_key, seed)


def _present_products(state_dir: str | os.PathLike[str]) -> list[str]:
    d = Path(state_dir)
    return [p for p in PRODUCTS if (d / f"sim-amd-{p.lower()}-vcek.pem").exists()]


def _chains(state_dir: str | os.PathLike[str], products: Sequence[str] | None) -> list[SimAmdChain]:
    wanted = list(products) if products is not None else (_present_products(state_dir) or [DEFAULT_PRODUCT])
    return [load_or_create_sim_amd(state_dir, p) for p in wanted]


def sim_amd_roots(state_dir: str | os.PathLike[str], products: Sequence[str] | None = None) -> list[x509.Certificate]:
    """The simulated ARKs to pass as ``trusted_arks`` (explicitly; never a default anywhere).

    ``products`` None: every product line already made in ``state_dir``, or Genoa's (made now) if none.
    """
    return [c.ark for c in _chains(state_dir, products)]


@dataclass(frozen=True)
class SimKds:
    """What a validator fetches from AMD's KDS for these simulated chips, plus the guest's launch digest."""

    #: CHIP_ID (hex) -> VCEK DER, as ``/vcek/v1/<Product>/<hwid>?...`` would serve it.
    veks: dict[str, bytes]
    #: ASK + ARK (PEM) of every product line given.
    chain_pem: bytes
    #: The simulated ARKs, to trust explicitly.
    arks: list[x509.Certificate]
    #: The MEASUREMENT :class:`SimulatedSnpSource` reports by default (the same for every product line).
    measurement: bytes


def sim_kds(state_dir: str | os.PathLike[str], products: Sequence[str] | None = None) -> SimKds:
    """The simulated KDS view of ``state_dir`` (``products`` as in :func:`sim_amd_roots`)."""
    chains = _chains(state_dir, products)
    return SimKds(veks={c.chip_id.hex(): c.vcek_der for c in chains},
                  chain_pem=b"".join(c.chain_pem for c in chains), arks=[c.ark for c in chains],
                  measurement=chains[0].measurement)


# --- reports ---------------------------------------------------------------------------------------------

def _le(value: int, n: int) -> bytes:
    return value.to_bytes(n, "little")


def build_report(
    report_data: bytes, *, vcek_key: ec.EllipticCurvePrivateKey, spec: ProductSpec, chip_id: bytes,
    measurement: bytes, report_id: bytes, policy: int = DEFAULT_POLICY, vmpl: int = 0,
    host_data: bytes = bytes(32),
) -> bytes:
    """One signed version-5 ATTESTATION_REPORT (sev-snp.md §1.2), 1184 bytes."""
    if len(report_data) != 64 or len(measurement) != 48 or len(chip_id) != 64 or len(host_data) != 32 \
            or len(report_id) != 32:
        raise ValueError("report_data 64, measurement 48, chip_id 64, host_data 32, report_id 32 bytes expected")
    if not 0 <= vmpl <= 3:
        raise ValueError(f"vmpl: must be 0..3, got {vmpl}")
    major, minor, build = spec.firmware
    r = bytearray(REPORT_SIZE)
    struct.pack_into("<IIQ", r, 0x000, REPORT_VERSION, 0, policy)  # VERSION, GUEST_SVN, POLICY
    # FAMILY_ID, IMAGE_ID (0x010, 0x020): zero (no ID block)
    struct.pack_into("<II", r, 0x030, vmpl, SIGNATURE_ALGO_ECDSA_P384_SHA384)
    r[0x038:0x040] = spec.tcb  # CURRENT_TCB
    struct.pack_into("<QI", r, 0x040, DEFAULT_PLATFORM_INFO, 0)  # PLATFORM_INFO, KEY_INFO (VCEK)
    r[0x050:0x090] = report_data
    r[0x090:0x0C0] = measurement
    r[0x0C0:0x0E0] = host_data
    # ID_KEY_DIGEST (0x0E0), AUTHOR_KEY_DIGEST (0x110): zero
    r[0x140:0x160] = report_id
    r[0x160:0x180] = b"\xff" * 32  # REPORT_ID_MA: no migration agent
    r[0x180:0x188] = spec.tcb  # REPORTED_TCB (what the VCEK was derived for)
    r[0x188:0x18B] = bytes(spec.cpuid)
    r[0x1A0:0x1E0] = chip_id
    r[0x1E0:0x1E8] = spec.tcb  # COMMITTED_TCB
    r[0x1E8:0x1EB] = bytes((build, minor, major))  # CURRENT_BUILD, _MINOR, _MAJOR
    r[0x1EC:0x1EF] = bytes((build, minor, major))  # COMMITTED_*
    r[0x1F0:0x1F8] = spec.tcb  # LAUNCH_TCB
    # LAUNCH_MIT_VECTOR, CURRENT_MIT_VECTOR (0x1F8, 0x200): zero
    der = vcek_key.sign(bytes(r[:SIGNED_SIZE]), ec.ECDSA(hashes.SHA384()))
    sig_r, sig_s = decode_dss_signature(der)
    r[0x2A0:0x2E8] = _le(sig_r, 72)
    r[0x2E8:0x330] = _le(sig_s, 72)
    return bytes(r)


class SimulatedSnpSource:
    """QuoteSource producing simulated SEV-SNP reports (``tee = "snp"``): bare 1184-byte v5 reports signed
    by the simulated VCEK of ``product`` in ``state_dir``. Every report logs a warning."""

    name = "simulated"
    tee = "snp"

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        product: str = DEFAULT_PRODUCT,
        *,
        measurement: bytes | None = None,
        debug: bool = False,
        host_data: bytes = bytes(32),
        with_cert_table: bool = False,
    ) -> None:
        self.chain = load_or_create_sim_amd(state_dir, product)
        if measurement is not None and (not isinstance(measurement, bytes) or len(measurement) != 48):
            raise ValueError(f"measurement: expected 48 bytes, got {measurement!r}")
        if not isinstance(host_data, bytes) or len(host_data) != 32:
            raise ValueError(f"host_data: expected 32 bytes, got {host_data!r}")
        self.measurement = measurement if measurement is not None else self.chain.measurement
        self.policy = DEFAULT_POLICY | (POLICY_DEBUG if debug else 0)
        self.host_data = host_data
        #: get_evidence() also returns the certificate table (a host that provisions certificates); the
        #: default is an empty one, like upstream KVM.
        self.with_cert_table = with_cert_table
        self._report_id = _derive("REPORT_ID", self.chain.seed, 32)
        log.warning("quote.simulated_snp_source", state_dir=str(state_dir), product=product, debug=debug,
                    reason="simulated SEV-SNP reports: not hardware evidence, never trusted")

    @property
    def product(self) -> str:
        return self.chain.product

    @property
    def chip_id(self) -> bytes:
        return self.chain.chip_id

    @property
    def vcek_der(self) -> bytes:
        return self.chain.vcek_der

    @property
    def chain_pem(self) -> bytes:
        return self.chain.chain_pem

    @property
    def arks(self) -> list[x509.Certificate]:
        """The simulated ARK: the only root these reports verify against."""
        return [self.chain.ark]

    @property
    def cert_table(self) -> bytes:
        return self.chain.cert_table

    def report(self, report_data: bytes, *, vmpl: int = 0) -> bytes:
        """A report for ``report_data`` requested at ``vmpl`` (configfs ``privlevel``)."""
        if not isinstance(report_data, bytes | bytearray) or len(report_data) != 64:
            got = len(report_data) if isinstance(report_data, bytes | bytearray) else type(report_data).__name__
            raise ValueError(f"report_data: expected 64 bytes, got {got}")
        log.warning("quote.simulated_snp", reason="simulated SEV-SNP report issued (not hardware evidence)")
        return build_report(bytes(report_data), vcek_key=self.chain.vcek_key, spec=self.chain.spec,
                            chip_id=self.chip_id, measurement=self.measurement, report_id=self._report_id,
                            policy=self.policy, vmpl=vmpl, host_data=self.host_data)

    def get_quote(self, report_data: bytes) -> bytes:
        return self.report(report_data)

    def get_evidence(self, report_data: bytes) -> TeeEvidence:
        return TeeEvidence(self.tee, self.report(report_data), self.cert_table if self.with_cert_table else b"")


__all__ = ["DEFAULT_POLICY", "PRODUCTS", "ProductSpec", "SimAmdChain", "SimKds", "SimulatedSnpSource",
           "build_report", "cert_table", "load_or_create_sim_amd", "sim_amd_roots", "sim_kds"]
