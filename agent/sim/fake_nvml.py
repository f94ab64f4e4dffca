"""An emulated NVML *library object* installed behind the real ``pynvml`` wrapper.

``pynvml`` keeps the loaded ``libnvidia-ml.so.1`` in the module global ``pynvml.nvmlLib`` and looks
each C symbol up with ``getattr(nvmlLib, name)``. :func:`install_fake_nvml` puts a
:class:`FakeNvmlLibrary` there whose attributes are ctypes ``CFUNCTYPE`` function pointers around
Python callbacks. So the production code calls the real wrapper, the wrapper builds its real ctypes
structs and passes pointers through the real FFI, the callbacks fill those structs through the raw
addresses, and real ``NVML_ERROR_*`` return codes go through the wrapper's own error mapping.
A symbol the fake does not export gives ``NVMLError_FunctionNotFound``, exactly like an old driver.

GPUs are :class:`FakeGpu`: either a fixed real sample (report + chain, one nonce only) or a
:class:`~agent.sim.gpu_sim.SimulatedGpuDevice` that signs a real-format report for any nonce.
Faults: per symbol (globally or per GPU) an NVML error code, :data:`HANG` (blocks until the fake is
uninstalled), or :data:`MISSING` (symbol not exported). :func:`no_nvml_library` makes the real
``nvmlInit`` fail to load the library, as on a machine without the NVIDIA driver.

Test/demo only: reached through ``gpu.emulate`` or tests, never as a fallback.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pynvml

from agent.log import get_logger
from agent.sim.gpu_sim import MODELS, GpuModel, SimulatedDeviceCA, SimulatedGpuDevice

log = get_logger(__name__)

HANG = "hang"
MISSING = "missing"
SUCCESS = pynvml.NVML_SUCCESS
_HANG_LIMIT_S = 120.0

Fault = int | str


@dataclass
class FakeGpu:
    """One emulated GPU: what NVML says about it and where its evidence comes from."""

    uuid: str  # NVML form, "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx"
    name: str = "NVIDIA H100 80GB HBM3"
    memory_total: int = 85520809984
    cuda_major: int = 9
    cuda_minor: int = 0
    max_graphics_clock_mhz: int = 1980
    ecc: bool = True
    arch: int = 9
    vbios_version: str = "96.00.9F.00.01"
    board_id: int = 0x3B1
    #: A fixed real report and its PEM chain (answers only the nonce inside the report).
    sample_report: bytes | None = None
    sample_chain: bytes | None = None
    #: Fixed sample asked for another nonce: "error" (NVML_ERROR_INVALID_ARGUMENT) or "replay" (stale report).
    on_nonce_mismatch: str = "error"
    #: A simulated device that signs a fresh real-format report for any nonce.
    device: SimulatedGpuDevice | None = None
    #: Per-GPU faults: C symbol -> NVML error code, HANG or MISSING (MISSING is global-only).
    faults: dict[str, Fault] = field(default_factory=dict)

    @classmethod
    def simulated(cls, index: int, model: GpuModel | str = "h100", ca: SimulatedDeviceCA | None = None,
                  **kw: Any) -> FakeGpu:
        m = MODELS[model] if isinstance(model, str) else model
        ca = ca or SimulatedDeviceCA()
        h = hashlib.sha256(ca.seed + f"uuid/{m.key}/{index}".encode()).hexdigest()
        u = f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"
        return cls(
            uuid=f"GPU-{u}", name=m.name, memory_total=m.memory_total, cuda_major=m.cuda_major,
            cuda_minor=m.cuda_minor, max_graphics_clock_mhz=m.max_graphics_clock_mhz, arch=m.arch,
            vbios_version=m.vbios_version.upper(), board_id=m.board_id,
            device=ca.device(f"{m.key}/{index}", m), **kw,
        )

    @property
    def driver_version(self) -> str:
        return self.device.model.driver_version if self.device else "550.90.07"

    @property
    def cert_chain(self) -> bytes:
        if self.sample_chain is not None:
            return self.sample_chain
        if self.device is not None:
            return self.device.cert_chain_pem
        raise ValueError(f"{self.uuid}: neither a sample chain nor a simulated device")

    def report(self, nonce: bytes) -> bytes | int:
        if self.device is not None:
            return self.device.report(nonce)
        if self.sample_report is None:
            return pynvml.NVML_ERROR_NOT_SUPPORTED
        if self.sample_report[4:36] != nonce and self.on_nonce_mismatch != "replay":
            return pynvml.NVML_ERROR_INVALID_ARGUMENT
        return self.sample_report


@dataclass
class FakeSystem:
    """System-wide confidential-computing state (NVML reports it per system, not per GPU)."""

    environment: int = pynvml.NVML_CC_SYSTEM_ENVIRONMENT_PROD
    cc_feature: int = pynvml.NVML_CC_SYSTEM_FEATURE_ENABLED
    dev_tools_mode: int = pynvml.NVML_CC_SYSTEM_DEVTOOLS_MODE_OFF
    multi_gpu_mode: int = pynvml.NVML_CC_SYSTEM_MULTIGPU_NONE
    ready_state: int = pynvml.NVML_CC_ACCEPTING_CLIENT_REQUESTS_FALSE
    driver_version: str | None = None  # None: the first GPU's


_VP = ctypes.c_void_p
_UI = ctypes.c_uint
#: C symbol -> argument types of the real C prototype (all return nvmlReturn_t).
_PROTOTYPES: dict[str, tuple[Any, ...]] = {
    "nvmlInitWithFlags": (_UI,),
    "nvmlInit_v2": (),
    "nvmlShutdown": (),
    "nvmlSystemGetDriverVersion": (_VP, _UI),
    "nvmlDeviceGetCount_v2": (_VP,),
    "nvmlDeviceGetHandleByIndex_v2": (_UI, _VP),
    "nvmlDeviceGetUUID": (_VP, _VP, _UI),
    "nvmlDeviceGetName": (_VP, _VP, _UI),
    "nvmlDeviceGetMemoryInfo": (_VP, _VP),
    "nvmlDeviceGetMaxClockInfo": (_VP, _UI, _VP),
    "nvmlDeviceGetCudaComputeCapability": (_VP, _VP, _VP),
    "nvmlDeviceGetEccMode": (_VP, _VP, _VP),
    "nvmlDeviceGetArchitecture": (_VP, _VP),
    "nvmlDeviceGetVbiosVersion": (_VP, _VP, _UI),
    "nvmlDeviceGetBoardId": (_VP, _VP),
    "nvmlSystemGetConfComputeState": (_VP,),
    "nvmlSystemGetConfComputeSettings": (_VP,),
    "nvmlSystemGetConfComputeGpusReadyState": (_VP,),
    "nvmlSystemSetConfComputeGpusReadyState": (_UI,),
    "nvmlDeviceGetConfComputeGpuCertificate": (_VP, _VP),
    "nvmlDeviceGetConfComputeGpuAttestationReport": (_VP, _VP),
}
_DEVICE_SYMBOLS = {name for name, args in _PROTOTYPES.items() if name.startswith("nvmlDevice") and
                   name not in ("nvmlDeviceGetCount_v2", "nvmlDeviceGetHandleByIndex_v2")}


def _write_str(addr: int, length: int, text: str) -> int:
    data = text.encode() + b"\x00"
    if len(data) > length:
        return pynvml.NVML_ERROR_INSUFFICIENT_SIZE
    ctypes.memmove(addr, data, len(data))
    return SUCCESS


def _set(ctype: Any, addr: int, value: Any) -> None:
    ctype.from_address(addr).value = value


class FakeNvmlLibrary:
    """Stands in for the CDLL: one ctypes function pointer attribute per exported C symbol."""

    def __init__(self, gpus: list[FakeGpu], system: FakeSystem, *, report_delay_s: float = 0.0,
                 faults: Mapping[str, Fault] | None = None) -> None:
        self.gpus = gpus
        self.system = system
        self.report_delay_s = report_delay_s
        self.faults = dict(faults or {})
        self.calls: Counter[str] = Counter()
        self.initialized = 0
        self._lock = threading.Lock()
        self._release = threading.Event()
        # One real allocation per GPU: its address is the opaque nvmlDevice_t handle.
        self._handle_mem = [ctypes.create_string_buffer(16) for _ in gpus]
        self._by_handle = {ctypes.addressof(m): i for i, m in enumerate(self._handle_mem)}
        self._fptrs: dict[str, Any] = {}
        for name, argtypes in _PROTOTYPES.items():
            if self.faults.get(name) == MISSING:
                continue
            impl = getattr(self, "_" + name)
            fptr = ctypes.CFUNCTYPE(ctypes.c_int, *argtypes)(self._guard(name, impl))
            self._fptrs[name] = fptr  # keep the callback alive as long as the library
            setattr(self, name, fptr)

    # -- plumbing ---------------------------------------------------------------------------------
    def release_hangs(self) -> None:
        self._release.set()

    def _fault(self, fault: Fault | None) -> int | None:
        if fault is None:
            return None
        if fault == HANG:
            self._release.wait(_HANG_LIMIT_S)
            return pynvml.NVML_ERROR_TIMEOUT
        return int(fault)

    def _guard(self, name: str, impl: Callable[..., int]) -> Callable[..., int]:
        def call(*args: Any) -> int:
            with self._lock:
                self.calls[name] += 1
            try:
                if name not in ("nvmlInitWithFlags", "nvmlInit_v2") and not self.initialized:
                    return pynvml.NVML_ERROR_UNINITIALIZED
                rc = self._fault(self.faults.get(name))
                if rc is not None:
                    return rc
                if name in _DEVICE_SYMBOLS:
                    idx = self._by_handle.get(args[0] or 0)
                    if idx is None:
                        return pynvml.NVML_ERROR_INVALID_ARGUMENT
                    rc = self._fault(self.gpus[idx].faults.get(name))
                    if rc is not None:
                        return rc
                    return impl(self.gpus[idx], *args[1:])
                return impl(*args)
            except Exception as exc:  # a callback must never raise into ctypes
                log.error("fake_nvml.callback_error", symbol=name, reason=repr(exc))
                return pynvml.NVML_ERROR_UNKNOWN
        return call

    # -- system -----------------------------------------------------------------------------------
    def _nvmlInitWithFlags(self, flags: int) -> int:
        with self._lock:
            self.initialized += 1
        return SUCCESS

    def _nvmlInit_v2(self) -> int:
        return self._nvmlInitWithFlags(0)

    def _nvmlShutdown(self) -> int:
        with self._lock:
            self.initialized = max(0, self.initialized - 1)
        return SUCCESS

    def _nvmlSystemGetDriverVersion(self, buf: int, length: int) -> int:
        version = self.system.driver_version or (self.gpus[0].driver_version if self.gpus else "550.90.07")
        return _write_str(buf, length, version)

    def _nvmlDeviceGetCount_v2(self, count: int) -> int:
        _set(ctypes.c_uint, count, len(self.gpus))
        return SUCCESS

    def _nvmlDeviceGetHandleByIndex_v2(self, index: int, out: int) -> int:
        if not 0 <= index < len(self.gpus):
            return pynvml.NVML_ERROR_INVALID_ARGUMENT
        _set(ctypes.c_void_p, out, ctypes.addressof(self._handle_mem[index]))
        return SUCCESS

    def _nvmlSystemGetConfComputeState(self, out: int) -> int:
        st = pynvml.c_nvmlConfComputeSystemState_t.from_address(out)
        st.environment = self.system.environment
        st.ccFeature = self.system.cc_feature
        st.devToolsMode = self.system.dev_tools_mode
        return SUCCESS

    def _nvmlSystemGetConfComputeSettings(self, out: int) -> int:
        st = pynvml.c_nvmlSystemConfComputeSettings_v1_t.from_address(out)
        if st.version != pynvml.nvmlSystemConfComputeSettings_v1:
            return pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH
        st.environment = self.system.environment
        st.ccFeature = self.system.cc_feature
        st.devToolsMode = self.system.dev_tools_mode
        st.multiGpuMode = self.system.multi_gpu_mode
        return SUCCESS

    def _nvmlSystemGetConfComputeGpusReadyState(self, out: int) -> int:
        _set(ctypes.c_uint, out, self.system.ready_state)
        return SUCCESS

    def _nvmlSystemSetConfComputeGpusReadyState(self, state: int) -> int:
        if state not in (0, 1):
            return pynvml.NVML_ERROR_INVALID_ARGUMENT
        self.system.ready_state = state
        return SUCCESS

    # -- per device (first argument is the FakeGpu) ---------------------------------------------------
    def _nvmlDeviceGetUUID(self, gpu: FakeGpu, buf: int, length: int) -> int:
        return _write_str(buf, length, gpu.uuid)

    def _nvmlDeviceGetName(self, gpu: FakeGpu, buf: int, length: int) -> int:
        return _write_str(buf, length, gpu.name)

    def _nvmlDeviceGetVbiosVersion(self, gpu: FakeGpu, buf: int, length: int) -> int:
        return _write_str(buf, length, gpu.vbios_version)

    def _nvmlDeviceGetMemoryInfo(self, gpu: FakeGpu, out: int) -> int:
        mem = pynvml.c_nvmlMemory_t.from_address(out)
        mem.total, mem.free, mem.used = gpu.memory_total, gpu.memory_total, 0
        return SUCCESS

    def _nvmlDeviceGetMaxClockInfo(self, gpu: FakeGpu, clock_type: int, out: int) -> int:
        clocks = {pynvml.NVML_CLOCK_GRAPHICS: gpu.max_graphics_clock_mhz, pynvml.NVML_CLOCK_SM:
                  gpu.max_graphics_clock_mhz, pynvml.NVML_CLOCK_MEM: 2619}
        if clock_type not in clocks:
            return pynvml.NVML_ERROR_INVALID_ARGUMENT
        _set(ctypes.c_uint, out, clocks[clock_type])
        return SUCCESS

    def _nvmlDeviceGetCudaComputeCapability(self, gpu: FakeGpu, major: int, minor: int) -> int:
        _set(ctypes.c_int, major, gpu.cuda_major)
        _set(ctypes.c_int, minor, gpu.cuda_minor)
        return SUCCESS

    def _nvmlDeviceGetEccMode(self, gpu: FakeGpu, current: int, pending: int) -> int:
        _set(ctypes.c_uint, current, int(gpu.ecc))
        _set(ctypes.c_uint, pending, int(gpu.ecc))
        return SUCCESS

    def _nvmlDeviceGetArchitecture(self, gpu: FakeGpu, out: int) -> int:
        _set(ctypes.c_uint, out, gpu.arch)
        return SUCCESS

    def _nvmlDeviceGetBoardId(self, gpu: FakeGpu, out: int) -> int:
        _set(ctypes.c_uint, out, gpu.board_id)
        return SUCCESS

    def _nvmlDeviceGetConfComputeGpuCertificate(self, gpu: FakeGpu, out: int) -> int:
        st = pynvml.c_nvmlConfComputeGpuCertificate_t.from_address(out)
        chain = gpu.cert_chain
        if len(chain) > ctypes.sizeof(st.attestationCertChain):
            return pynvml.NVML_ERROR_INSUFFICIENT_SIZE
        st.certChainSize = 0
        st.attestationCertChainSize = len(chain)
        ctypes.memmove(ctypes.addressof(st) + type(st).attestationCertChain.offset, chain, len(chain))
        return SUCCESS

    def _nvmlDeviceGetConfComputeGpuAttestationReport(self, gpu: FakeGpu, out: int) -> int:
        st = pynvml.c_nvmlConfComputeGpuAttestationReport_t.from_address(out)
        nonce = bytes(st.nonce)
        if self.report_delay_s:
            time.sleep(self.report_delay_s)
        report = gpu.report(nonce)
        if isinstance(report, int):
            return report
        if len(report) > ctypes.sizeof(st.attestationReport):
            return pynvml.NVML_ERROR_INSUFFICIENT_SIZE
        st.isCecAttestationReportPresent = 0
        st.cecAttestationReportSize = 0
        st.attestationReportSize = len(report)
        ctypes.memmove(ctypes.addressof(st) + type(st).attestationReport.offset, report, len(report))
        return SUCCESS


class FakeNvml:
    """Handle on an installed fake: the library object (state, call counts) and ``uninstall()``."""

    def __init__(self, lib: FakeNvmlLibrary, saved: tuple[Any, dict[str, Any], int]) -> None:
        self.lib = lib
        self._saved = saved
        self.installed = True

    @property
    def gpus(self) -> list[FakeGpu]:
        return self.lib.gpus

    @property
    def system(self) -> FakeSystem:
        return self.lib.system

    def uninstall(self) -> None:
        if not self.installed:
            return
        self.lib.release_hangs()
        with pynvml.libLoadLock:
            pynvml.nvmlLib, cache, pynvml._nvmlLib_refcount = self._saved
            pynvml._nvmlGetFunctionPointer_cache.clear()
            pynvml._nvmlGetFunctionPointer_cache.update(cache)
        self.installed = False

    def __enter__(self) -> FakeNvml:
        return self

    def __exit__(self, *exc: object) -> None:
        self.uninstall()


def simulated_gpus(count: int, model: str = "h100", ca: SimulatedDeviceCA | None = None) -> list[FakeGpu]:
    ca = ca or SimulatedDeviceCA()
    return [FakeGpu.simulated(i, model, ca) for i in range(count)]


def install_fake_nvml(gpus: list[FakeGpu] | int, *, system: FakeSystem | None = None, report_delay_s: float = 0.0,
                      faults: Mapping[str, Fault] | None = None) -> FakeNvml:
    """Make the real ``pynvml`` talk to an emulated library. Usable as a context manager.

    ``gpus``: FakeGpu list, or a count of simulated H100s. ``faults``: C symbol -> NVML error code,
    HANG or MISSING, for every GPU. Logs a warning: this is emulation, never real evidence.
    """
    gpu_list = simulated_gpus(gpus) if isinstance(gpus, int) else list(gpus)
    lib = FakeNvmlLibrary(gpu_list, system or FakeSystem(), report_delay_s=report_delay_s, faults=faults)
    with pynvml.libLoadLock:
        saved = (pynvml.nvmlLib, dict(pynvml._nvmlGetFunctionPointer_cache), pynvml._nvmlLib_refcount)
        pynvml.nvmlLib = lib
        pynvml._nvmlGetFunctionPointer_cache.clear()
        pynvml._nvmlLib_refcount = 0
    log.warning("gpu.emulated_nvml", gpus=len(gpu_list), reason="emulated NVML installed; evidence is not real")
    return FakeNvml(lib, saved)


@contextlib.contextmanager
def no_nvml_library() -> Iterator[None]:
    """The real ``nvmlInit`` path on a machine without the driver: ``CDLL`` fails, LibraryNotFound."""

    def missing(name: str, *a: Any, **kw: Any) -> Any:
        raise OSError(f"{name}: cannot open shared object file: No such file or directory")

    with pynvml.libLoadLock:
        saved = (pynvml.nvmlLib, dict(pynvml._nvmlGetFunctionPointer_cache), pynvml.CDLL)
        pynvml.nvmlLib = None
        pynvml._nvmlGetFunctionPointer_cache.clear()
        pynvml.CDLL = missing
    try:
        yield
    finally:
        with pynvml.libLoadLock:
            pynvml.nvmlLib, cache, pynvml.CDLL = saved
            pynvml._nvmlGetFunctionPointer_cache.clear()
            pynvml._nvmlGetFunctionPointer_cache.update(cache)


def parse_emulate_spec(spec: str) -> tuple[str, int]:
    """``"h100x8"`` -> ("h100", 8). Models: h100, h200, b200; 1..64 GPUs."""
    model, sep, count = spec.strip().lower().partition("x")
    if not sep or model not in MODELS or not count.isdigit() or not 1 <= int(count) <= 64:
        raise ValueError(f"gpu.emulate: expected <model>x<count> with model in {', '.join(MODELS)} and count "
                         f"1..64 (e.g. h100x8), got {spec!r}")
    return model, int(count)


def install_from_spec(spec: str, *, report_delay_s: float = 0.0) -> FakeNvml:
    """Install the emulation named by ``gpu.emulate`` (simulated chain, default public seed)."""
    model, count = parse_emulate_spec(spec)
    return install_fake_nvml(simulated_gpus(count, model), report_delay_s=report_delay_s)
