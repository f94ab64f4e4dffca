"""GPU identity shaping: the ``gpu_ids`` filter and the existing service's ``DeviceInfo`` dict.

Kept free of NVML so the service can validate a request's ``gpu_ids`` (and answer 400) before any
hardware is touched. Canonical id form, as ``/devices`` returns it: 32 lower-case hex characters,
the NVML UUID without ``GPU-`` and without hyphens (sek8s ``sanitize_gpu_id``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from agent.errors import BadInputError

_HEX32 = re.compile(r"[0-9a-f]{32}")
_DASHED = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
MAX_GPU_IDS = 64


class GpuIdError(BadInputError, ValueError):
    """A ``gpu_ids`` value is not a GPU UUID (the message names the value); maps to HTTP 400."""


class UnknownGpuIdError(GpuIdError):
    """Well-formed ids that match no GPU on this node."""

    def __init__(self, unknown: list[str], known: list[str]) -> None:
        super().__init__(f"gpu_ids: no GPU with id {', '.join(unknown)} on this node ({len(known)} GPUs present)")
        self.unknown = unknown


def sanitize_uuid(nvml_uuid: str) -> str:
    """``GPU-d52bd152-0847-8ba8-ca49-e07ec1f002e6`` -> ``d52bd15208478ba8ca49e07ec1f002e6``."""
    text = nvml_uuid.strip()
    if text[:4].lower() == "gpu-":
        text = text[4:]
    return text.replace("-", "").lower()


def _normalise_one(raw: str) -> str:
    text = raw.strip().lower()
    if text.startswith("gpu-"):
        text = text[4:]
    if not (_HEX32.fullmatch(text) or _DASHED.fullmatch(text)):
        shown = raw if len(raw) <= 80 else raw[:80] + "…"
        raise GpuIdError(
            f"gpu_ids: {shown!r} is not a GPU UUID (expected GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx "
            "or 32 hex characters)"
        )
    return text.replace("-", "")


def parse_gpu_ids(values: Iterable[str] | str | None) -> list[str] | None:
    """Normalise ``gpu_ids`` given as repeats and/or comma lists, ``GPU-`` or bare, any case.

    Returns canonical ids, de-duplicated in first-seen order, or None when no id was given (no
    filter). Anything that is not a UUID raises :class:`GpuIdError` naming the value.
    """
    if values is None:
        return None
    if isinstance(values, str):
        values = [values]
    out: list[str] = []
    for value in values:
        if not isinstance(value, str):
            raise GpuIdError(f"gpu_ids: expected strings, got {type(value).__name__}")
        for part in value.split(","):
            if not part.strip():
                continue
            gid = _normalise_one(part)
            if gid not in out:
                out.append(gid)
            if len(out) > MAX_GPU_IDS:
                raise GpuIdError(f"gpu_ids: more than {MAX_GPU_IDS} ids")
    return out or None


def select_indices(uuids: list[str], wanted: list[str] | None) -> list[int]:
    """NVML indices (ascending) of the GPUs to report; every wanted id must exist."""
    canon = [sanitize_uuid(u) for u in uuids]
    if wanted is None:
        return list(range(len(canon)))
    unknown = [w for w in wanted if w not in canon]
    if unknown:
        raise UnknownGpuIdError(unknown, canon)
    return [i for i, c in enumerate(canon) if c in wanted]


def model_short_ref(name: str) -> str:
    """Last word of the product name, lower-case (``NVIDIA H200`` -> ``h200``), as sek8s does."""
    words = name.lower().split()
    return words[-1] if words else ""


def device_info(
    *, uuid: str, name: str, memory: int, major: int, minor: int, max_graphics_clock_mhz: int, ecc: bool
) -> dict[str, Any]:
    """One ``DeviceInfo`` exactly as the existing service returns it (clock_rate = MHz × 1000, float)."""
    return {
        "uuid": sanitize_uuid(uuid),
        "name": name,
        "memory": int(memory),
        "major": int(major),
        "minor": int(minor),
        "clock_rate": float(max_graphics_clock_mhz * 1000),
        "ecc": bool(ecc),
        "model_short_ref": model_short_ref(name),
    }
