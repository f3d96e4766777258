"""GPU readings from an NVIDIA DCGM exporter's ``/metrics`` page (a remote host's GPUs)."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from corral.fleet.gpu.sampler import MIB, GpuReading

# dcgm-exporter's default fields and what corral makes of them.
_FIELDS = {
    "DCGM_FI_DEV_GPU_UTIL": "util_pct",
    "DCGM_FI_DEV_FB_USED": "fb_used_mib",
    "DCGM_FI_DEV_FB_FREE": "fb_free_mib",
    "DCGM_FI_DEV_FB_RESERVED": "fb_reserved_mib",
    "DCGM_FI_DEV_GPU_TEMP": "temp_c",
    "DCGM_FI_DEV_POWER_USAGE": "power_w",
    "DCGM_FI_DEV_POWER_MGMT_LIMIT": "power_limit_w",
}


class DcgmFormatError(ValueError):
    """The page is not Prometheus text, or has no DCGM GPU series."""


def parse_dcgm(text: str, host: str = "") -> list[GpuReading]:
    """One reading per GPU on the page, ordered by index.

    GPUs are told apart by their ``UUID`` label (else ``gpu``). Memory total is
    used + free (+ reserved, where the exporter reports it), converted from MiB.
    """
    gpus: dict[str, dict[str, Any]] = {}
    try:
        families = list(text_string_to_metric_families(_relevant(text)))
    except (ValueError, TypeError, IndexError) as exc:
        raise DcgmFormatError(f"not a Prometheus text page: {exc}") from None
    for family in families:
        for sample in family.samples:
            field = _FIELDS.get(sample.name)
            if field is None:
                continue
            labels = sample.labels
            key = labels.get("UUID") or labels.get("uuid") or f"gpu{labels.get('gpu', '')}"
            gpu = gpus.setdefault(key, {"labels": labels})
            gpu[field] = float(sample.value)
    if not gpus:
        raise DcgmFormatError("no DCGM_FI_DEV_* GPU series on the page")
    readings = [_reading(values, host) for values in gpus.values()]
    return sorted(readings, key=lambda r: (r.index, r.uuid))


def _relevant(text: str) -> str:
    """Only the lines of the fields corral reads: an exporter page with thousands of other
    series (or a hostile one) costs a scan, not a parse, on the event loop."""
    keep = []
    for line in text.splitlines():
        if line.startswith("DCGM_FI_DEV_"):
            name = line.split("{", 1)[0].split(" ", 1)[0]
        elif line.startswith("# "):
            parts = line.split(" ", 3)
            name = parts[2] if len(parts) > 2 else ""
        else:
            continue
        if name in _FIELDS:
            keep.append(line)
    keep.append("")
    return "\n".join(keep)


def _mib(values: dict[str, Any], field: str) -> int | None:
    value = values.get(field)
    return None if value is None else int(value * MIB)


def _reading(values: dict[str, Any], host: str) -> GpuReading:
    labels: dict[str, str] = values["labels"]
    used = _mib(values, "fb_used_mib")
    free = _mib(values, "fb_free_mib")
    total = None
    if used is not None and free is not None:
        total = used + free + (_mib(values, "fb_reserved_mib") or 0)
    util = values.get("util_pct")
    index = labels.get("gpu", "")
    return GpuReading(
        index=int(index) if index.isdigit() else -1,
        uuid=labels.get("UUID") or labels.get("uuid") or "",
        name=labels.get("modelName") or labels.get("model_name") or "",
        memory_total_bytes=total,
        memory_used_bytes=used,
        utilization_ratio=None if util is None else util / 100,
        temperature_c=values.get("temp_c"),
        power_w=values.get("power_w"),
        power_limit_w=values.get("power_limit_w"),
        source="dcgm",
        host=labels.get("Hostname") or labels.get("hostname") or host,
    )
