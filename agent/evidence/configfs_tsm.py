"""Production TEE evidence source: Linux configfs-tsm (``/sys/kernel/config/tsm/report``, kernel ≥ 6.7).

One collector for both providers: ``tdx_guest`` (Intel TDX: a DCAP quote) and ``sev_guest`` (AMD SEV-SNP:
a bare 1184-byte ATTESTATION_REPORT plus the optional certificate table ``auxblob``).

The kernel ABI has traps this module exists to get right (tdx-quote.md §0.2, §2.2, §2.3; sev-snp.md §2):
- configfs applies a binary-attribute write at close() and silently drops its error, so the only proof a
  write landed is ``generation`` advancing by exactly one;
- another writer on the same entry silently swaps the quote, so each request gets a private entry and
  ``generation`` is re-checked after reading ``outblob``; the parsed report_data is the decisive check;
- TDX: a host quote-service (QGS) failure shows up as an *empty* outblob, not as an error;
- EBUSY (a timed-out request still owned by the host), EINTR and ETIMEDOUT are transient;
- SEV-SNP: ``privlevel`` is written only when ``privlevel_floor`` is above 0 (that write bumps
  ``generation`` too); ``auxblob`` is optional and usually empty (upstream KVM gives no certificates); the
  report must be 1184 bytes with REPORT_DATA = inblob and VMPL = privlevel; **ENOTTY means the sev-guest
  driver wiped the VMPCK** after a failed request, so every later request fails until reboot: never
  retried, and remembered by the source (fail closed).
Every request removes its entry, whatever happens.
"""

from __future__ import annotations

import errno
import os
import secrets
import time
from dataclasses import dataclass

from agent.evidence.base import REPORT_DATA_LEN, QuoteSourceError, TeeEvidence
from agent.evidence.tee import SNP, TDX, TEES, provider_for
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
#: SEV-SNP (sev_guest, sev-snp.md §2.2): the driver talks to the PSP through the GHCB; there is no host daemon.
_SNP_ERRNO_HINTS = {
    errno.EBUSY: "a previous report request is still in progress; retry later",
    errno.EINTR: "the report request was interrupted",
    errno.ETIMEDOUT: "the host throttled the guest request for more than 60 s (the kernel retries every 2 s); "
                     "retry later",
    errno.EINVAL: "inblob was not accepted (SEV-SNP needs exactly 64 bytes) or the firmware refused the request "
                  "(INVALID_PARAM / INVALID_KEY)",
    errno.EIO: "the host's certificate table does not fit the kernel's 16 KiB auxblob buffer (or the guest "
               "message sequence counter overflowed)",
    errno.ENXIO: "the SEV firmware returned an error status for the guest request",
    errno.ENOTTY: "the sev-guest driver wiped the VMPCK after a failed guest request (to prevent IV reuse), so "
                  "every report request fails from now on; only a reboot of the VM helps",
    errno.ENOMEM: "the firmware's report is larger than the driver's buffer",
    errno.ENOSR: "the guest message sequence number is zero (driver state broken; reboot the VM)",
    errno.EFBIG: "the report is larger than configfs allows (32 KiB)",
}
#: An SEV-SNP ATTESTATION_REPORT is exactly this long (0x4A0, sev-snp.md §1.1).
SNP_REPORT_LEN = 1184
#: The highest VMPL a report can be requested for (configfs ``privlevel``).
SNP_PRIVLEVEL_MAX = 3


class TsmUnavailableError(QuoteSourceError):
    """configfs-tsm is not there at all (no TDX guest, old kernel, configfs not mounted)."""

    exit_code = EXIT_UNAVAILABLE
    reason = "unavailable"


class SnpVmpckDisabledError(QuoteSourceError):
    """SEV-SNP: the guest's VMPCK was wiped (ENOTTY); no report can be had until the VM reboots. Fatal."""

    exit_code = EXIT_UNAVAILABLE
    reason = "snp_vmpck_disabled"


@dataclass(frozen=True)
class _Blob:
    raw: bytes
    aux: bytes = b""
    privlevel: int = 0


class _Retry(Exception):
    """One attempt failed in a way worth retrying; carries the error to raise if attempts run out."""

    def __init__(self, error: QuoteSourceError) -> None:
        super().__init__(str(error))
        self.error = error


def _errno_name(code: int | None) -> str:
    return errno.errorcode.get(code or 0, str(code))


class ConfigfsTsmSource:
    """QuoteSource over configfs-tsm: one private entry per request, generation-checked, always removed.

    ``tee`` is "tdx" (provider ``tdx_guest``, raw DCAP quotes) or "snp" (provider ``sev_guest``, bare
    SEV-SNP reports); ``expected_provider`` "" means that TEE's own provider.
    """

    name = "configfs"

    def __init__(
        self,
        root: str = DEFAULT_ROOT,
        tee: str = TDX,
        expected_provider: str = "",
        retries: int = 3,
        retry_delay_s: float = 0.5,
    ) -> None:
        if retries < 0:
            raise ValueError(f"retries: must be >= 0, got {retries}")
        if tee not in TEES:
            raise ValueError(f"tee: must be one of {', '.join(TEES)}, got {tee!r}")
        self.root = root
        self.tee = tee
        self.expected_provider = expected_provider or provider_for(tee)
        self.retries = retries
        self.retry_delay_s = retry_delay_s
        #: SEV-SNP: set once the driver answered ENOTTY (VMPCK wiped); every later request fails at once.
        self._fatal: QuoteSourceError | None = None

    # -- public -------------------------------------------------------------------------------------

    def get_quote(self, report_data: bytes) -> bytes:
        """A quote (TDX) or bare 1184-byte report (SEV-SNP) whose report data equals ``report_data`` (64 bytes).

        Blocking; ~1 s on TDX hardware.
        """
        return self.get_evidence(report_data).raw

    def get_evidence(self, report_data: bytes) -> TeeEvidence:
        """The evidence for ``report_data`` with the host's SEV-SNP certificate table (``aux``, b"" if none)."""
        if not isinstance(report_data, bytes | bytearray) or len(report_data) != REPORT_DATA_LEN:
            got = len(report_data) if isinstance(report_data, bytes | bytearray) else type(report_data).__name__
            raise ValueError(f"report_data: expected {REPORT_DATA_LEN} bytes, got {got}")
        report_data = bytes(report_data)
        if self._fatal is not None:  # ENOTTY earlier: fatal until reboot, the device is not asked again
            raise self._fatal.with_traceback(None)
        if not os.path.isdir(self.root):
            raise TsmUnavailableError(
                f"configfs-tsm report directory {self.root} not found",
                hint="needs Linux >= 6.7 in a TDX guest with configfs mounted "
                "(mount -t configfs none /sys/kernel/config)" if self.tee == TDX else
                "needs Linux >= 6.7 in an SEV-SNP guest with the sev-guest and tsm_report modules loaded and "
                "configfs mounted (mount -t configfs none /sys/kernel/config)",
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
            except SnpVmpckDisabledError as exc:
                self._fatal = exc
                log.error("quote.snp_vmpck_disabled", reason=str(exc))
                raise
            if self.tee == SNP:
                self._check_report(blob, report_data)
            else:
                self._check_quote(blob.raw, report_data)
            return TeeEvidence(self.tee, blob.raw, blob.aux)
        assert last is not None
        what = "quote" if self.tee == TDX else "SEV-SNP report"
        raise QuoteSourceError(
            f"configfs-tsm {what} failed after {attempts} attempts: {last}", retryable=True
        ) from last

    # -- one attempt --------------------------------------------------------------------------------

    def _attempt(self, report_data: bytes) -> _Blob:
        entry = self._make_entry()
        try:
            provider = self._read_text(entry, "provider")
            if provider != self.expected_provider:
                raise QuoteSourceError(
                    f"configfs-tsm provider is {provider!r}, expected {self.expected_provider!r}",
                    hint="this is not a TDX guest (or quote.expected_provider is wrong)" if self.tee == TDX else
                    "this is not an SEV-SNP guest (or quote.expected_provider is wrong)",
                )
            privlevel = self._set_privlevel(entry) if self.tee == SNP else 0
            g0 = self._read_generation(entry)
            self._write_inblob(entry, report_data)
            g1 = self._read_generation(entry)
            if g1 != g0 + 1:
                raise _Retry(QuoteSourceError(
                    f"inblob write not applied as expected: generation {g0} -> {g1}, expected {g0 + 1}",
                    hint="concurrent writer on the entry or a rejected write", retryable=True,
                ))
            blob = self._read_outblob(entry)
            aux = self._read_auxblob(entry) if self.tee == SNP else b""
            g2 = self._read_generation(entry)
            if g2 != g1:
                raise _Retry(QuoteSourceError(
                    f"generation changed while reading outblob: {g1} -> {g2}",
                    hint="concurrent writer on the entry", retryable=True,
                ))
            if not blob:
                raise QuoteSourceError(
                    "configfs-tsm returned an empty outblob",
                    hint="host quote service (QGS) failed: check the QGS daemon and its socket on the host"
                    if self.tee == TDX else "the sev_guest provider returned no report (firmware or host failure)",
                    retryable=True,
                )
            return _Blob(blob, aux, privlevel)
        finally:
            self._remove_entry(entry)

    def _set_privlevel(self, entry: str) -> int:
        """SEV-SNP: the VMPL to request. ``privlevel`` is written only when ``privlevel_floor`` is above 0
        (the floor is the VMPCK the driver uses; 0 without an SVSM, as on Chutes' guests)."""
        if not os.path.exists(os.path.join(entry, "privlevel_floor")):
            return 0  # no privlevel attributes: the request is for VMPL 0
        text = self._read_text(entry, "privlevel_floor")
        try:
            floor = int(text)
        except ValueError:
            raise QuoteSourceError(f"configfs-tsm privlevel_floor is not a number: {text!r}") from None
        if not 0 <= floor <= SNP_PRIVLEVEL_MAX:
            raise QuoteSourceError(f"configfs-tsm privlevel_floor is {floor}, outside 0..{SNP_PRIVLEVEL_MAX}")
        if floor == 0:
            return 0
        path = os.path.join(entry, "privlevel")
        try:
            fd = os.open(path, os.O_WRONLY)
        except OSError as exc:
            raise self._os_error(f"cannot open {path}", exc) from None
        try:
            os.write(fd, f"{floor}\n".encode())  # a text attribute: its store runs here, errors come back
        except OSError as exc:
            raise self._os_error(f"write of privlevel {floor} to {path} failed", exc) from None
        finally:
            os.close(fd)
        return floor

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

    def _read_auxblob(self, entry: str) -> bytes:
        """SEV-SNP: the certificate table of the same request (cached by generation, no second request);
        b"" when the attribute is absent or the host gave no certificates (upstream KVM)."""
        path = os.path.join(entry, "auxblob")
        if not os.path.exists(path):
            return b""
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
        hint = (_ERRNO_HINTS if self.tee == TDX else _SNP_ERRNO_HINTS).get(exc.errno or 0, "")
        if self.tee == SNP and exc.errno == errno.ENOTTY:
            return SnpVmpckDisabledError(f"{what}: {name}: the SEV-SNP VMPCK was disabled", hint=hint)
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

    def _check_report(self, blob: _Blob, report_data: bytes) -> None:
        """SEV-SNP: exactly one 1184-byte report that parses, REPORT_DATA = inblob, VMPL = privlevel."""
        from agent.quote.snp_parser import SnpReportError, parse_snp_report

        raw = blob.raw
        if len(raw) != SNP_REPORT_LEN:
            raise QuoteSourceError(
                f"configfs-tsm outblob is {len(raw)} bytes, expected an SEV-SNP report of exactly {SNP_REPORT_LEN}",
                hint="the sev_guest provider misbehaved; the report was discarded",
            )
        try:
            report = parse_snp_report(raw)
        except SnpReportError as exc:
            raise QuoteSourceError(
                f"configfs-tsm outblob ({len(raw)} bytes) is not a valid SEV-SNP report: {exc}"
            ) from None
        if bytes(report.report_data) != report_data:
            raise QuoteSourceError(
                "report REPORT_DATA does not match the 64 bytes written to inblob",
                hint="another process rewrote the entry or the provider misbehaved; the report was discarded",
            )
        if report.vmpl != blob.privlevel:
            raise QuoteSourceError(
                f"report VMPL is {report.vmpl}, but privlevel {blob.privlevel} was requested",
                hint="the sev_guest provider misbehaved; the report was discarded",
            )
