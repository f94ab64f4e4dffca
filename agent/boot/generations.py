"""The steps after the boot attestation, per generation (reference §4.1-4.3, §5-§7, §10).

≤1.2: unlock root, hand-off with ``boot-token``, data volumes by ``POST /servers/{vm}/luks``.
1.3.x: unlock root, hand-off (``luks-quote-nonce``, ``cert-hash``), RTMR3 chain, ``luks/attest`` with a
quote bound to ``luks_quote_nonce`` ‖ cert hash, storage volumes, unsigned ``luks/confirm`` on the API host.
1.4.0: unlock root, drop token 15, rotate the root passphrase (signed confirm), hand-off, RTMR3 chain,
signed ``provision`` bound to the CA, storage volumes, signed ``provision/confirm``, wipe the seed,
leaves + CA key deletion, ``validator-auth.env``, the signed cosign/Helm keys.

Each failure carries the reference's marker for its step (§3.7). The HTTP calls after the attestation
are single-shot (§3.6), each bounded by the request timeout.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import grp
import os
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote as urlquote

from agent.boot import rotation, storage, vm_ca
from agent.boot.artifacts import ArtifactError, verify_signing_keys, write_signing_keys, write_validator_auth
from agent.boot.blockdev import DeviceError, mount_ro, umount
from agent.boot.client_cert import ClientIdentity
from agent.boot.config_volume import BootIdentity
from agent.boot.confirm import ConfirmAnswer, send_confirm
from agent.boot.cryptsetup import Cryptsetup, CryptsetupError, Kdf
from agent.boot.exchange import Exchange
from agent.boot.failure import BootFailure
from agent.boot.handoff import remove_handoff_file, write_handoff
from agent.boot.legacy_cache import cache_volume_stage
from agent.boot.retrying import CallBudget
from agent.boot.root_unlock import header_dict, unlock_root
from agent.boot.stages import StageTimer
from agent.config import AgentConfig
from agent.evidence.mr_register import MeasurementRegister
from agent.evidence.own_quote import SNP, TDX
from agent.evidence.rootfs_measure import MARKERS, RootfsMeasureError, measure_rootfs, verify_rootfs_snp
from agent.exitcodes import EXIT_VERIFY_FAILED
from agent.fsutil import ensure_dir, write_atomic
from agent.log import Secret, get_logger
from agent.validator.client import ValidatorClient, compact_json
from agent.validator.errors import ValidatorError
from agent.validator.proof import Hotkey, proof_headers
from agent.validator.retry import RetryPolicy
from agent.validator.schemas import BootAttestationResponse, LegacyVolumesResponse, StorageKeysResponse

log = get_logger(__name__)

STORAGE_UA = "TDX-LUKS-Storage/1.0"
M_UNLOCK = "TDX-LUKS-UNLOCK-FAILED"
M_STORAGE = "STORAGE-SETUP-FAILED"
M_TLS = "SETUP-VM-TLS-FAILED"
M_SIGNING = "FETCH-SIGNING-KEYS-FAILED"


@dataclass
class Clients:
    """``tdx`` = the mTLS front (client identity presented), ``api_mtls``/``api`` = the public API with/without it,
    ``legacy`` = the legacy attestation proxy (mTLS), the only front serving 1.3.x ``luks/attest`` (§12.4)."""

    tdx: ValidatorClient
    api_mtls: ValidatorClient
    api: ValidatorClient
    legacy: ValidatorClient


@dataclass
class Run:
    """Everything the post-attestation steps share."""

    cfg: AgentConfig
    cs: Cryptsetup
    timer: StageTimer
    status: dict[str, Any]
    budget: CallBudget
    ex: Exchange
    ident: BootIdentity
    identity: ClientIdentity
    clients: Clients
    sleep: Callable[[float], Awaitable[None]]
    #: RTMR3 (the kernel's sysfs file, or the emulator of it at the configured path).
    rtmr3: MeasurementRegister
    #: Futures of the two RSA-2048 leaf keys (1.4.0), started once the CA was ready.
    leaf_keys: list[concurrent.futures.Future[Any]] = field(default_factory=list)
    #: CA files on disk to remove on failure (1.4.0).
    ca_written: bool = False
    handoff: list[str] = field(default_factory=list)

    @property
    def b(self) -> Any:
        return self.cfg.boot

    @property
    def vm_path(self) -> str:
        return urlquote(self.ident.vm_name, safe="")

    @property
    def labels(self) -> tuple[str, str]:
        return (self.b.storage_label, self.b.tdx_cache_label)


def _signer(run: Run) -> Hotkey:
    if run.ident.signer is None:
        raise BootFailure("attestation", "the validator answered as 1.4.0 but the config volume has no "
                          "miner-seed or miner-private-key to sign its calls")
    return run.ident.signer


# ── root ─────────────────────────────────────────────────────────────────────

async def root_14(run: Run, resp: BootAttestationResponse) -> None:
    """Open with ``key``, drop token 15, rotate to ``root_next`` with a signed confirm (§4.3 steps 5-6)."""
    b = run.b
    await unlock_root(b, run.cs, run.timer, run.status, resp.key, allow_first_boot_token=True)
    with run.timer.stage("first_boot_token") as st:
        removed = await asyncio.to_thread(rotation.clear_first_boot, run.cs, b.root_device)
        st.detail = "token 15 removed" if removed else "no token 15 (or removal failed: ignored)"
    signer = _signer(run)
    assert resp.root_next is not None and resp.root_confirm_nonce is not None
    nonce = resp.root_confirm_nonce

    async def confirm() -> ConfirmAnswer:
        # Only the validator's confirmation body or a refusal it states counts (agent.boot.confirm);
        # anything else raises: rotate_root then keeps both keyslots and fails closed.
        body = compact_json({"volumes": {"root": {"rotated": True}}})
        headers = {"X-Confirm-Nonce": nonce, **proof_headers(signer, nonce, body)}
        ep = "POST /servers/{vm}/provision/confirm (root)"
        with run.timer.stage("root_confirm") as st, st.waiting("network"):
            answer = await send_confirm(run.clients.tdx, ep, f"/servers/{run.vm_path}/provision/confirm",
                                        headers, body, ("root",))
            st.detail = f"root: {answer.result('root')}"
        if answer.refused:
            log.warning("boot.root_confirm_refused", detail=answer.detail)
        return answer

    with run.timer.stage("root_rotation") as st:
        try:
            result = await rotation.rotate_root(run.cs, b.root_device, resp.key, resp.root_next, confirm,
                                                on_confirm_failure=b.root_confirm_failure,
                                                kdf=Kdf(b.format_pbkdf, b.format_pbkdf_iterations))
        except rotation.RotationError as exc:
            run.status["root_rotation"] = {"step": exc.step, "keys": exc.keys}
            raise BootFailure("root_rotation", str(exc)) from None
        except CryptsetupError as exc:
            raise BootFailure("root_rotation", f"root rotation: {exc}") from None
        run.status["root_rotation"] = {"confirmed": result.confirmed, "active_key": result.active_key,
                                       "old_slots": result.old_slots, "killed": result.killed}
        st.detail = (f"rotated: killed slots {result.killed}" if result.confirmed
                     else "confirm refused by the validator: root_next removed, booting on the old key")


# ── RTMR3 chain ──────────────────────────────────────────────────────────────

async def rtmr3_chain(run: Run) -> None:
    """The rootfs step: on TDX measure the new root into RTMR3 before any quote that must carry the final
    value (§6); on SEV-SNP (no RTMR3) compare the root's list digest with the baked manifest's (§12.8)."""
    if run.ex.tee == SNP:
        await rootfs_snp(run)
        return
    b = run.b
    with run.timer.stage("rtmr3") as st:
        if not b.rtmr3_chain:
            st.result, st.detail = "skipped", "boot.rtmr3_chain = false"
            return
        try:
            async with _measured_root(b) as root:
                conf, manifest = b.measure_files()
                result = await asyncio.to_thread(measure_rootfs, root, conf, manifest, run.rtmr3,
                                                 scheme=b.rtmr3_scheme)
        except RootfsMeasureError as exc:
            raise BootFailure("rtmr3", exc.message, EXIT_VERIFY_FAILED, marker=_marker(b)) from None
        except (DeviceError, OSError) as exc:
            raise BootFailure("rtmr3", str(exc), EXIT_VERIFY_FAILED, marker=_marker(b)) from None
        run.status["rtmr3"] = {"scheme": result.scheme, "files": result.files, "bytes": result.total_bytes,
                               "extensions": len(result.extensions()), "absent": len(result.absent),
                               "unchecked": result.unchecked, "value": result.rtmr3.hex()}
        st.detail = f"{result.scheme} scheme, {result.files} files, RTMR3 {result.rtmr3.hex()[:16]}…"


@contextlib.asynccontextmanager
async def _measured_root(b: Any) -> AsyncIterator[str]:
    """The new root as a directory: ``boot.rootfs_dir``, else the opened root mounted read-only (and unmounted)."""
    if b.rootfs_dir:
        yield b.rootfs_dir
        return
    if b.unlock_action != "open":
        raise RootfsMeasureError("boot.rootfs_dir is required when the root is not opened "
                                 "(unlock_action = test-passphrase)")
    mount = os.path.join(os.path.dirname(b.header_dir.rstrip("/")) or "/run", "rootfs")
    await asyncio.to_thread(mount_ro, f"/dev/mapper/{b.root_mapper}", mount, b.rootfs_type)
    try:
        yield mount
    finally:
        try:
            await asyncio.to_thread(umount, mount)
        except DeviceError as exc:
            log.warning("boot.rtmr3_umount_failed", error=str(exc))


#: SEV-SNP has one rootfs scheme: Chutes' next (``sort -u``, SHA-384 of the list text; §12.2, sev-snp.md §5.2).
SNP_SCHEME = "next"
M_ROOTFS = MARKERS[SNP_SCHEME].rstrip(":")


async def rootfs_snp(run: Run) -> None:
    """SEV-SNP: nothing about the root is in the report, so the measured initramfs refuses a root whose list
    digest differs from the manifest's, and leaves the digest in ``boot.rootfs_digest_file`` (0444) for the
    image's ``rootfs-verify`` (sev-snp.md §5.2). Every failure: ``ROOTFS-MEASURE-FAILED``, fail closed."""
    b = run.b
    with run.timer.stage("rootfs") as st:
        if not b.rtmr3_chain:
            st.result, st.detail = "skipped", "boot.rtmr3_chain = false (SEV-SNP: no rootfs digest is left)"
            return
        if b.rtmr3_scheme != SNP_SCHEME:
            log.warning("boot.rootfs_snp_scheme", configured=b.rtmr3_scheme, used=SNP_SCHEME,
                        why="SEV-SNP guests run Chutes' next images only: the next list rules apply")
        conf, manifest = b.measure_files()
        try:
            async with _measured_root(b) as root:
                check = await asyncio.to_thread(verify_rootfs_snp, root, conf, manifest)
            await asyncio.to_thread(write_rootfs_digest, b.rootfs_digest_file, check.digest)
        except RootfsMeasureError as exc:
            raise BootFailure("rootfs", exc.message, EXIT_VERIFY_FAILED, marker=M_ROOTFS) from None
        except (DeviceError, OSError) as exc:
            raise BootFailure("rootfs", str(exc), EXIT_VERIFY_FAILED, marker=M_ROOTFS) from None
        r = check.result
        run.status["rootfs"] = {"tee": SNP, "scheme": SNP_SCHEME, "files": r.files, "bytes": r.total_bytes,
                                "absent": len(r.absent), "manifest_files": check.manifest_files,
                                "digest": check.digest.hex(), "digest_file": b.rootfs_digest_file}
        st.detail = (f"SEV-SNP: {r.files} files, list digest {check.digest.hex()[:16]}… == manifest's; "
                     f"{b.rootfs_digest_file}")


def write_rootfs_digest(path: str, digest: bytes) -> None:
    """Lowercase hex + newline, 0444, written atomically (temp file + rename: a symlink at ``path`` is replaced,
    never followed); the parent directory is made 0755 if missing (``/run/sek8s``), refused if it is a symlink."""
    parent = os.path.dirname(path) or "."
    try:
        st = os.lstat(parent)
    except FileNotFoundError:
        ensure_dir(parent, 0o755)
    else:
        if not stat.S_ISDIR(st.st_mode):  # a symlinked /run/sek8s is not followed
            raise NotADirectoryError(f"{parent}: not a directory (boot.rootfs_digest_file)")
    write_atomic(path, digest.hex().encode("ascii") + b"\n", 0o444)


def _marker(b: Any) -> str:
    """The scheme's console marker, without the colon (BootFailure adds it)."""
    return MARKERS[b.rtmr3_scheme].rstrip(":")


def _extend_rtmr3(run: Run) -> Callable[[bytes], None]:
    def extend(digest: bytes) -> None:
        run.rtmr3.extend([digest])  # a RegisterError fails the storage step, naming the register
    return extend


# ── storage (1.3 / 1.4) ──────────────────────────────────────────────────────

async def fetch_storage_keys(run: Run, gen: str, luks_quote_nonce: str) -> StorageKeysResponse:
    """``luks/attest`` (1.3) or signed ``provision`` (1.4): a quote over ``luks_quote_nonce`` ‖ cert hash."""
    raw = await run.ex.quote(luks_quote_nonce, run.identity.cert, 1, stage="storage_quote",
                             record="storage_measurements")
    body = compact_json({"quote": base64.b64encode(raw).decode("ascii"), "volumes": list(run.labels)})
    headers = {"X-Quote-Nonce": luks_quote_nonce, "User-Agent": STORAGE_UA}
    if gen == "1.4":
        headers.update(proof_headers(_signer(run), luks_quote_nonce, body))
        # /provision: only through the cvm front (§12.4)
        client, ep, path = run.clients.tdx, "POST /servers/{vm}/provision", f"/servers/{run.vm_path}/provision"
    else:
        headers["X-Chutes-Hotkey"] = run.ident.miner_hotkey
        # luks/attest: only through the legacy attestation proxy, any other front answers 403 (§12.4)
        client, ep, path = (run.clients.legacy, "POST /servers/{vm}/luks/attest",
                            f"/servers/{run.vm_path}/luks/attest")
    try:
        with run.timer.stage("storage_keys") as st, st.waiting("network"):
            answer = await client.request(ep, "POST", path, headers=headers, body=body, ok=(200, 201))
            keys = StorageKeysResponse.parse(ep, answer, run.labels)
            st.detail = (f"{len(keys.volumes)} volume(s), confirm nonce {'yes' if keys.confirm_nonce else 'no'}, "
                         f"from {client.base_url}")
    except ValidatorError as exc:
        raise BootFailure("storage", str(exc), marker=M_STORAGE) from None
    return keys


async def storage_volumes(run: Run, gen: str, keys: StorageKeysResponse) -> None:
    """Open/format the volumes, write the k3s config, confirm, and clean up the slots (§5)."""
    b = run.b
    confirm_nonce = keys.confirm_nonce

    async def confirm(body_doc: dict[str, object]) -> ConfirmAnswer:
        assert confirm_nonce is not None
        body = compact_json(body_doc)
        headers = {"X-Confirm-Nonce": confirm_nonce}
        if gen == "1.4":
            headers.update(proof_headers(_signer(run), confirm_nonce, body))
            client, ep, path = (run.clients.tdx, "POST /servers/{vm}/provision/confirm",
                                f"/servers/{run.vm_path}/provision/confirm")
        else:
            headers["X-Chutes-Hotkey"] = run.ident.miner_hotkey
            client, ep, path = (run.clients.api, "POST /servers/{vm}/luks/confirm",
                                f"/servers/{run.vm_path}/luks/confirm")
        with run.timer.stage("storage_confirm") as st, st.waiting("network"):
            answer = await send_confirm(client, ep, path, headers, body, tuple(run.labels))
            st.detail = ", ".join(f"{v}: {answer.result(v)}" for v in run.labels)
        if answer.refused:
            log.warning("boot.storage_confirm_refused", detail=answer.detail)
        return answer

    async def write_k3s() -> None:
        await asyncio.to_thread(storage.write_k3s_encryption_config,
                                os.path.join(b.handoff_dir, "k3s-encryption-config.yaml"),
                                keys.k3s_encryption_key, generation=gen)

    vk = {label: storage.VolumeKeys(v.current, v.next) for label, v in keys.volumes.items()}
    with run.timer.stage("storage_volumes") as st:
        try:
            result = await storage.setup_storage(
                run.cs, vk, storage.settings_from_config(b, gen), confirm=confirm if confirm_nonce else None,
                extend_rtmr3=_extend_rtmr3(run) if run.ex.tee == TDX else None, before_confirm=write_k3s)
        except storage.StorageError as exc:
            raise BootFailure("storage", str(exc), marker=exc.marker) from None
        except (CryptsetupError, DeviceError) as exc:
            raise BootFailure("storage", str(exc), marker=M_STORAGE) from None
        run.status["storage"] = {v.label: {"device": v.device, "formatted": v.formatted, "outcome": v.outcome,
                                           "header": header_dict(v.header)} for v in result.volumes}
        st.detail = ", ".join(f"{v.label}: {v.outcome}" for v in result.volumes)
    if confirm_nonce is not None and result.confirmed is None and gen == "1.4":
        raise BootFailure("storage", "no answer to the storage confirm", marker=M_STORAGE)


# ── ≤1.2 data volumes ────────────────────────────────────────────────────────

async def legacy_volumes(run: Run, token: Secret) -> None:
    """``POST /servers/{vm}/luks`` with the boot token → one passphrase per volume (§4.1 step 5)."""
    b = run.b
    if b.legacy_cache_endpoints:
        if b.cache_enabled:
            await cache_volume_stage(b, run.cs, run.timer, run.budget, run.clients.tdx, run.ident.vm_name,
                                     run.ident.miner_hotkey, token, run.status)
        return
    if not b.cache_enabled:
        return
    ep = "POST /servers/{vm}/luks"
    body = compact_json({"volumes": list(run.labels)})
    headers = {"X-Chutes-Hotkey": run.ident.miner_hotkey, "X-Boot-Token": token.reveal().decode("ascii", "replace")}
    try:
        with run.timer.stage("volume_keys") as st, st.waiting("network"):
            answer = await run.clients.tdx.request(ep, "POST", f"/servers/{run.vm_path}/luks", headers=headers,
                                                   body=body, ok=(200, 201))
            keys = LegacyVolumesResponse.parse(ep, answer, run.labels)
            st.detail = f"{len(keys.passphrases)} volume key(s)"
    except ValidatorError as exc:
        raise BootFailure("volumes", str(exc), marker=M_STORAGE) from None
    try:
        vk = {label: storage.VolumeKeys(pw, None) for label, pw in keys.passphrases.items()}
        with run.timer.stage("storage_volumes") as st:
            try:
                result = await storage.setup_storage(run.cs, vk, storage.settings_from_config(b, "1.3"),
                                                     confirm=None)
            except storage.StorageError as exc:
                raise BootFailure("volumes", str(exc), marker=exc.marker) from None
            except (CryptsetupError, DeviceError) as exc:
                raise BootFailure("volumes", str(exc), marker=M_STORAGE) from None
            run.status["storage"] = {v.label: {"device": v.device, "formatted": v.formatted,
                                               "header": header_dict(v.header)} for v in result.volumes}
            st.detail = ", ".join(f"{v.label}: {'formatted' if v.formatted else 'opened'}" for v in result.volumes)
    finally:
        keys.wipe()


# ── 1.4.0 hand-off artifacts ─────────────────────────────────────────────────

async def vm_tls(run: Run) -> None:
    """Sign the proxy server and CVM client leaves, then delete ``ca.key`` (§4.3 step 10, §7)."""
    b = run.b
    with run.timer.stage("vm_tls") as st:
        try:
            gid = grp.getgrnam(b.proxy_tls_group).gr_gid
        except KeyError:
            raise BootFailure("vm_tls", f"group {b.proxy_tls_group!r} (boot.proxy_tls_group) does not exist",
                              marker=M_TLS) from None
        try:
            keys = None
            if len(run.leaf_keys) == 2:
                with st.waiting("keygen"):
                    keys = (await asyncio.wrap_future(run.leaf_keys[0]), await asyncio.wrap_future(run.leaf_keys[1]))
            leaves = await asyncio.to_thread(vm_ca.sign_leaves, run.identity, b.handoff_dir, gid, leaf_keys=keys)
            ca_dir = os.path.join(b.handoff_dir, vm_ca.CA_SUBDIR)
            removed = await asyncio.to_thread(vm_ca.delete_ca_key, ca_dir)
        except (OSError, vm_ca.VMCAError) as exc:
            raise BootFailure("vm_tls", str(exc), marker=M_TLS) from None
        st.detail = f"proxy + registry leaves, removed {', '.join(removed) or 'nothing'}"
        run.status["vm_tls"] = {"proxy_spki_sha256": leaves.proxy.spki_sha256.hex(),
                                "ca_spki_sha256": run.identity.spki_sha256.hex()}


async def validator_auth(run: Run, ss58: str) -> None:
    with run.timer.stage("validator_auth") as st:
        try:
            await asyncio.to_thread(write_validator_auth, run.b.handoff_dir, ss58)
        except ArtifactError as exc:
            raise BootFailure("validator_auth", exc.detail, marker=exc.marker) from None
        st.detail = f"ALLOWED_VALIDATORS={ss58}"


async def signing_keys(run: Run) -> None:
    """``GET /servers/signing-keys`` (public, 3 tries); every key's RSA signature checked (§4.3 step 12)."""
    b = run.b
    try:
        with open(b.signing_root_key, "rb") as fh:
            root_pem = fh.read(65536)
    except OSError as exc:
        raise BootFailure("signing_keys", f"{b.signing_root_key}: {exc.strerror}", marker=M_SIGNING) from None
    budget = CallBudget(RetryPolicy(3, b.total_timeout_s, b.backoff_s, b.backoff_max_s), run.timer, run.sleep)
    ep = "GET /servers/signing-keys"

    async def once(n: int) -> bytes:
        with run.timer.stage("signing_keys_fetch", attempt=n) as st, st.waiting("network"):
            return await run.clients.api.request(ep, "GET", "/servers/signing-keys")

    try:
        body = await budget.retried("signing keys", "signing_keys", once)
    except BootFailure as exc:
        raise BootFailure("signing_keys", exc.detail, marker=M_SIGNING) from None
    with run.timer.stage("signing_keys") as st:
        try:
            keys = verify_signing_keys(body, root_pem)
            written = await asyncio.to_thread(write_signing_keys, os.path.join(b.handoff_dir, "signing-keys"), keys)
        except ArtifactError as exc:
            raise BootFailure("signing_keys", exc.detail, marker=exc.marker) from None
        st.detail = f"{len(written)} key(s) verified"


# ── per generation ───────────────────────────────────────────────────────────

async def after_12(run: Run, resp: BootAttestationResponse) -> None:
    b = run.b
    await unlock_root(b, run.cs, run.timer, run.status, resp.key)
    assert resp.boot_token is not None
    # Volumes before the hand-off files: the token is in memory, and a failed boot leaves no boot-token.
    await legacy_volumes(run, resp.boot_token)
    with run.timer.stage("handoff") as st:
        run.handoff += write_handoff(b.handoff_dir, run.ident.vm_name, run.ident.miner_hotkey, resp.boot_token)
        st.detail = ", ".join(run.handoff)


async def after_13(run: Run, resp: BootAttestationResponse) -> None:
    b = run.b
    assert resp.luks_quote_nonce is not None
    await unlock_root(b, run.cs, run.timer, run.status, resp.key)
    await _handoff_13(run, resp.luks_quote_nonce)
    await rtmr3_chain(run)
    keys = await fetch_storage_keys(run, "1.3", resp.luks_quote_nonce)
    try:
        await storage_volumes(run, "1.3", keys)
    finally:
        keys.wipe()
    remove_handoff_file(b.handoff_dir, "cert-hash")


async def _handoff_13(run: Run, luks_quote_nonce: str) -> None:
    with run.timer.stage("handoff") as st:
        run.handoff += write_handoff(run.b.handoff_dir, run.ident.vm_name, run.ident.miner_hotkey, extra={
            "luks-quote-nonce": luks_quote_nonce.encode(),
            "cert-hash": run.identity.spki_sha256.hex().encode(),
        })
        st.detail = ", ".join(run.handoff)


async def after_14(run: Run, resp: BootAttestationResponse) -> None:
    b = run.b
    assert resp.luks_quote_nonce is not None and resp.vm_auth_ss58 is not None
    _signer(run)
    # Root confirm first: the confirm nonce is shared by root and storage confirm (§5, "Validator state").
    await root_14(run, resp)
    await _handoff_13(run, resp.luks_quote_nonce)
    with run.timer.stage("vm_root_ca") as st:
        try:
            await asyncio.to_thread(vm_ca.write_ca, run.identity, os.path.join(b.handoff_dir, vm_ca.CA_SUBDIR))
        except (OSError, vm_ca.VMCAError) as exc:
            raise BootFailure("vm_root_ca", str(exc), marker=M_TLS) from None
        run.ca_written = True
        st.detail = f"CA SPKI sha256 {run.identity.spki_sha256.hex()[:16]}…"
    await rtmr3_chain(run)
    keys = await fetch_storage_keys(run, "1.4", resp.luks_quote_nonce)
    try:
        await storage_volumes(run, "1.4", keys)
    finally:
        keys.wipe()
        # the provision confirm was the last signed call: the seed-derived secret goes now (§4.3 step 9)
        if run.ident.signer is not None:
            run.ident.signer.wipe()
    remove_handoff_file(b.handoff_dir, "cert-hash")
    await vm_tls(run)
    await validator_auth(run, resp.vm_auth_ss58)
    await signing_keys(run)


STEPS = {"1.2": after_12, "1.3": after_13, "1.4": after_14}
