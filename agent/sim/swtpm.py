"""A real software TPM (Debian ``swtpm``) on loopback, with fresh state, for tests and the demo.

Why a real swtpm rather than a mock: the agent's TPM code (tpm2-pytss → ESAPI → TCTI) then runs
unmodified against a genuine TPM 2.0 implementation, and the TPM is reached only because the
caller configured ``tpm.tcti`` to the ``swtpm:`` string this helper hands out.

State is manufactured by ``swtpm_setup`` with an EK and an EK certificate issued by a throw-away
local CA (``swtpm_localca``) kept inside the work directory, so nothing under /var/lib or /etc
changes. If the CA tooling fails, the state is created without an EK certificate
(``Swtpm.ek_cert`` then reads False).
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from agent.errors import UnavailableError

SWTPM = "swtpm"
SWTPM_SETUP = "swtpm_setup"
SWTPM_LOCALCA = "/usr/bin/swtpm_localca"
LOCALCA_OPTIONS = "/etc/swtpm-localca.options"
HOST = "127.0.0.1"


class SwtpmError(UnavailableError, RuntimeError):
    """swtpm could not be set up or started (message carries the tool's output)."""


def available() -> bool:
    """True when both ``swtpm`` and ``swtpm_setup`` are installed."""
    return shutil.which(SWTPM) is not None and shutil.which(SWTPM_SETUP) is not None


def _port_pair_free(port: int) -> bool:
    for p in (port, port + 1):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((HOST, p))
            except OSError:
                return False
    return True


def free_port_pair() -> int:
    """A port P such that P and P+1 are free on loopback right now (swtpm needs server + ctrl)."""
    for _ in range(64):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if port < 65535 and _port_pair_free(port):
            return port
    raise SwtpmError("no free pair of loopback ports for swtpm")


class Swtpm:
    """One swtpm process: ``setup()`` once, then ``start()``/``kill()``/``start()`` as a test needs.

    Restarting reuses the same state directory (same EPS, so the same EK and AK) and the same ports
    (picked free on the first start unless ``port`` pins them), so a configured ``tcti`` stays valid.
    """

    def __init__(self, workdir: str | Path | None = None, *, ek_cert: bool = True, port: int = 0) -> None:
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="swtpm-"))
        self.statedir = self.workdir / "state"
        self.want_ek_cert = ek_cert
        self.ek_cert = False
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def tcti(self) -> str:
        """The TCTI string for ``tpm.tcti`` (tpm2-tools syntax)."""
        return f"swtpm:host={HOST},port={self.port}"

    def setup(self) -> None:
        """Manufacture a fresh TPM state (EK, EK cert when possible, sha256 PCR bank)."""
        self.statedir.mkdir(parents=True, exist_ok=True)
        if self.want_ek_cert and Path(SWTPM_LOCALCA).exists():
            try:
                self._run_setup(with_cert=True)
                self.ek_cert = True
                return
            except SwtpmError:
                shutil.rmtree(self.statedir, ignore_errors=True)
                self.statedir.mkdir(parents=True)
        self._run_setup(with_cert=False)

    def _run_setup(self, *, with_cert: bool) -> None:
        ca = self.workdir / "ca"
        ca.mkdir(exist_ok=True)
        ca_conf = self.workdir / "localca.conf"
        ca_conf.write_text(
            f"statedir = {ca}\nsigningkey = {ca}/signkey.pem\n"
            f"issuercert = {ca}/issuercert.pem\ncertserial = {ca}/certserial\n"
        )
        setup_conf = self.workdir / "swtpm_setup.conf"
        setup_conf.write_text(
            f"create_certs_tool = {SWTPM_LOCALCA}\ncreate_certs_tool_config = {ca_conf}\n"
            f"create_certs_tool_options = {LOCALCA_OPTIONS}\nactive_pcr_banks = sha256\n"
        )
        cmd = [SWTPM_SETUP, "--tpm2", "--tpmstate", str(self.statedir), "--config", str(setup_conf),
               "--overwrite", "--logfile", str(self.workdir / "setup.log")]
        cmd.append("--create-ek-cert" if with_cert else "--createek")
        res = subprocess.run(cmd, capture_output=True, timeout=60, check=False)
        if res.returncode != 0:
            log = (self.workdir / "setup.log").read_text(errors="replace")[-2000:]
            raise SwtpmError(f"swtpm_setup failed (rc={res.returncode}): {log.strip()}")

    def start(self, timeout_s: float = 10.0) -> None:
        """Start swtpm on loopback and wait until its server port accepts connections."""
        if self.proc is not None and self.proc.poll() is None:
            raise SwtpmError("swtpm already running")
        last = ""
        for _ in range(5):  # another process may grab the ports between probe and bind
            port = self.port or free_port_pair()
            self.proc = subprocess.Popen(
                [SWTPM, "socket", "--tpm2",
                 "--server", f"type=tcp,port={port},bindaddr={HOST}",
                 "--ctrl", f"type=tcp,port={port + 1},bindaddr={HOST}",
                 "--tpmstate", f"dir={self.statedir}",
                 "--flags", "not-need-init,startup-clear",
                 "--log", f"file={self.workdir / 'swtpm.log'},level=1"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    last = (self.proc.stderr.read() if self.proc.stderr else b"").decode(errors="replace")
                    break
                try:
                    socket.create_connection((HOST, port), timeout=0.2).close()
                    self.port = port
                    return
                except OSError:
                    time.sleep(0.02)
            else:
                self.kill()
                raise SwtpmError(f"swtpm did not listen on {HOST}:{port} within {timeout_s}s")
        raise SwtpmError(f"swtpm failed to start: {last.strip()}")

    def kill(self) -> None:
        """SIGKILL: the TPM vanishes without a clean shutdown (volatile state lost)."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
            if self.proc.stderr:
                self.proc.stderr.close()
            self.proc = None

    def stop(self) -> None:
        """SIGTERM and wait; falls back to SIGKILL."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def close(self) -> None:
        """Stop the process and remove the work directory when this object created it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Swtpm:
        if not self.statedir.joinpath("tpm2-00.permall").exists():
            self.setup()
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main() -> int:  # pragma: no cover - manual helper: `python -m agent.sim.swtpm`
    """Run a swtpm until Ctrl-C and print the TCTI to put in ``tpm.tcti``."""
    with Swtpm() as tpm:
        print(f"tcti = {tpm.tcti!r}  (ek cert: {tpm.ek_cert}, state: {tpm.statedir})", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
