"""One map from errors to exit codes and HTTP statuses (issue 20 item 5): class attributes in agent.errors,
inherited by every error class, read once by ``cli.main`` (exit codes) and by the HTTP handlers (statuses)."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import agent
from agent import errors
from agent.exitcodes import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_UNAVAILABLE, EXIT_USAGE, EXIT_VERIFY_FAILED

EXIT_CODES = {EXIT_FAILED, EXIT_USAGE, EXIT_VERIFY_FAILED, EXIT_BAD_INPUT, EXIT_UNAVAILABLE}


def every_error_class() -> list[type[errors.AgentError]]:
    """Every AgentError subclass defined under agent/ (modules needing absent system libraries left out)."""
    for mod in pkgutil.walk_packages(agent.__path__, "agent."):
        try:
            importlib.import_module(mod.name)
        except OSError:  # libfuse for the FUSE emulators (tests/unit/test_import_each_module.py covers them)
            continue
    seen: list[type[errors.AgentError]] = []
    todo: list[type[errors.AgentError]] = [errors.AgentError]
    while todo:
        cls = todo.pop()
        if cls not in seen:
            seen.append(cls)
            todo += cls.__subclasses__()
    return [c for c in seen if c.__module__.startswith("agent.")]


def test_every_error_class_carries_a_documented_exit_code_and_an_http_status() -> None:
    classes = every_error_class()
    assert len(classes) > 30
    bad = [f"{c.__module__}.{c.__qualname__}: exit {c.exit_code}, http {c.http_status}" for c in classes
           if c.exit_code not in EXIT_CODES or not 400 <= c.http_status <= 599]
    assert not bad, bad


@pytest.mark.parametrize(("cls", "exit_code", "status"), [
    ("agent.errors.AgentError", EXIT_FAILED, 500),
    ("agent.errors.UsageError", EXIT_USAGE, 500),
    ("agent.config.ConfigError", EXIT_USAGE, 500),
    ("agent.errors.BadInputError", EXIT_BAD_INPUT, 400),
    ("agent.errors.VerificationError", EXIT_VERIFY_FAILED, 500),
    ("agent.errors.UnavailableError", EXIT_UNAVAILABLE, 503),
    ("agent.evidence.base.EvidenceError", EXIT_FAILED, 503),
    ("agent.evidence.base.QuoteSourceError", EXIT_FAILED, 503),
    ("agent.evidence.base.QueueFullError", EXIT_FAILED, 429),
    ("agent.evidence.base.DeadlineExceeded", EXIT_FAILED, 504),
    ("agent.evidence.base.GpuEvidenceError", EXIT_FAILED, 503),
    ("agent.evidence.configfs_tsm.TsmUnavailableError", EXIT_UNAVAILABLE, 503),
    ("agent.evidence.nvml_gpu.GpuUnavailableError", EXIT_UNAVAILABLE, 503),
    ("agent.evidence.device_info.GpuIdError", EXIT_BAD_INPUT, 400),
    ("agent.evidence.report_data.ReportDataError", EXIT_BAD_INPUT, 400),
    ("agent.evidence.service_identity.ServiceCertError", EXIT_UNAVAILABLE, 503),
    ("agent.evidence.service_identity.HandoffIdentityError", EXIT_VERIFY_FAILED, 503),
    ("agent.serve.sockets.SocketSetupError", EXIT_UNAVAILABLE, 503),
    ("agent.serve.server.SelfCheckError", EXIT_UNAVAILABLE, 503),
    ("agent.serve.server.StartError", EXIT_UNAVAILABLE, 503),
])
def test_the_map(cls: str, exit_code: int, status: int) -> None:
    module, _, name = cls.rpartition(".")
    c = getattr(importlib.import_module(module), name)
    assert (c.exit_code, c.http_status) == (exit_code, status)


def test_api_error_takes_its_status_from_the_class() -> None:
    from agent.evidence.base import QueueFullError
    from agent.serve.errors import ApiError

    err = ApiError.of(QueueFullError("queue full", 2.0), "queue_full", headers={"Retry-After": "2"})
    assert (err.status, err.http_status, err.code, err.detail, err.headers) == (429, 429, "queue_full", "queue full",
                                                                              {"Retry-After": "2"})
    plain = ApiError.of(errors.BadInputError("nonce: bad"))
    assert (plain.status, plain.code, plain.detail) == (400, "bad_input", "nonce: bad")
    assert ApiError(418, "teapot", "short and stout").http_status == 418  # an explicit answer keeps its status


@pytest.mark.parametrize(("cls", "args", "status", "code"), [
    ("agent.evidence.base.QueueFullError", ("full", 1.5), 429, "queue_full"),
    ("agent.evidence.base.DeadlineExceeded", ("late",), 504, "deadline_exceeded"),
    ("agent.evidence.base.GpuEvidenceError", ("nvml",), 503, "gpu_unavailable"),
    ("agent.evidence.base.QuoteSourceError", ("eio",), 503, "quote_unavailable"),
    ("agent.evidence.device_info.GpuIdError", ("no GPU with id x",), 400, "bad_gpu_ids"),
])
async def test_evidence_errors_reach_http_with_their_class_status(cls: str, args: tuple[object, ...], status: int,
                                                                 code: str) -> None:
    from agent.serve.errors import ApiError
    from agent.serve.handlers_common import evidence_call

    module, _, name = cls.rpartition(".")
    error = getattr(importlib.import_module(module), name)(*args)

    async def fails() -> None:
        raise error

    with pytest.raises(ApiError) as got:
        await evidence_call(fails())
    assert (got.value.status, got.value.code, got.value.detail) == (status, code, str(error))
    assert got.value.status == type(error).http_status
