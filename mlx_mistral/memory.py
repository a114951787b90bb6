"""How much memory the engine may use: the KV and prefix-cache budgets, and Metal's wired limit.

With a cap (`--max-memory`), weights + KV + prefix cache stay under it: the weights' size is
known once they are loaded, and what is left is split between the running batch's KV (three
quarters) and the prefix cache (a quarter, at most 2 GiB). Without one, the KV may take 60% of
the memory free after loading, as before.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import mlx.core as mx
from mlx.utils import tree_flatten

from .device import on_gpu
from .errors import ModelLoadError

log = logging.getLogger("mlx_mistral.engine")

DEFAULT_PREFIX_CACHE_MAX = 2 * 2**30


@dataclass(frozen=True)
class Budgets:
    """Bytes for the running batch's KV and for the prefix cache."""

    kv_bytes: int
    prefix_cache_bytes: int


def available_memory_bytes() -> int:
    """Memory the KV cache may grow into, after the weights are loaded."""
    if on_gpu() and hasattr(mx, "device_info"):
        info = mx.device_info()
        limit = int(info.get("max_recommended_working_set_size", info.get("memory_size", 0)))
        return max(0, limit - mx.get_active_memory())
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def weights_bytes(model: object) -> int:
    """The bytes of a model's parameters (quantized ones at their packed size)."""
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))  # type: ignore[attr-defined]


def plan_budgets(
    weights: int,
    *,
    max_memory_bytes: int | None,
    kv_budget_bytes: int | None,
    prefix_cache_bytes: int | None,
) -> Budgets:
    """Split the memory left beside `weights` between the KV and the prefix cache.

    Raises:
        ModelLoadError: `max_memory_bytes` does not even hold the weights.
    """
    if max_memory_bytes is not None:
        room = max_memory_bytes - weights
        if room <= 0:
            raise ModelLoadError(
                f"the memory cap ({max_memory_bytes / 2**20:.0f} MiB) does not hold the model's "
                f"weights ({weights / 2**20:.0f} MiB); raise --max-memory"
            )
        if kv_budget_bytes is not None:
            room = min(room, kv_budget_bytes)
        default_prefix = min(room // 4, DEFAULT_PREFIX_CACHE_MAX)
        # Under a cap an explicit prefix-cache size is honoured only up to a quarter of the
        # room: more would starve the running requests it is meant to speed up.
        prefix = min(
            default_prefix if prefix_cache_bytes is None else prefix_cache_bytes, room // 4
        )
        return Budgets(room - prefix, prefix)
    budget = kv_budget_bytes
    if budget is None:
        budget = int(available_memory_bytes() * 0.6)
    prefix = prefix_cache_bytes
    if prefix is None:  # a cache, not a reservation: bounded so RSS stays modest
        prefix = min(budget // 4, DEFAULT_PREFIX_CACHE_MAX)
    return Budgets(budget - prefix, prefix)


def _metal() -> bool:
    try:
        return on_gpu() and mx.metal.is_available() and hasattr(mx, "set_wired_limit")
    except AttributeError:  # a build without the Metal module
        return False


def wire(total_bytes: int) -> None:
    """On a Mac, keep up to `total_bytes` (weights + KV + prefix cache) wired while the model is
    loaded, as mlx-lm does for large models: macOS then cannot page the weights out between
    requests, which would stall the next one. A no-op on the CPU and CUDA backends."""
    if not _metal():
        return
    limit = int(mx.device_info().get("max_recommended_working_set_size", 0))
    wanted = min(total_bytes, limit) if limit else total_bytes
    mx.set_wired_limit(wanted)
    log.info("wired %.0f MiB of memory for the model", wanted / 2**20)


def unwire() -> None:
    """Give the wired memory back to macOS (after an unload)."""
    if _metal():
        mx.set_wired_limit(0)
