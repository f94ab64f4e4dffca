"""What ``chutes-attest boot`` reads from the initramfs root, for one configuration: what the image must carry.

The initramfs hook (``initramfs/hooks/chutes-attest``) asks for this list (``chutes-attest config
initramfs-files``) for the agent.toml it bakes, copies every entry from the image root (the build
system's ``/`` for update-initramfs) and fails the build when one is missing, naming the config key, the
path and how to provide it. An image whose first boot would power off at the config step is never built.

Per generation the boot may speak (``boot.protocol``: "auto" = any of them, else the pinned one):

==========================  =======  ==========================================================================
key                         kind     needed when
==========================  =======  ==========================================================================
``boot.ca_bundle``          file     always (every validator call; empty = the system bundle)
``boot.cryptsetup``         program  always (the root unlock)
``boot.measure_conf``       file     1.3 / 1.4 with ``boot.rtmr3_chain`` (scheme "1.4": /etc/tdx-measure.conf,
                                     "next": /etc/tee-measure.conf; :meth:`BootConfig.measure_files`)
``boot.rtmr3_manifest``     file     same (1.4: /etc/tdx-rtmr3-expected-hashes, next: /etc/rootfs-manifest)
``boot.storage_mkfs``       program  1.3 / 1.4 with ``boot.unlock_action = "open"`` (a first-use storage volume)
``boot.signing_root_key``   file     1.4 (the signing-keys bundle is checked against it)
``boot.proxy_tls_group``    group    1.4 (``/run/chutes/proxy-tls`` is made root:<group>; name and gid only)
==========================  =======  ==========================================================================

Not listed, on purpose: paths the boot creates or writes (``handoff_dir``, ``header_dir``, ``resolv_conf``,
``config_mount``), devices (``kmsg_path``, ``rtmr.sysfs_path``, the disks), the per-VM config volume, and
``quote.simulated_state_dir`` (made on first use; test images only). The hook copies the agent itself,
cryptsetup, mkfs.ext4 and the kernel modules unconditionally.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from agent.config import AgentConfig
from agent.validator.transport import SYSTEM_CA_BUNDLE

#: Generations ``boot.protocol`` lets the boot speak ("auto": whatever the validator answers with).
ALL_GENERATIONS = frozenset({"1.2", "1.3", "1.4"})
#: Debian packages that provide the usual programs (for the hint only).
_PACKAGES = {"cryptsetup": "cryptsetup-bin", "mkfs.xfs": "xfsprogs", "mkfs.ext4": "e2fsprogs"}


@dataclass(frozen=True)
class ImageFile:
    """One thing the image must carry.

    ``kind``: "file" (copied to the same path), "program" (an absolute path, or a name looked up in PATH;
    copied with its shared libraries), "group" (``path`` is a group name: its /etc/group entry).
    """

    key: str
    kind: str
    path: str
    hint: str

    def line(self) -> str:
        """``key<TAB>kind<TAB>path<TAB>hint`` (what the hook reads)."""
        for part in (self.key, self.kind, self.path, self.hint):
            if "\t" in part or "\n" in part:
                raise ValueError(f"{self.key}: {part!r} holds a tab or newline")
        return "\t".join((self.key, self.kind, self.path, self.hint))


def generations(protocol: str) -> frozenset[str]:
    return ALL_GENERATIONS if protocol == "auto" else frozenset({protocol})


def _package(program: str) -> str:
    name = os.path.basename(program)
    pkg = _PACKAGES.get(name)
    return f"install {pkg}" if pkg else f"install the package that provides {name}"


def required_files(cfg: AgentConfig, where: str = "agent.toml") -> list[ImageFile]:
    """Everything the boot under ``cfg`` reads from the initramfs root; ``where`` names the config in hints.

    Each hint reads "<who needs it>: <how to provide it> or set <key> in <where> (<when it is not needed>)".
    """
    b = cfg.boot
    gens = generations(b.protocol)
    proto = f'boot.protocol "{b.protocol}"'
    out: list[ImageFile] = []

    def need(key: str, kind: str, path: str, why: str, how: str, unless: str = "") -> None:
        text = f"{why + ': ' if why else ''}{how} or set {key} in {where}{f' ({unless})' if unless else ''}"
        out.append(ImageFile(key, kind, path, text))

    bundle = b.ca_bundle or SYSTEM_CA_BUNDLE
    need("boot.ca_bundle", "file", bundle, "",
         "install ca-certificates" if bundle == SYSTEM_CA_BUNDLE else "put the validator's CA bundle (PEM) there")
    need("boot.cryptsetup", "program", b.cryptsetup, "", _package(b.cryptsetup))
    if gens & {"1.3", "1.4"}:
        if b.rtmr3_chain:
            conf, manifest = b.measure_files()
            why = f'the ≥1.3 RTMR3 rootfs chain reads it ({proto}, boot.rtmr3_scheme "{b.rtmr3_scheme}")'
            unless = 'not needed with boot.rtmr3_chain = false or boot.protocol = "1.2"'
            need("boot.measure_conf", "file", conf, why, "put the image's measured-path list there", unless)
            need("boot.rtmr3_manifest", "file", manifest, why,
                 "put the expected-hash manifest there (<path> <sha384hex> lines over the final image, from the "
                 "same list)", unless)
        if b.unlock_action == "open":
            need("boot.storage_mkfs", "program", b.storage_mkfs,
                 f"it formats a first-use ≥1.3 storage volume ({proto})", _package(b.storage_mkfs),
                 'not needed with boot.protocol = "1.2"')
    if "1.4" in gens:
        unless = 'not needed with boot.protocol = "1.2" or "1.3"'
        need("boot.signing_root_key", "file", b.signing_root_key,
             f"the 1.4.0 signing-keys check reads it ({proto})",
             "put the validator's root signing public key (PEM) there", unless)
        need("boot.proxy_tls_group", "group", b.proxy_tls_group,
             f"it owns the 1.4.0 /run/chutes/proxy-tls hand-off ({proto})",
             "create it in the image root (the package's sysusers.d entry does: systemd-sysusers)", unless)
    return out
