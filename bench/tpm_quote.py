"""How long one TPM quote takes against a real swtpm on loopback.

Prints the first call (connect, AK CreatePrimary, EK-cert NV read, quote, PCR read) and the median
and p90 of N steady-state calls of ``collect_tpm_evidence`` (quote + PCR read + consistency check),
of the bare TPM2_Quote, and of the offline self-check. Run: ``python bench/tpm_quote.py [N]``.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

from agent.config import AgentConfig
from agent.evidence import tpm
from agent.evidence.tpm_verify import verify_tpm_evidence
from agent.sim.swtpm import Swtpm


def _ms(samples: list[float]) -> str:
    s = sorted(samples)
    return f"median {statistics.median(s) * 1e3:7.2f} ms  p90 {s[int(len(s) * 0.9) - 1] * 1e3:7.2f} ms  (n={len(s)})"


def main(n: int = 20) -> int:
    with Swtpm() as sw:
        cfg = AgentConfig()
        cfg.tpm.tcti, cfg.tpm.event_log = sw.tcti, ""
        t = time.perf_counter()
        tpm.collect_tpm_evidence(cfg, os.urandom(32))
        first = time.perf_counter() - t
        collect, quote, verify = [], [], []
        for _ in range(n):
            nonce = os.urandom(32)
            t = time.perf_counter()
            ev = tpm.collect_tpm_evidence(cfg, nonce)
            collect.append(time.perf_counter() - t)
            t = time.perf_counter()
            ok = verify_tpm_evidence(ev, nonce).ok  # type: ignore[arg-type]
            verify.append(time.perf_counter() - t)
            assert ok
        with tpm._LOCK:
            sess = tpm._session(cfg.tpm.tcti, 0)
            for _ in range(n):
                t = time.perf_counter()
                sess.quote(os.urandom(32), cfg.tpm.bank, sorted(cfg.tpm.pcrs))
                quote.append(time.perf_counter() - t)
        tpm.close_session()
    print(f"swtpm {sw.tcti}, pcrs {cfg.tpm.bank}:{cfg.tpm.pcrs}")
    print(f"first call (connect + AK + EK cert + quote): {first * 1e3:.2f} ms")
    print(f"collect_tpm_evidence: {_ms(collect)}")
    print(f"TPM2_Quote alone:     {_ms(quote)}")
    print(f"verify_tpm_evidence:  {_ms(verify)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 20))
