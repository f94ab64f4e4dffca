"""Offline GPU evidence verification against the real NVIDIA samples and simulated devices."""

from __future__ import annotations

import base64
import os

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.evidence.gpu_verify import (
    fwids_from_leaf,
    pinned_root_pem,
    verify_evidence_entry,
    verify_gpu_evidence,
)
from agent.evidence.spdm import OPAQUE_CODES, parse_report
from agent.sim.gpu_sim import SimulatedDeviceCA, SimulatedGpuDevice


def _status(result):
    return {c.name: c.passed for c in result.checks}


ALL_PASS = {"parse": True, "chain": True, "nonce": True, "signature": True, "fwid": True}


def _pem(certs):
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def test_packaged_root_is_the_nvidia_root(nvidia_root):
    assert pinned_root_pem() == nvidia_root


def test_h100_sample_verifies(h100_sample):
    res = verify_gpu_evidence(h100_sample.report, h100_sample.chain, h100_sample.nonce)
    assert res.ok
    assert _status(res) == ALL_PASS
    assert res.not_checked == ("ocsp", "rim")
    assert res.to_dict()["not_checked"] == ["ocsp", "rim"]
    assert res.info["driver_version"] == "550.90.07"


def test_all_eight_ppcie_samples_verify(ppcie_samples, nvidia_root):
    for s in ppcie_samples:
        res = verify_gpu_evidence(s.report, s.chain, s.nonce, nvidia_root)
        assert _status(res) == ALL_PASS, res.failed()
        assert res.info["feature_flag"] == "PPCIE"


def test_wire_entry_form(ppcie_samples):
    s = ppcie_samples[3]
    entry = {"certificate": base64.b64encode(s.chain).decode(), "evidence": base64.b64encode(s.report).decode()}
    assert verify_evidence_entry(entry, s.nonce).ok
    with pytest.raises(ValueError, match="missing field 'evidence'"):
        verify_evidence_entry({"certificate": entry["certificate"]}, s.nonce)
    with pytest.raises(ValueError, match="base64"):
        verify_evidence_entry({**entry, "evidence": "!!"}, s.nonce)


def test_one_bit_flip_in_a_measurement_fails_signature(h100_sample):
    bad = bytearray(h100_sample.report)
    bad[37 + 8 + 7 + 10] ^= 0x01  # inside measurement block 1's digest
    res = verify_gpu_evidence(bytes(bad), h100_sample.chain, h100_sample.nonce)
    assert not res.ok
    assert _status(res) == {**ALL_PASS, "signature": False}


def test_one_bit_flip_in_the_signature_fails(h100_sample):
    bad = bytearray(h100_sample.report)
    bad[-1] ^= 0x80
    assert _status(verify_gpu_evidence(bytes(bad), h100_sample.chain, h100_sample.nonce))["signature"] is False


def test_wrong_nonce_fails_only_nonce(h100_sample):
    wrong = bytes(32)
    res = verify_gpu_evidence(h100_sample.report, h100_sample.chain, wrong)
    assert _status(res) == {**ALL_PASS, "nonce": False}
    assert "931d8dd0" in res.failed()[0].detail


def test_nonce_must_be_32_bytes(h100_sample):
    with pytest.raises(ValueError, match="nonce: expected exactly 32 bytes"):
        verify_gpu_evidence(h100_sample.report, h100_sample.chain, h100_sample.nonce.hex().encode())


@pytest.mark.parametrize("drop", [1, 2, 3])
def test_chain_missing_a_certificate_fails(h100_sample, drop):
    certs = x509.load_pem_x509_certificates(h100_sample.chain)
    del certs[drop]
    res = verify_gpu_evidence(h100_sample.report, _pem(certs), h100_sample.nonce)
    assert not res.ok
    assert _status(res)["chain"] is False
    assert "expected 5 certificates" in res.failed()[0].detail


def test_chain_with_a_swapped_intermediate_fails(h100_sample, ppcie_samples):
    ours = x509.load_pem_x509_certificates(h100_sample.chain)
    other = x509.load_pem_x509_certificates(ppcie_samples[0].chain)
    ours[1] = other[1]  # another chip's BROM certificate: right shape, wrong issuer of our leaf
    res = verify_gpu_evidence(h100_sample.report, _pem(ours), h100_sample.nonce)
    assert _status(res)["chain"] is False
    assert "certificate 0" in res.failed()[0].detail


def test_the_root_the_node_sends_is_not_trusted(h100_sample, sim_ca):
    certs = x509.load_pem_x509_certificates(h100_sample.chain)
    certs[-1] = sim_ca.root  # replacing the sent root changes nothing: the pinned one is used
    res = verify_gpu_evidence(h100_sample.report, _pem(certs), h100_sample.nonce)
    assert res.ok
    assert "differs from the pinned root" in next(c for c in res.checks if c.name == "chain").detail


def test_real_sample_fails_against_another_root(h100_sample, sim_ca):
    res = verify_gpu_evidence(h100_sample.report, h100_sample.chain, h100_sample.nonce, sim_ca.root_pem)
    assert _status(res) == {**ALL_PASS, "chain": False}


def test_leaf_fwid_is_the_reported_fwid(h100_sample):
    leaf = x509.load_pem_x509_certificates(h100_sample.chain)[0]
    assert fwids_from_leaf(leaf) == [parse_report(h100_sample.report).opaque.fwid]


def test_unparseable_report_reports_every_check(h100_sample):
    res = verify_gpu_evidence(h100_sample.report[:100], h100_sample.chain, h100_sample.nonce)
    assert _status(res) == {"parse": False, "chain": True, "nonce": False, "signature": False, "fwid": False}


def test_garbage_chain(h100_sample):
    res = verify_gpu_evidence(h100_sample.report, b"not a pem", h100_sample.nonce)
    assert _status(res)["chain"] is False and _status(res)["signature"] is False


# -- simulated devices: any nonce, real format, only the simulated root ------------------------------

def test_simulated_reports_verify_for_fresh_nonces(sim_ca):
    dev = sim_ca.device("t/0", "h100")
    seen = set()
    for _ in range(3):
        nonce = os.urandom(32)
        report = dev.report(nonce)
        seen.add(report)
        parsed = parse_report(report)
        assert parsed.nonce == nonce and len(parsed.blocks) == 64
        assert _status(verify_gpu_evidence(report, dev.cert_chain_pem, nonce, sim_ca.root_pem)) == ALL_PASS
    assert len(seen) == 3


def test_simulated_reports_fail_against_the_nvidia_root(sim_ca, nvidia_root):
    dev = sim_ca.device("t/1", "b200")
    nonce = os.urandom(32)
    res = verify_gpu_evidence(dev.report(nonce), dev.cert_chain_pem, nonce, nvidia_root)
    assert _status(res) == {**ALL_PASS, "chain": False}
    assert not verify_gpu_evidence(dev.report(nonce), dev.cert_chain_pem, nonce).ok  # default = NVIDIA root


def test_simulated_root_is_stable_across_instances(sim_ca):
    assert SimulatedDeviceCA().root.public_key() == sim_ca.root.public_key()
    assert SimulatedDeviceCA(b"other seed").root.public_key() != sim_ca.root.public_key()


def test_fwid_mismatch_fails_only_fwid(sim_ca):
    class WrongFwid(SimulatedGpuDevice):
        def _opaque(self) -> bytes:
            raw = super()._opaque()
            tag = OPAQUE_CODES["fwid"].to_bytes(2, "little") + (48).to_bytes(2, "little")
            i = raw.index(tag + self.fwid) + 4
            return raw[:i] + bytes(48) + raw[i + 48:]

    dev = WrongFwid(sim_ca, "t/2", sim_ca.device("t/2").model)
    nonce = os.urandom(32)
    res = verify_gpu_evidence(dev.report(nonce), dev.cert_chain_pem, nonce, sim_ca.root_pem)
    assert _status(res) == {**ALL_PASS, "fwid": False}
