"""The 1.4.0 miner key on the config volume: seed or private key (exactly one), miner-ss58 only a cross-check.

Unit tier: a plain directory stands in for the mounted volume (the mount itself is covered by the e2e tests).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.boot.config_volume import ConfigVolumeError, read_identity_from_dir
from agent.validator.proof import Hotkey

SEED = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"


def _vol(tmp: Path, **files: str) -> Path:
    (tmp / "hostname").write_text("vm-1\n")
    for name, text in files.items():
        (tmp / name.replace("_", "-")).write_text(text)
    return tmp


def test_seed_derives_the_hotkey(tmp_path: Path) -> None:
    ident = read_identity_from_dir(_vol(tmp_path, miner_seed=SEED + "\n"))
    expected = Hotkey.from_seed_hex(SEED).ss58
    assert ident.miner_hotkey == expected and ident.signer is not None and ident.signer.ss58 == expected


def test_matching_miner_ss58_is_a_cross_check(tmp_path: Path) -> None:
    ss58 = Hotkey.from_seed_hex(SEED).ss58
    ident = read_identity_from_dir(_vol(tmp_path, miner_seed=SEED, miner_ss58=ss58 + "\n"))
    assert ident.miner_hotkey == ss58


def test_mismatching_miner_ss58_fails_closed(tmp_path: Path) -> None:
    other = Hotkey.from_seed_hex("11" * 32).ss58
    with pytest.raises(ConfigVolumeError, match="does not match the hotkey"):
        read_identity_from_dir(_vol(tmp_path, miner_seed=SEED, miner_ss58=other))


def test_seed_and_private_key_together_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigVolumeError, match="exactly one may be"):
        read_identity_from_dir(_vol(tmp_path, miner_seed=SEED, miner_private_key="ab" * 64))


@pytest.mark.parametrize("text", ["0x" + SEED, SEED[:-2], SEED[:-1] + "g"])
def test_malformed_seed_is_refused_without_echoing_it(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigVolumeError) as exc:
        read_identity_from_dir(_vol(tmp_path, miner_seed=text))
    assert SEED[:16] not in str(exc.value)


def test_without_a_key_miner_ss58_is_required(tmp_path: Path) -> None:
    with pytest.raises(ConfigVolumeError, match="'miner-ss58' missing"):
        read_identity_from_dir(_vol(tmp_path))
