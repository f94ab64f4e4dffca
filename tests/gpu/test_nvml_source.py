"""NvmlGpuSource through the REAL pynvml wrapper, with an emulated NVML library object behind it."""

from __future__ import annotations

import base64
import os

import pynvml
import pytest

from agent.config import AgentConfig, ConfigError
from agent.evidence.base import GpuEvidenceError
from agent.evidence.device_info import GpuIdError, UnknownGpuIdError
from agent.evidence.gpu_sources import make_gpu_source
from agent.evidence.gpu_verify import verify_evidence_entry
from agent.evidence.nvml_gpu import (
    GpuNotConfidentialError,
    GpuTimeoutError,
    GpuUnavailableError,
    NvmlGpuSource,
)
from agent.sim.fake_nvml import HANG, MISSING, FakeGpu, FakeSystem, no_nvml_library, simulated_gpus
from tests.gpu.conftest import sample_gpu, write

REPORT = "nvmlDeviceGetConfComputeGpuAttestationReport"
CERT = "nvmlDeviceGetConfComputeGpuCertificate"


def _decoded(entry):
    return base64.b64decode(entry["evidence"]), base64.b64decode(entry["certificate"])


# -- real samples behind the real wrapper ------------------------------------------------------------

async def test_h100_sample_through_pynvml(fake_nvml, make_source, h100_sample, nvidia_root):
    fake = fake_nvml([sample_gpu(h100_sample, 0)])
    src = make_source()
    ev = await src.evidence(h100_sample.nonce)
    assert len(ev) == 1
    assert set(ev[0]) == {"certificate", "evidence", "arch"}
    assert ev[0]["arch"] == "HOPPER"
    assert _decoded(ev[0]) == (h100_sample.report, h100_sample.chain)
    assert verify_evidence_entry(ev[0], h100_sample.nonce, nvidia_root).ok
    assert fake.lib.calls[REPORT] == 1 and fake.lib.calls["nvmlInitWithFlags"] == 1


async def test_ppcie_eight_gpus_in_index_order(fake_nvml, make_source, ppcie_samples, nvidia_root):
    system = FakeSystem(cc_feature=0, multi_gpu_mode=pynvml.NVML_CC_SYSTEM_MULTIGPU_PROTECTED_PCIE)
    fake_nvml([sample_gpu(s, i) for i, s in enumerate(ppcie_samples)], system=system)
    src = make_source()
    assert src.cc_state() == {"environment": "production", "cc_feature": False, "dev_tools_mode": False,
                              "multi_gpu_mode": "protected_pcie"}
    nonce = ppcie_samples[0].nonce
    ev = await src.evidence(nonce)
    assert [_decoded(e) for e in ev] == [(s.report, s.chain) for s in ppcie_samples]
    assert all(verify_evidence_entry(e, nonce, nvidia_root).ok for e in ev)


async def test_fixed_sample_asked_for_another_nonce_is_an_nvml_error(fake_nvml, make_source, h100_sample):
    fake_nvml([sample_gpu(h100_sample, 0)])
    with pytest.raises(GpuEvidenceError, match=r"GPU 0 .*attestation report: NVML rejected") as ei:
        await make_source().evidence(os.urandom(32))
    assert ei.value.nvml_code == pynvml.NVML_ERROR_INVALID_ARGUMENT


async def test_replayed_stale_report_is_caught_by_local_verification(fake_nvml, make_source, h100_sample):
    fake_nvml([sample_gpu(h100_sample, 0, on_nonce_mismatch="replay")])
    nonce = os.urandom(32)
    ev = await make_source().evidence(nonce)
    res = verify_evidence_entry(ev[0], nonce)
    assert [c.name for c in res.failed()] == ["nonce"]


# -- simulated devices: fresh nonces -------------------------------------------------------------------

async def test_simulated_gpus_fresh_nonces(fake_nvml, make_source, sim_ca, nvidia_root):
    fake = fake_nvml(simulated_gpus(4, "h100", sim_ca))
    src = make_source()
    for _ in range(2):
        nonce = os.urandom(32)
        ev = await src.evidence(nonce)
        assert len(ev) == 4
        assert all(verify_evidence_entry(e, nonce, sim_ca.root_pem).ok for e in ev)
        assert not any(verify_evidence_entry(e, nonce, nvidia_root).ok for e in ev)
    assert fake.lib.calls[REPORT] == 8
    assert fake.lib.calls[CERT] == 4  # chains cached per GPU
    chains = {e["certificate"] for e in ev}
    assert len(chains) == 4  # one chip identity per GPU


async def test_blackwell_arch(fake_nvml, make_source, sim_ca):
    fake_nvml(simulated_gpus(2, "b200", sim_ca))
    ev = await make_source().evidence(os.urandom(32))
    assert [e["arch"] for e in ev] == ["BLACKWELL", "BLACKWELL"]


async def test_unknown_architecture_rejected(fake_nvml, make_source, sim_ca):
    gpus = simulated_gpus(1, "h100", sim_ca)
    gpus[0].arch = 7  # Volta
    fake_nvml(gpus)
    with pytest.raises(GpuEvidenceError, match="unsupported architecture 7"):
        await make_source().evidence(os.urandom(32))


@pytest.mark.parametrize("bad", [b"\x00" * 31, b"\x00" * 33, "00" * 32, None])
async def test_nonce_must_be_32_bytes(fake_nvml, make_source, bad):
    fake = fake_nvml(1)
    with pytest.raises(ValueError, match="nonce: expected exactly 32 bytes"):
        await make_source().evidence(bad)
    assert fake.lib.calls[REPORT] == 0


# -- CC state ------------------------------------------------------------------------------------------

async def test_cc_off_refused(fake_nvml, make_source):
    fake = fake_nvml(2, system=FakeSystem(cc_feature=0))
    with pytest.raises(GpuNotConfidentialError, match="confidential computing is off"):
        await make_source().evidence(os.urandom(32))
    assert fake.lib.calls[REPORT] == 0


async def test_devtools_mode_refused(fake_nvml, make_source):
    fake_nvml(1, system=FakeSystem(dev_tools_mode=1))
    with pytest.raises(GpuNotConfidentialError, match="DevTools"):
        await make_source().evidence(os.urandom(32))


def test_cc_state_without_settings_symbol(fake_nvml, make_source):
    fake_nvml(1, faults={"nvmlSystemGetConfComputeSettings": MISSING})
    assert make_source().cc_state()["multi_gpu_mode"] == "none"


def test_cc_settings_error_code_is_raised(fake_nvml, make_source):
    fake_nvml(1, faults={"nvmlSystemGetConfComputeSettings": pynvml.NVML_ERROR_GPU_IS_LOST})
    with pytest.raises(GpuEvidenceError, match="read CC state: the GPU is lost"):
        make_source().cc_state()


# -- NVML errors -----------------------------------------------------------------------------------------

async def test_library_not_found_through_real_nvmlinit(make_source):
    with no_nvml_library():
        src = make_source()
        with pytest.raises(GpuUnavailableError, match=r"libnvidia-ml\.so\.1\) not found") as ei:
            await src.evidence(os.urandom(32))
        assert ei.value.nvml_code == pynvml.NVML_ERROR_LIBRARY_NOT_FOUND
        with pytest.raises(GpuUnavailableError):
            await src.devices()


async def test_configured_library_path_missing(make_source, tmp_path):
    with no_nvml_library():
        with pytest.raises(GpuUnavailableError, match=r"cannot load gpu\.nvml_library"):
            await make_source(nvml_library=str(tmp_path / "libnvidia-ml.so.1")).devices()


async def test_not_supported(fake_nvml, make_source):
    fake_nvml(2, faults={REPORT: pynvml.NVML_ERROR_NOT_SUPPORTED})
    with pytest.raises(GpuEvidenceError, match="attestation report: not supported") as ei:
        await make_source().evidence(os.urandom(32))
    assert ei.value.nvml_code == pynvml.NVML_ERROR_NOT_SUPPORTED


async def test_one_gpu_lost(fake_nvml, make_source, sim_ca):
    gpus = simulated_gpus(3, "h100", sim_ca)
    gpus[1].faults[REPORT] = pynvml.NVML_ERROR_GPU_IS_LOST
    fake_nvml(gpus)
    with pytest.raises(GpuEvidenceError, match=r"GPU 1 \(GPU-.*\) attestation report: the GPU is lost"):
        await make_source().evidence(os.urandom(32))


async def test_nvml_timeout_code(fake_nvml, make_source):
    fake_nvml(1, faults={CERT: pynvml.NVML_ERROR_TIMEOUT})
    with pytest.raises(GpuTimeoutError, match="certificate chain: NVML reported a timeout"):
        await make_source().evidence(os.urandom(32))


async def test_hung_call_times_out(fake_nvml, make_source):
    fake_nvml(2, faults={REPORT: HANG})
    with pytest.raises(GpuTimeoutError, match=r"attestation report: no answer from NVML within 0.2 s"):
        await make_source(call_timeout_s=0.2).evidence(os.urandom(32))


def test_hung_sync_call_times_out(fake_nvml, make_source):
    fake_nvml(1, faults={"nvmlSystemGetConfComputeGpusReadyState": HANG})
    with pytest.raises(GpuTimeoutError, match="ready state: no answer"):
        make_source(call_timeout_s=0.2).ready_state()


async def test_old_driver_missing_symbol(fake_nvml, make_source):
    fake_nvml(1, faults={REPORT: MISSING})
    with pytest.raises(GpuEvidenceError, match="driver is too old"):
        await make_source().evidence(os.urandom(32))


# -- gpu_ids filter -----------------------------------------------------------------------------------------

async def test_gpu_ids_filter_forms(fake_nvml, make_source, sim_ca):
    gpus = simulated_gpus(8, "h100", sim_ca)
    fake_nvml(gpus)
    src = make_source()
    u = [g.uuid for g in gpus]
    bare = [x[4:].replace("-", "") for x in u]
    # reverse order, mixed forms, comma list + repeat + duplicate: result is NVML index order
    ids = [f"{u[6]},{bare[2].upper()}", f" gpu-{u[4][4:]} ", u[6][4:], ""]
    devs = await src.devices(ids)
    assert [d["uuid"] for d in devs] == [bare[2], bare[4], bare[6]]
    nonce = os.urandom(32)
    ev = await src.evidence(nonce, ids)
    assert [e["certificate"] for e in ev] == [
        base64.b64encode(gpus[i].device.cert_chain_pem).decode() for i in (2, 4, 6)
    ]
    assert len(await src.evidence(nonce, None)) == 8
    assert len(await src.evidence(nonce, [])) == 8


async def test_unknown_gpu_id(fake_nvml, make_source):
    fake = fake_nvml(2)
    src = make_source()
    missing = "GPU-d52bd152-0847-8ba8-ca49-e07ec1f002e6"
    with pytest.raises(UnknownGpuIdError, match="d52bd15208478ba8ca49e07ec1f002e6") as ei:
        await src.evidence(os.urandom(32), [fake.gpus[0].uuid, missing])
    assert isinstance(ei.value, ValueError)
    assert fake.lib.calls[REPORT] == 0


async def test_garbage_gpu_id_fails_before_nvml(fake_nvml, make_source):
    fake = fake_nvml(1)
    with pytest.raises(GpuIdError, match="'MIG-1234' is not a GPU UUID"):
        await make_source().devices(["MIG-1234"])
    assert fake.lib.calls["nvmlInitWithFlags"] == 0


# -- DeviceInfo ------------------------------------------------------------------------------------------------

async def test_device_info_exact(fake_nvml, make_source):
    gpu = FakeGpu(uuid="GPU-d52bd152-0847-8ba8-ca49-e07ec1f002e6", name="NVIDIA H200", memory_total=150754820096,
                  cuda_major=9, cuda_minor=0, max_graphics_clock_mhz=1980, ecc=False)
    other = FakeGpu(uuid="GPU-00000000-1111-2222-3333-444444444444", name="NVIDIA RTX A6000",
                    memory_total=51527024640, cuda_major=8, cuda_minor=6, max_graphics_clock_mhz=2100, ecc=True)
    fake_nvml([gpu, other])
    devs = await make_source().devices()
    assert devs == [
        {"uuid": "d52bd15208478ba8ca49e07ec1f002e6", "name": "NVIDIA H200", "memory": 150754820096, "major": 9,
         "minor": 0, "clock_rate": 1980000.0, "ecc": False, "model_short_ref": "h200"},
        {"uuid": "00000000111122223333444444444444", "name": "NVIDIA RTX A6000", "memory": 51527024640,
         "major": 8, "minor": 6, "clock_rate": 2100000.0, "ecc": True, "model_short_ref": "a6000"},
    ]
    assert list(devs[0]) == ["uuid", "name", "memory", "major", "minor", "clock_rate", "ecc", "model_short_ref"]
    assert isinstance(devs[0]["clock_rate"], float)


async def test_device_info_ecc_not_supported_is_false(fake_nvml, make_source):
    fake_nvml(1, faults={"nvmlDeviceGetEccMode": pynvml.NVML_ERROR_NOT_SUPPORTED})
    assert (await make_source().devices())[0]["ecc"] is False


async def test_device_info_gpu_lost(fake_nvml, make_source):
    fake_nvml(1, faults={"nvmlDeviceGetName": pynvml.NVML_ERROR_GPU_IS_LOST})
    with pytest.raises(GpuEvidenceError, match="device info: the GPU is lost"):
        await make_source().devices()


# -- ready state -----------------------------------------------------------------------------------------------

async def test_ready_state_set_only_after_local_verification(fake_nvml, make_source, sim_ca, tmp_path):
    fake = fake_nvml(simulated_gpus(3, "h100", sim_ca))
    root = write(tmp_path, "sim-root.pem", sim_ca.root_pem)
    src = make_source(set_ready_after_verify=True, device_root_ca=root)
    assert src.ready_state() is False
    await src.evidence(os.urandom(32), [fake.gpus[0].uuid])  # only part of the GPUs: not enough
    assert fake.system.ready_state == 0
    await src.evidence(os.urandom(32))
    assert fake.system.ready_state == 1
    assert src.ready_state() is True


async def test_ready_state_not_set_when_verification_fails(fake_nvml, make_source, sim_ca):
    fake = fake_nvml(simulated_gpus(2, "h100", sim_ca))
    src = make_source(set_ready_after_verify=True)  # pinned NVIDIA root: simulated chains fail
    ev = await src.evidence(os.urandom(32))
    assert len(ev) == 2  # evidence is still returned (the validator decides)
    assert fake.system.ready_state == 0
    assert fake.lib.calls["nvmlSystemSetConfComputeGpusReadyState"] == 0


async def test_ready_state_never_touched_by_default(fake_nvml, make_source, sim_ca, tmp_path):
    fake = fake_nvml(simulated_gpus(1, "h100", sim_ca))
    await make_source(device_root_ca=write(tmp_path, "r.pem", sim_ca.root_pem)).evidence(os.urandom(32))
    assert fake.lib.calls["nvmlSystemSetConfComputeGpusReadyState"] == 0


# -- factory -----------------------------------------------------------------------------------------------------

async def test_factory(sim_ca):
    cfg = AgentConfig()
    cfg.gpu.enabled = False
    assert make_gpu_source(cfg) is None
    cfg.gpu.enabled = True
    cfg.gpu.emulate = "h100"
    with pytest.raises(ConfigError, match=r"gpu\.emulate"):
        make_gpu_source(cfg)
    cfg.gpu.emulate = "h200x3"
    before = pynvml.nvmlLib
    src = make_gpu_source(cfg)
    try:
        assert isinstance(src, NvmlGpuSource)
        assert pynvml.nvmlLib is src.emulation.lib
        devs = await src.devices()
        assert [d["model_short_ref"] for d in devs] == ["h200"] * 3
        nonce = os.urandom(32)
        assert all(verify_evidence_entry(e, nonce, sim_ca.root_pem).ok for e in await src.evidence(nonce))
    finally:
        src.close()
    assert pynvml.nvmlLib is before  # close() uninstalled the emulation


def test_real_nvml_is_the_default():
    cfg = AgentConfig()
    assert cfg.gpu.emulate == ""
    before = pynvml.nvmlLib
    src = make_gpu_source(cfg)
    try:
        assert isinstance(src, NvmlGpuSource)
        assert pynvml.nvmlLib is before  # nothing installed behind pynvml
    finally:
        src.close()


# -- worker threads ----------------------------------------------------------------------------------------

async def test_nvml_workers_are_reused(fake_nvml, make_source, monkeypatch):
    """Starting a thread blocks the event loop until it runs; idle workers take the next calls instead."""
    import threading

    starts: list[str] = []
    real_start = threading.Thread.start

    def counting_start(self: threading.Thread) -> None:
        starts.append(self.name)
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", counting_start)
    fake_nvml(1)
    src = make_source()
    for _ in range(8):
        entries = await src.evidence(os.urandom(32))
        assert len(entries) == 1 and entries[0]["arch"] == "HOPPER"
    # 8 evidence calls are ~40 NVML calls, one after another: one worker serves them all
    assert starts.count("nvml-call") == 1


async def test_hung_call_keeps_its_thread_and_others_go_on(fake_nvml, make_source):
    """A call stuck in the driver holds its own worker; the next calls get another one and succeed."""
    fake = fake_nvml(1, faults={REPORT: HANG})
    src = make_source(call_timeout_s=0.2)
    with pytest.raises(GpuTimeoutError, match="attestation report: no answer"):
        await src.evidence(os.urandom(32))
    fake.lib.faults.clear()
    entries = await src.evidence(os.urandom(32))
    assert len(base64.b64decode(entries[0]["evidence"])) > 32
    assert src._inflight == 1  # the hung call, still counted against MAX_INFLIGHT_CALLS


async def test_one_worker_call_per_gpu_after_the_first_request(fake_nvml, make_source, sim_ca):
    """Each thread hop waits for a busy event loop and the GIL: after the first request (init, state and
    the GPU list on their own) a request costs one worker call per GPU, all at once, state included."""
    fake = fake_nvml(simulated_gpus(2, "h100", sim_ca))
    src = make_source()
    jobs: list[str] = []
    real_spawn = src._spawn

    def counting_spawn(what, fn, *args):
        jobs.append(what)
        return real_spawn(what, fn, *args)

    src._spawn = counting_spawn
    await src.evidence(os.urandom(32))
    assert jobs[:2] == ["NVML init", "read CC state"] and len(jobs) == 4  # + one per GPU
    jobs.clear()
    before = fake.lib.calls["nvmlSystemGetConfComputeState"]
    ev = await src.evidence(os.urandom(32))
    assert len(ev) == 2
    assert sorted(jobs) == sorted(f"GPU {i} ({u}) evidence" for i, u in enumerate(g.uuid for g in fake.lib.gpus))
    assert fake.lib.calls["nvmlSystemGetConfComputeState"] == before + 1  # still read every request
    assert fake.lib.calls["nvmlDeviceGetCount_v2"] == 1  # the GPU list is read once


async def test_cc_turned_off_after_the_first_request_is_still_refused_before_any_report(fake_nvml, make_source):
    fake = fake_nvml(2)
    src = make_source()
    await src.evidence(os.urandom(32))
    reports = fake.lib.calls[REPORT]
    fake.lib.system.cc_feature = 0
    with pytest.raises(GpuNotConfidentialError, match="confidential computing is off"):
        await src.evidence(os.urandom(32))
    # the GPU whose job read the state produced no report; the other may have (its report is discarded)
    assert fake.lib.calls[REPORT] - reports <= 1


async def test_a_timeout_inside_a_combined_call_names_the_call_that_hung(fake_nvml, make_source):
    fake_nvml(1, faults={REPORT: HANG})
    src = make_source(call_timeout_s=0.2)
    with pytest.raises(GpuTimeoutError, match=r"GPU 0 \(GPU-[0-9a-f-]+\) attestation report: no answer"):
        await src.evidence(os.urandom(32))
