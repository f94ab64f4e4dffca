"""Runs INSIDE the 1.4.0 test initramfs (init-top, test images only): the TDX guest interfaces qemu TCG lacks.

qemu without TDX has neither configfs-tsm nor the measurement-register sysfs, so this mounts the
project's FUSE emulators of both, sharing one set of registers, before the agent starts:

- ``BASE/measurements/rtmr{0..3}:sha384`` (:class:`agent.sim.tsm_mr_emulator.MeasurementsFs`): a 48-byte
  write extends, ``new = SHA-384(old ‖ digest)``; the agent's RTMR3 rootfs chain (boot.rtmr3_chain,
  ``rtmr.sysfs_path``) writes here through the production code, unmodified;
- ``BASE/tsm-report`` (:class:`agent.sim.tsm_emulator.TsmReportFs`): the configfs-tsm report ABI; its
  quotes are simulated (PCK chain in STATE_DIR) and carry the emulated registers *as they are when the
  quote is generated* (:class:`agent.sim.tsm_mr_emulator.LiveRtmrQuoteSource`), so the boot quote has
  RTMR3 = 0 and the provision quote the rootfs chain, as on a TD. The agent reads it through
  ``quote.source = "configfs"`` (``quote.configfs_root``), the production quote path, with ``quote.tee =
  "tdx"`` pinned in the guest's agent.toml (scripts/vm/vmlib.py): qemu TCG has no ``/dev/tdx_guest`` to probe.

Usage: ``python -I -S guest_emulators.py BASE STATE_DIR`` (forks the measurements server, serves the
report interface in the foreground; the init-top script backgrounds it and waits for both mounts).
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, "/usr/lib/chutes-attest/site"]

from agent.sim.quote_sim import DEFAULT_RTMRS  # noqa: E402
from agent.sim.tsm_emulator import TsmReportFs  # noqa: E402
from agent.sim.tsm_fuse import serve  # noqa: E402
from agent.sim.tsm_mr_emulator import LiveRtmrQuoteSource, MeasurementsFs, MrState  # noqa: E402


def main(base: str, state_dir: str) -> int:
    measurements, report = os.path.join(base, "measurements"), os.path.join(base, "tsm-report")
    os.makedirs(measurements, exist_ok=True)
    os.makedirs(report, exist_ok=True)
    state = MrState()
    state.reset_td(tuple(DEFAULT_RTMRS[:3]))  # RTMR0-2 as the simulated firmware/kernel left them, RTMR3 zero
    if os.fork() == 0:
        serve(MeasurementsFs(state), measurements, "tdx-measurements-emulator")
        os._exit(0)
    serve(TsmReportFs(state_dir, source=LiveRtmrQuoteSource(state, state_dir)), report, "configfs-tsm-emulator")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
