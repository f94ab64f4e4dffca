"""What the configfs-tsm collector says about each errno, per provider (sev-snp.md §2.2; tdx-quote.md §2.2):
SEV-SNP never names QGS, ENOTTY is fatal, ETIMEDOUT is the host throttling; the TDX texts are unchanged."""

from __future__ import annotations

import errno

import pytest

from agent.evidence.configfs_tsm import ConfigfsTsmSource, SnpVmpckDisabledError, _Retry

SNP_CASES = {
    errno.ETIMEDOUT: (True, "throttled the guest request for more than 60 s"),
    errno.EBUSY: (True, "still in progress"),
    errno.EINTR: (True, "interrupted"),
    errno.EIO: (False, "16 KiB auxblob buffer"),
    errno.EINVAL: (False, "exactly 64 bytes"),
    errno.ENXIO: (False, "SEV firmware returned an error status"),
    errno.ENOMEM: (False, "larger than the driver's buffer"),
}


@pytest.mark.parametrize(("code", "case"), list(SNP_CASES.items()), ids=[errno.errorcode[c] for c in SNP_CASES])
def test_snp_errno_hints(code: int, case: tuple[bool, str]) -> None:
    retryable, needle = case
    err = ConfigfsTsmSource(tee="snp")._os_error("read of x/outblob failed", OSError(code, "x"))
    if retryable:
        assert isinstance(err, _Retry) and err.error.retryable
        err = err.error
    else:
        assert not isinstance(err, _Retry) and not err.retryable
    text = str(err)
    assert text.startswith(f"read of x/outblob failed: {errno.errorcode[code]} (") and needle in text
    assert "QGS" not in text and "tdx" not in text.lower()


def test_snp_enotty_is_its_own_fatal_error() -> None:
    err = ConfigfsTsmSource(tee="snp")._os_error("read of x/outblob failed", OSError(errno.ENOTTY, "x"))
    assert isinstance(err, SnpVmpckDisabledError) and not err.retryable
    assert "VMPCK was disabled" in str(err) and "only a reboot of the VM helps" in err.hint


def test_tdx_errno_texts_unchanged() -> None:
    src = ConfigfsTsmSource()
    err = src._os_error("read of x/outblob failed", OSError(errno.ETIMEDOUT, "x"))
    assert isinstance(err, _Retry)
    assert str(err.error) == ("read of x/outblob failed: ETIMEDOUT (the host did not answer GetQuote within the "
                              "kernel's 30 s timeout; check QGS on the host)")
    enxio = src._os_error("open", OSError(errno.ENXIO, "x"))
    assert str(enxio) == "open: ENXIO (no TSM provider is registered (is the tdx_guest driver loaded?))"
    enotty = src._os_error("open", OSError(errno.ENOTTY, "x"))  # no special meaning on TDX
    assert not isinstance(enotty, SnpVmpckDisabledError | _Retry) and str(enotty) == "open: ENOTTY"
