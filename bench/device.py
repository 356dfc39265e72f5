"""Facts about the device a benchmark runs on: its name, a folder name for it, its last-level
cache."""

from __future__ import annotations

import os

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "cpu"


def device_slug(device: torch.device) -> str:
    """A folder name for the device: lower case, words joined by '-'."""
    name = device_name(device).lower()
    if device.type == "cpu" and not name.startswith("cpu"):
        name = "cpu " + name
    for noise in ("(r)", "(tm)", "cpu @", "@"):
        name = name.replace(noise, " ")
    words = "".join(ch if ch.isalnum() or ch == "." else " " for ch in name).split()
    return "-".join(words)[:60]


def cache_bytes(device: torch.device) -> int:
    """The last-level cache a repeated run could be served from."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
    best = 32 << 20
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(base):
            with open(os.path.join(base, entry, "size")) as f:
                text = f.read().strip()
            scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
            size = int(text.rstrip("KMG")) * scale
            best = max(best, size) if size > (1 << 20) else best
    except (OSError, ValueError):
        pass
    return best
