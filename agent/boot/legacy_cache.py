"""≤1.2 data volume: the containerd cache volume keyed by the boot token (reference §4.1 step 5).

``GET``/``PUT /servers/{vm}/luks`` (the removed baseline calls, kept behind
``boot.legacy_cache_endpoints``) through the shared retry helper.
"""

from __future__ import annotations

from typing import Any

from agent.boot.cryptsetup import Cryptsetup, CryptsetupError
from agent.boot.failure import BootFailure
from agent.boot.luks_header import LuksHeaderError
from agent.boot.retrying import CallBudget
from agent.boot.root_unlock import header_dict
from agent.boot.stages import StageTimer
from agent.boot.volumes import setup_cache_volume
from agent.config import BootConfig
from agent.exitcodes import EXIT_VERIFY_FAILED
from agent.log import Secret
from agent.validator.client import ValidatorClient


async def cache_volume_stage(b: BootConfig, cs: Cryptsetup, timer: StageTimer, budget: CallBudget,
                             client: ValidatorClient, vm_name: str, hotkey: str, token: Secret | None,
                             status: dict[str, Any]) -> None:
    """Unlock (first boot: format) the cache volume with a key fetched by the boot token."""
    with timer.stage("cache_volume") as st:
        if token is None:
            st.result, st.detail = "skipped", "validator sent no boot_token (newer generation)"
            return

        async def fetch(method: str) -> Secret:
            async def once(n: int) -> Secret:
                ep = f"{method} /servers/{{vm_name}}/luks"
                with timer.stage(f"cache_key_{method.lower()}", attempt=n) as cst, cst.waiting("network"):
                    resp = await budget.bounded(ep, client.volume_key(method, vm_name, hotkey, token))
                return resp.passphrase

            return await budget.retried("cache volume key", "cache_volume", once)

        try:
            cache = await setup_cache_volume(
                cs, device=b.cache_device, label=b.cache_label, wait_s=b.device_wait_s, mapper=b.cache_mapper,
                header_dir=b.header_dir, action=b.unlock_action, fetch_key=fetch, pbkdf=b.format_pbkdf,
                iterations=b.format_pbkdf_iterations,
            )
        except LuksHeaderError as exc:
            raise BootFailure("cache_volume", f"cache volume header refused: {exc}", EXIT_VERIFY_FAILED) from None
        except CryptsetupError as exc:
            raise BootFailure("cache_volume", f"cache volume: {exc}") from None
        if cache.device is None:
            st.result, st.detail = "skipped", f"no volume labelled {b.cache_label!r}"
            return
        st.detail = f"{cache.device} ({'formatted, first boot' if cache.first_boot else 'existing'})"
        status["cache"] = {"device": cache.device, "first_boot": cache.first_boot,
                           "header": header_dict(cache.header)}
