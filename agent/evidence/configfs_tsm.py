"""Production TDX quote source: Linux configfs-tsm (``/sys/kernel/config/tsm/report``, kernel ≥ 6.7).

The kernel ABI has traps this module exists to get right (tdx-quote.md §0.2, §2.2, §2.3):
- configfs applies a binary-attribute write at close() and silently drops its error, so the only proof a
  write landed is ``generation`` advancing by exactly one;
- another writer on the same entry silently swaps the quote, so each request gets a private entry and
  ``generation`` is re-checked after reading ``outblob``; the parsed report_data is the decisive check;
- a host quote-service (QGS) failure shows up as an *empty* outblob, not as an error;
- EBUSY (a timed-out request still owned by the host), EINTR and ETIMEDOUT are transient.
Every request removes its entry, whatever happens.
"""

from __future__ import annotations

import errno
import os
import secrets
import time

from agent.evidence.base import REPORT_DATA_LEN, QuoteSourceError
from agent.exitcodes import EXIT_UNAVAILABLE
from agent.log import get_logger

log = get_logger(__name__)

DEFAULT_ROOT = "/sys/kernel/config/tsm/report"
OUTBLOB_MAX = 32 * 1024
_RETRYABLE_ERRNOS = frozenset({errno.EBUSY, errno.EINTR, errno.ETIMEDOUT})
_ERRNO_HINTS = {
    errno.EBUSY: "a previous quote request is still owned by the host; retry later",
    errno.EINTR: "quote generation was interrupted",
    errno.ETIMEDOUT: "the host did not answer GetQuote within the kernel's 30 s timeout; check QGS on the host",
    errno.EINVAL: "inblob was not accepted (TDX needs exactly 64 bytes)",
    errno.EIO: "the GetQuote TDVMCALL failed; check the host's TDX quote support",
    errno.EFBIG: "the quote is larger than configfs allows (32 KiB)",
    errno.ENXIO: "no TSM provider is registered (is the tdx_guest driver loaded?)",
}


class TsmUnavailableError(QuoteSourceError):
    """configfs-tsm is not there at all (no TDX guest, old kernel, configfs not mounted)."""

    exit_code = EXIT_UNAVAILABLE
    reason = "unavailable"


class _Retry(Exception):
    """One attempt failed in a way worth retrying; carries the error to raise if attempts run out."""

    def __init__(self, error: QuoteSourceError) -> None:
        super().__init__(str(error))
        self.error = error


def _errno_name(code: int | None) -> str:
    return errno.errorcode.get(code or 0, str(code))


class ConfigfsTsmSource:
    """QuoteSource over configfs-tsm: one private entry per request, generation-checked, always removed."""

    name = "configfs"

    def __init__(
        self,
        root: str = DEFAULT_ROOT,
        expected_provider: str = "tdx_guest",
        retries: int = 3,
        retry_delay_s: float = 0.5,
    ) -> None:
        if retries < 0:
            raise ValueError(f"retries: must be >= 0, got {retries}")
        self.root = root
        self.expected_provider = expected_provider
        self.retries = retries
        self.retry_delay_s = retry_delay_s

    # -- public -------------------------------------------------------------------------------------

    def get_quote(self, report_data: bytes) -> bytes:
        """A quote whose REPORTDATA equals ``report_data`` (64 bytes). Blocking; ~1 s on real hardware."""
        if not isinstance(report_data, bytes | bytearray) or len(report_data) != REPORT_DATA_LEN:
            got = len(report_data) if isinstance(report_data, bytes | bytearray) else type(report_data).__name__
            raise ValueError(f"report_data: expected {REPORT_DATA_LEN} bytes, got {got}")
        report_data = bytes(report_data)
        if not os.path.isdir(self.root):
            raise TsmUnavailableError(
                f"configfs-tsm report directory {self.root} not found",
                hint="needs Linux >= 6.7 in a TDX guest with configfs mounted "
                "(mount -t configfs none /sys/kernel/config)",
            )
        attempts = self.retries + 1
        last: QuoteSourceError | None = None
        for attempt in range(1, attempts + 1):
            try:
                blob = self._attempt(report_data)
            except _Retry as exc:
                last = exc.error
                log.warning("quote.configfs_retry", attempt=attempt, attempts=attempts, reason=str(exc.error))
                if attempt < attempts and self.retry_delay_s > 0:
                    time.sleep(self.retry_delay_s * attempt)
                continue
            self._check_quote(blob, report_data)
            return blob
        assert last is not None
        raise QuoteSourceError(
            f"configfs-tsm quote failed after {attempts} attempts: {last}", retryable=True
        ) from last

    # -- one attempt --------------------------------------------------------------------------------

    def _attempt(self, report_data: bytes) -> bytes:
        entry = self._make_entry()
        try:
            provider = self._read_text(entry, "provider")
            if provider != self.expected_provider:
                raise QuoteSourceError(
                    f"configfs-tsm provider is {provider!r}, expected {self.expected_provider!r}",
                    hint="this is not a TDX guest (or quote.expected_provider is wrong)",
                )
            g0 = self._read_generation(entry)
            self._write_inblob(entry, report_data)
            g1 = self._read_generation(entry)
            if g1 != g0 + 1:
                raise _Retry(QuoteSourceError(
                    f"inblob write not applied as expected: generation {g0} -> {g1}, expected {g0 + 1}",
                    hint="concurrent writer on the entry or a rejected write", retryable=True,
                ))
            blob = self._read_outblob(entry)
            g2 = self._read_generation(entry)
            if g2 != g1:
                raise _Retry(QuoteSourceError(
                    f"generation changed while reading outblob: {g1} -> {g2}",
                    hint="concurrent writer on the entry", retryable=True,
                ))
            if not blob:
                raise QuoteSourceError(
                    "configfs-tsm returned an empty outblob",
                    hint="host quote service (QGS) failed: check the QGS daemon and its socket on the host",
                    retryable=True,
                )
            return blob
        finally:
            self._remove_entry(entry)

    def _make_entry(self) -> str:
        for _ in range(8):
            path = os.path.join(self.root, f"chutes-attest-{os.getpid()}-{secrets.token_hex(6)}")
            try:
                os.mkdir(path)
                return path
            except FileExistsError:
                continue
            except OSError as exc:
                raise self._os_error(f"cannot create configfs-tsm entry under {self.root}", exc) from None
        raise QuoteSourceError(f"cannot create a unique configfs-tsm entry under {self.root}")

    def _remove_entry(self, path: str) -> None:
        try:
            os.rmdir(path)
        except FileNotFoundError:
            pass
        except OSError as exc:  # never mask the real outcome; an operator can remove it by hand
            log.error("quote.configfs_rmdir_failed", path=path, reason=_errno_name(exc.errno))

    def _read_text(self, entry: str, attr: str) -> str:
        return self._read_all(os.path.join(entry, attr)).decode("ascii", "replace").strip()

    def _read_generation(self, entry: str) -> int:
        text = self._read_text(entry, "generation")
        try:
            return int(text)
        except ValueError:
            raise QuoteSourceError(f"configfs-tsm generation is not a number: {text!r}") from None

    def _write_inblob(self, entry: str, report_data: bytes) -> None:
        path = os.path.join(entry, "inblob")
        try:
            fd = os.open(path, os.O_WRONLY)
        except OSError as exc:
            raise self._os_error(f"cannot open {path}", exc) from None
        try:
            n = os.write(fd, report_data)  # exactly one write: the kernel takes one buffer at close
        except OSError as exc:
            raise self._os_error(f"write to {path} failed", exc) from None
        finally:
            os.close(fd)  # the write is applied here; its error is dropped by configfs (checked via generation)
        if n != REPORT_DATA_LEN:
            raise _Retry(QuoteSourceError(f"short write to inblob: {n} of {REPORT_DATA_LEN} bytes", retryable=True))

    def _read_outblob(self, entry: str) -> bytes:
        path = os.path.join(entry, "outblob")
        return self._read_all(path)

    def _read_all(self, path: str) -> bytes:
        """Read a configfs attribute to EOF on a fresh fd (the first read() generates; later ones page)."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise self._os_error(f"cannot open {path}", exc) from None
        try:
            chunks: list[bytes] = []
            total = 0
            while True:
                chunk = os.read(fd, OUTBLOB_MAX)
                if not chunk:
                    return b"".join(chunks)
                chunks.append(chunk)
                total += len(chunk)
                if total > OUTBLOB_MAX:
                    raise QuoteSourceError(f"{path}: more than {OUTBLOB_MAX} bytes")
        except OSError as exc:
            raise self._os_error(f"read of {path} failed", exc) from None
        finally:
            os.close(fd)

    def _os_error(self, what: str, exc: OSError) -> Exception:
        name = _errno_name(exc.errno)
        hint = _ERRNO_HINTS.get(exc.errno or 0, "")
        if exc.errno in _RETRYABLE_ERRNOS:
            return _Retry(QuoteSourceError(f"{what}: {name}", hint=hint, retryable=True))
        return QuoteSourceError(f"{what}: {name}", hint=hint)

    # -- final check --------------------------------------------------------------------------------

    def _check_quote(self, blob: bytes, report_data: bytes) -> None:
        from agent.quote import QuoteError, parse_quote

        try:
            quote = parse_quote(blob)
        except QuoteError as exc:
            raise QuoteSourceError(
                f"configfs-tsm outblob ({len(blob)} bytes) is not a valid TDX quote: {exc}"
            ) from None
        if bytes(quote.report_data) != report_data:
            raise QuoteSourceError(
                "quote report_data does not match the 64 bytes written to inblob",
                hint="another process rewrote the entry or the provider misbehaved; the quote was discarded",
            )
