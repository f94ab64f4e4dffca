"""NVIDIA GPU evidence and device info through NVML (nvidia-ml-py's ``pynvml``).

Same NVML entry points as NVIDIA's collector (nv-local-gpu-verifier ``NvmlHandler``):
``nvmlSystemGetConfComputeState`` / ``…Settings`` for the CC mode,
``nvmlDeviceGetConfComputeGpuCertificate`` (``attestationCertChain[:attestationCertChainSize]``) and
``nvmlDeviceGetConfComputeGpuAttestationReport`` (32-byte nonce) per GPU, ``nvmlDeviceGetArchitecture``
for the ``arch`` field. Output is the nvtrust SDK 2.x wire format, in NVML index order.

Every NVML call runs in a worker thread under ``gpu.call_timeout_s`` (a GPU in trouble can hang
NVML), and NVML errors become :class:`~agent.evidence.base.GpuEvidenceError` with a reason an
operator can act on. GPUs are collected in parallel; certificate chains are cached per GPU UUID.
The ready state is only read, unless ``gpu.set_ready_after_verify`` is on: then it is set after
every GPU's evidence passed local verification (:mod:`agent.evidence.gpu_verify`).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import ctypes
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import pynvml

from agent.config import GpuConfig
from agent.evidence.base import GpuEmulation, GpuEvidenceError
from agent.evidence.device_info import device_info, parse_gpu_ids, select_indices
from agent.exitcodes import EXIT_UNAVAILABLE
from agent.log import get_logger

log = get_logger(__name__)
T = TypeVar("T")

ARCHITECTURES = {9: "HOPPER", 10: "BLACKWELL"}
NONCE_LEN = 32
MAX_INFLIGHT_CALLS = 64  # NVML calls running at once (stuck ones included) before new ones are refused
_Job = tuple[concurrent.futures.Future[Any], str, Callable[..., Any], tuple[Any, ...]]  # future, what, fn, args
WORKER_IDLE_S = 30.0  # an NVML worker thread with no call for this long exits
_ENVIRONMENTS = {0: "unavailable", 1: "simulation", 2: "production"}
_MULTI_GPU = {0: "none", 1: "protected_pcie", 2: "nvle"}


class GpuUnavailableError(GpuEvidenceError):
    """No usable NVML on this machine (library missing, driver not loaded)."""

    exit_code = EXIT_UNAVAILABLE
    reason = "unavailable"


class GpuTimeoutError(GpuEvidenceError):
    """An NVML call did not answer within ``gpu.call_timeout_s``."""


class GpuNotConfidentialError(GpuEvidenceError):
    """Confidential computing is off (or in DevTools mode): the GPUs cannot give trustworthy evidence."""


def _explain(exc: pynvml.NVMLError, what: str) -> GpuEvidenceError:
    """Map an NVML error to an operator-readable GpuEvidenceError (the NVML code is kept)."""
    code = getattr(exc, "value", None)
    hints = {
        pynvml.NVML_ERROR_LIBRARY_NOT_FOUND: (
            "NVML library (libnvidia-ml.so.1) not found; is the NVIDIA driver installed?"
        ),
        pynvml.NVML_ERROR_DRIVER_NOT_LOADED: "the NVIDIA kernel driver is not loaded",
        pynvml.NVML_ERROR_NOT_SUPPORTED: "not supported by this GPU/driver (is confidential computing enabled?)",
        pynvml.NVML_ERROR_GPU_IS_LOST: "the GPU is lost (fell off the bus or hung); it needs a reset/reboot",
        pynvml.NVML_ERROR_TIMEOUT: "NVML reported a timeout talking to the GPU",
        pynvml.NVML_ERROR_FUNCTION_NOT_FOUND: "the NVIDIA driver is too old for this call (symbol missing)",
        pynvml.NVML_ERROR_NO_PERMISSION: "insufficient permissions (needs root)",
        pynvml.NVML_ERROR_UNINITIALIZED: "NVML is not initialised",
        pynvml.NVML_ERROR_INVALID_ARGUMENT: "NVML rejected the arguments",
    }
    reason = hints.get(code, str(exc)) if code is not None else str(exc)
    cls: type[GpuEvidenceError] = GpuEvidenceError
    if code in (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, pynvml.NVML_ERROR_DRIVER_NOT_LOADED):
        cls = GpuUnavailableError
    elif code == pynvml.NVML_ERROR_TIMEOUT:
        cls = GpuTimeoutError
    err = cls(f"{what}: {reason} (NVML error {code}: {exc})")
    err.nvml_code = code  # type: ignore[attr-defined]
    return err


def _check_nonce(nonce: object) -> bytes:
    if not isinstance(nonce, bytes | bytearray) or len(nonce) != NONCE_LEN:
        got = f"{len(nonce)} bytes" if isinstance(nonce, bytes | bytearray) else type(nonce).__name__
        raise ValueError(f"nonce: expected exactly {NONCE_LEN} bytes, got {got}")
    return bytes(nonce)


class NvmlGpuSource:
    """Production :class:`~agent.evidence.base.GpuEvidenceSource` over NVML."""

    name = "nvml"

    def __init__(self, gpu_cfg: GpuConfig, *, verify_root_pem: bytes | None = None) -> None:
        self._cfg = gpu_cfg
        self._timeout = gpu_cfg.call_timeout_s
        self._init_lock = threading.Lock()
        self._inflight_lock = threading.Lock()
        self._inflight = 0
        self._idle_workers = 0  # workers waiting for a call and not yet spoken for
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._initialized = False
        self._chains: dict[str, bytes] = {}
        #: (handle, uuid) per GPU in NVML order, read once after init: a VM's GPU set does not change and the
        #: handles stay valid until nvmlShutdown (close() forgets them).
        self._gpus: list[tuple[Any, str]] | None = None
        self._verify_root_pem = verify_root_pem
        #: The emulated NVML installed for this source (gpu.emulate), undone by close(); None = real NVML.
        self.emulation: GpuEmulation | None = None

    # -- call plumbing -------------------------------------------------------------------------------
    def _guarded(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        try:
            return fn(*args)
        except pynvml.NVMLError as exc:
            raise _explain(exc, what) from None

    def _spawn(self, what: str, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        """Run one NVML call on a daemon worker thread: an idle one if there is one, else a new one.

        Not a fixed-size pool: a call stuck inside the driver can neither be cancelled nor joined, so
        it keeps its thread (never a slot others wait for) and the next call gets another thread; stuck
        calls are capped instead. Idle workers are reused (``Thread.start`` blocks the caller, the event
        loop, until the new thread runs: it was the largest share of the service's loop time under load)
        and exit after :data:`WORKER_IDLE_S` without work.
        """
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._inflight_lock:
            if self._inflight >= MAX_INFLIGHT_CALLS:
                raise GpuTimeoutError(f"{what}: {self._inflight} NVML calls are still stuck; refusing new ones")
            self._inflight += 1
            reuse = self._idle_workers > 0
            if reuse:
                self._idle_workers -= 1  # that worker is spoken for: it takes a job from the queue

        self._jobs.put((fut, what, fn, args))
        if not reuse:
            threading.Thread(target=self._worker, name="nvml-call", daemon=True).start()
        return fut

    def _worker(self) -> None:
        """Run queued calls; exit once idle for WORKER_IDLE_S and not spoken for by a waiting call.

        Invariant: jobs in the queue + ``_idle_workers`` == workers waiting on the queue, so every
        queued job has a worker and a worker that leaves takes no job with it.
        """
        while True:
            try:
                fut, what, fn, args = self._jobs.get(timeout=WORKER_IDLE_S)
            except queue.Empty:
                with self._inflight_lock:
                    if self._idle_workers > 0:
                        self._idle_workers -= 1
                        return
                continue  # spoken for: its call is on the way
            ok = fut.set_running_or_notify_cancel()
            result: Any = None
            error: BaseException | None = None
            if ok:
                try:
                    result = self._guarded(what, fn, *args)
                except BaseException as exc:
                    error = exc
            with self._inflight_lock:  # idle before the caller hears back, so its next call finds this worker
                self._inflight -= 1
                self._idle_workers += 1
            if ok:
                if error is not None:
                    fut.set_exception(error)
                else:
                    fut.set_result(result)
            del fut, fn, args, result, error

    def _call_sync(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        fut = self._spawn(what, fn, *args)
        try:
            return fut.result(timeout=self._timeout)
        except concurrent.futures.TimeoutError:
            raise GpuTimeoutError(f"{what}: no answer from NVML within {self._timeout:g} s") from None

    async def _call(self, what: str, fn: Callable[..., T], *args: Any, step: list[str] | None = None) -> T:
        """``fn(*args)`` on a worker; a job of several NVML calls names the one it is in through ``step``
        (its first item, set by :meth:`_step`), so a timeout names the call that hung."""
        fut = self._spawn(what, fn, *args)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), self._timeout)
        except TimeoutError:
            where = step[0] if step else what
            raise GpuTimeoutError(f"{where}: no answer from NVML within {self._timeout:g} s") from None

    def _step(self, step: list[str], what: str, fn: Callable[..., T], *args: Any) -> T:
        """One NVML call inside a multi-call job (on the worker): named for errors and timeouts."""
        step[0] = what
        return self._guarded(what, fn, *args)

    def _init_once(self) -> None:
        with self._init_lock:
            if self._initialized:
                return
            path = self._cfg.nvml_library
            if path:
                with pynvml.libLoadLock:
                    if pynvml.nvmlLib is None:
                        try:
                            pynvml.nvmlLib = ctypes.CDLL(path)
                        except OSError as exc:
                            msg = f"NVML init: cannot load gpu.nvml_library {path}: {exc}"
                            raise GpuUnavailableError(msg) from None
            pynvml.nvmlInit()
            self._initialized = True
            try:
                driver = pynvml.nvmlSystemGetDriverVersion()
            except pynvml.NVMLError as exc:
                driver = f"unknown ({exc})"
            log.info("gpu.nvml_init", driver=driver)

    # -- CC state ------------------------------------------------------------------------------------
    def _cc_state_raw(self) -> dict[str, Any]:
        self._init_once()
        st = pynvml.nvmlSystemGetConfComputeState()
        settings = pynvml.c_nvmlSystemConfComputeSettings_v1_t()
        try:
            rc = pynvml.nvmlSystemGetConfComputeSettings(ctypes.byref(settings))
        except pynvml.NVMLError_FunctionNotFound:
            rc = pynvml.NVML_ERROR_FUNCTION_NOT_FOUND
        if rc == pynvml.NVML_SUCCESS:
            multi = int(settings.multiGpuMode)
        elif rc in (pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_FUNCTION_NOT_FOUND):
            multi = 0  # older drivers: no multi-GPU modes
        else:
            raise pynvml.NVMLError(rc)  # the settings call returns its code instead of raising
        return {
            "environment": _ENVIRONMENTS.get(st.environment, f"unknown({st.environment})"),
            "cc_feature": st.ccFeature != 0,
            "dev_tools_mode": st.devToolsMode != 0,
            "multi_gpu_mode": _MULTI_GPU.get(multi, f"unknown({multi})"),
        }

    def cc_state(self) -> dict[str, Any]:
        """``{"environment", "cc_feature", "dev_tools_mode", "multi_gpu_mode"}`` as NVML reports them."""
        return self._call_sync("read CC state", self._cc_state_raw)

    @staticmethod
    def _require_cc(state: dict[str, Any]) -> None:
        if not (state["cc_feature"] or state["multi_gpu_mode"] == "protected_pcie"):
            raise GpuNotConfidentialError(
                "GPU confidential computing is off (ccFeature=0 and not in Protected-PCIe mode); "
                "enable CC mode on the host before collecting evidence"
            )
        if state["dev_tools_mode"]:
            raise GpuNotConfidentialError("GPU CC DevTools mode is on: the GPUs are debuggable, evidence refused")

    def ready_state(self) -> bool:
        """Whether the GPUs accept work (NVML_CC_ACCEPTING_CLIENT_REQUESTS_TRUE)."""
        self._call_sync("NVML init", self._init_once)
        return bool(self._call_sync("read GPU ready state", pynvml.nvmlSystemGetConfComputeGpusReadyState))

    # -- enumeration -----------------------------------------------------------------------------------
    def _enumerate(self) -> list[tuple[Any, str]]:
        self._init_once()
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            out.append((handle, pynvml.nvmlDeviceGetUUID(handle)))
        return out

    async def _ensure_init(self) -> None:
        """NVML init on a worker (it can take seconds on real GPUs); no thread hop once it is done."""
        if not self._initialized:
            await self._call("NVML init", self._init_once)

    async def _select(self, wanted: list[str] | None) -> tuple[list[tuple[Any, str]], list[int]]:
        await self._ensure_init()
        if self._gpus is None:
            self._gpus = await self._call("enumerate GPUs", self._enumerate)
        return self._selected(self._gpus, wanted)

    @staticmethod
    def _selected(gpus: list[tuple[Any, str]], wanted: list[str] | None) -> tuple[list[tuple[Any, str]], list[int]]:
        if not gpus:
            raise GpuEvidenceError("NVML reports no GPUs")
        return gpus, select_indices([u for _, u in gpus], wanted)

    def _state_and_gpus(self, step: list[str]) -> tuple[dict[str, Any], list[tuple[Any, str]]]:
        """CC state and the GPU list in one worker call (each NVML error named by its own step)."""
        return (self._step(step, "read CC state", self._cc_state_raw),
                self._step(step, "enumerate GPUs", self._enumerate))

    # -- evidence --------------------------------------------------------------------------------------
    @staticmethod
    def _read_chain(handle: Any) -> bytes:
        cert = pynvml.nvmlDeviceGetConfComputeGpuCertificate(handle)
        size = cert.attestationCertChainSize
        if not 0 < size <= ctypes.sizeof(cert.attestationCertChain):
            raise GpuEvidenceError(f"attestation certificate chain has an invalid size {size}")
        return ctypes.string_at(ctypes.addressof(cert.attestationCertChain), size)

    @staticmethod
    def _read_report(handle: Any, nonce: bytes) -> bytes:
        rep = pynvml.nvmlDeviceGetConfComputeGpuAttestationReport(handle, nonce)
        size = rep.attestationReportSize
        if not 0 < size <= ctypes.sizeof(rep.attestationReport):
            raise GpuEvidenceError(f"attestation report has an invalid size {size}")
        return ctypes.string_at(ctypes.addressof(rep.attestationReport), size)

    def _one_gpu(self, step: list[str], label: str, handle: Any, uuid: str, nonce: bytes,
                 with_state: bool) -> tuple[dict[str, Any] | None, str, bytes, bytes]:
        """(CC state if asked, arch, certificate chain, report) for one GPU in one worker call: what a
        request needs from a GPU is one thread hop, not four (each hop waits for a busy event loop and the
        GIL). The CC state is checked first, so a node with CC off never produces a report."""
        state = None
        if with_state:
            state = self._step(step, "read CC state", self._cc_state_raw)
            self._require_cc(state)
        arch_code = self._step(step, f"{label} architecture", pynvml.nvmlDeviceGetArchitecture, handle)
        arch = ARCHITECTURES.get(arch_code)
        if arch is None:
            raise GpuEvidenceError(f"{label}: unsupported architecture {arch_code} (HOPPER=9, BLACKWELL=10)")
        chain = self._chains.get(uuid)
        if chain is None:
            chain = self._step(step, f"{label} attestation certificate chain", self._read_chain, handle)
            self._chains[uuid] = chain  # a GPU's chain does not change while the VM runs
        report = self._step(step, f"{label} attestation report", self._read_report, handle, nonce)
        return state, arch, chain, report

    async def _collect_one(self, index: int, handle: Any, uuid: str, nonce: bytes,
                           with_state: bool = False) -> tuple[dict[str, Any] | None, dict[str, str]]:
        label = f"GPU {index} ({uuid})"
        step = [f"{label} evidence"]
        state, arch, chain, report = await self._call(step[0], self._one_gpu, step, label, handle, uuid, nonce,
                                                      with_state, step=step)
        return state, {
            "certificate": base64.b64encode(chain).decode(),
            "evidence": base64.b64encode(report).decode(),
            "arch": arch,
        }

    async def evidence(self, nonce: bytes, gpu_ids: list[str] | str | None = None) -> list[dict[str, Any]]:
        """Per selected GPU ``{"certificate", "evidence", "arch"}`` for ``nonce`` (32 bytes), NVML index order.

        One worker call per GPU, all at once; the first also reads (and checks) the CC state. The first
        request reads the state and the GPU list on their own, before any report."""
        nonce = _check_nonce(nonce)
        wanted = parse_gpu_ids(gpu_ids)  # bad input fails before any hardware is touched
        start = time.monotonic()
        await self._ensure_init()
        state: dict[str, Any] | None = None
        known = self._gpus
        if known is None:
            step = ["read CC state"]
            first_state, listed = await self._call(step[0], self._state_and_gpus, step, step=step)
            known = self._gpus = listed
            self._require_cc(first_state)
            state = first_state
        gpus, indices = self._selected(known, wanted)
        if not indices and state is None:
            state = await self._call("read CC state", self._cc_state_raw)
            self._require_cc(state)
        results = await asyncio.gather(
            *(self._collect_one(i, *gpus[i], nonce, with_state=state is None and k == 0)
              for k, i in enumerate(indices)), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:  # the CC-state refusal (first job) first, else the first GPU's failure in NVML order
            raise next((e for e in failed if isinstance(e, GpuNotConfidentialError)), failed[0])
        done = [r for r in results if not isinstance(r, BaseException)]
        if state is None:
            state = done[0][0]
        assert state is not None
        entries = [entry for _, entry in done]
        if self._cfg.set_ready_after_verify:
            await self._set_ready_if_verified(entries, nonce, all_gpus=len(indices) == len(gpus))
        # per request: debug (the request log counts them); failures surface as the request's error line
        log.debug("gpu.evidence", gpus=len(entries), multi_gpu_mode=state["multi_gpu_mode"],
                  duration_ms=round((time.monotonic() - start) * 1000, 1), result="ok")
        return entries

    async def _set_ready_if_verified(self, entries: list[dict[str, Any]], nonce: bytes, *, all_gpus: bool) -> None:
        from agent.evidence.gpu_verify import pinned_root_pem, verify_evidence_entry

        if not all_gpus:
            log.info("gpu.ready_state_unchanged", reason="evidence covered only some GPUs")
            return
        root = self._verify_root_pem or pinned_root_pem(self._cfg.device_root_ca)
        results = await asyncio.gather(*(asyncio.to_thread(verify_evidence_entry, e, nonce, root) for e in entries))
        failed = {i: [c.name for c in r.failed()] for i, r in enumerate(results) if not r.ok}
        if failed:
            log.error("gpu.ready_state_unchanged", reason="local verification failed", failed=failed)
            return
        if await self._call("read GPU ready state", pynvml.nvmlSystemGetConfComputeGpusReadyState):
            return
        await self._call("set GPU ready state", pynvml.nvmlSystemSetConfComputeGpusReadyState,
                         pynvml.NVML_CC_ACCEPTING_CLIENT_REQUESTS_TRUE)
        log.warning("gpu.ready_state_set", gpus=len(entries), reason="all GPU evidence passed local verification")

    # -- device info -----------------------------------------------------------------------------------
    @staticmethod
    def _device_info(handle: Any, uuid: str) -> dict[str, Any]:
        name = pynvml.nvmlDeviceGetName(handle)
        major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
        try:
            ecc = bool(pynvml.nvmlDeviceGetEccMode(handle)[0])
        except pynvml.NVMLError_NotSupported:
            ecc = False
        return device_info(
            uuid=uuid, name=name, memory=pynvml.nvmlDeviceGetMemoryInfo(handle).total, major=major, minor=minor,
            max_graphics_clock_mhz=pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_GRAPHICS), ecc=ecc,
        )

    async def devices(self, gpu_ids: list[str] | str | None = None) -> list[dict[str, Any]]:
        """``DeviceInfo`` per selected GPU exactly as the existing service returns it."""
        gpus, indices = await self._select(parse_gpu_ids(gpu_ids))
        return list(await asyncio.gather(
            *(self._call(f"GPU {i} ({gpus[i][1]}) device info", self._device_info, *gpus[i]) for i in indices)
        ))

    def close(self) -> None:
        """Shut NVML down (if this source initialised it) and undo an emulation installed for it."""
        if self._initialized:
            try:
                self._call_sync("NVML shutdown", pynvml.nvmlShutdown)
            except GpuEvidenceError as exc:
                log.warning("gpu.nvml_shutdown_failed", reason=str(exc))
            self._initialized = False
            self._gpus = None  # the handles die with NVML
        if self.emulation is not None:
            self.emulation.uninstall()
            self.emulation = None
