"""The model's stay in memory: loaded on the engine thread, freed after an idle keep-alive.

A server that runs for days on a laptop should not hold ~14 GB while nobody uses it (Ollama's
`keep_alive`, LM Studio's TTL). `ModelSlot` owns the weights and what is sized from them (the
KV and prefix-cache budgets, the scheduler); the engine thread asks it to load, to note that it
is busy or idle, and it unloads once the keep-alive has run out. The scheduler and the
tokenizer outlive an unload, so requests are still checked and encoded while the weights are
out; the next one loads them again.

Everything here runs on the engine thread; other threads read only plain values.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import mlx.core as mx

from ._blas import reference_blas_warning
from .batch import BatchGenerator
from .device import name_of
from .disk_cache import DiskPrefixCache, KVLayout
from .errors import MistralError, ModelLoadError
from .forward_cost import flat_cost
from .memory import Budgets, plan_budgets, unwire, weights_bytes, wire
from .model import Model
from .prefix_cache import PrefixCache
from .tokenizer import Tokenizer

if TYPE_CHECKING:
    from .engine import EngineConfig

log = logging.getLogger("mlx_mistral.engine")


class ModelSlot:
    """The weights, the scheduler sized from them, and when they are freed.

    Args:
        load: returns (model, tokenizer); called on the engine thread, again after an unload.
        config: the engine's settings (budgets, the default keep-alive).
    """

    def __init__(self, load: Callable[[], tuple[Model, Tokenizer]], config: EngineConfig):
        self._load = load
        self.config = config
        self.model: Model | None = None
        self.tokenizer: Tokenizer | None = None
        self.generator: BatchGenerator | None = None
        self.budgets: Budgets | None = None
        self.weights_bytes = 0
        self.kv_bytes = 0
        self.keep_alive = config.keep_alive
        self._expires: float | None = None  # time.monotonic() of the unload, while idle
        self.expires_at: float | None = None  # the same as a time.time(), for /health
        self._worked = False  # a step ran since the engine was last idle
        self.loads = self.unloads = 0
        self.compute_dtype: str | None = None  # "float16", ... once a load has run
        # Tensor parallel: the other ranks hold the rest of the model and cannot reload in step
        # with this one, so the weights stay loaded whatever the keep-alive says.
        self.pinned = False

    def load(self) -> None:
        """Load the weights. The first load also sizes the budgets and builds the scheduler.

        Raises:
            ModelLoadError: the checkpoint cannot be loaded, or the memory cap cannot hold it.
        """
        started = time.perf_counter()
        model, tokenizer = self._load()
        weights = weights_bytes(model)
        if self.generator is None:
            # Said here, on the engine thread: asking MLX for the device is MLX work.
            if (advice := reference_blas_warning()) is not None:
                log.warning(advice)
            config = self.config
            self.budgets = budgets = plan_budgets(
                weights,
                max_memory_bytes=config.max_memory_bytes,
                kv_budget_bytes=config.kv_budget_bytes,
                prefix_cache_bytes=config.prefix_cache_bytes,
            )
            prefix = budgets.prefix_cache_bytes
            self.tokenizer = tokenizer
            self.generator = BatchGenerator(
                model,
                tokenizer,
                prefill_chunk=config.prefill_chunk,
                kv_budget_bytes=budgets.kv_bytes,
                max_batch=config.max_batch,
                prefix_cache=self._make_prefix_cache(model, prefix),
                kv_bits=config.kv_bits,
                prompt_lookup=config.speculation != "off",
                predictions=config.speculation != "off",
                forward_cost=flat_cost if config.speculation == "always" else None,
                defer_measurement=True,
            )
            log.info(
                "memory: weights %.0f MiB, KV budget %.0f MiB, prefix cache %.0f MiB%s; "
                "unloaded after %s without requests",
                weights / 2**20,
                budgets.kv_bytes / 2**20,
                prefix / 2**20,
                "" if config.max_memory_bytes is None else " (capped by the memory limit)",
                f"{self.keep_alive:g}s" if math.isfinite(self.keep_alive) else "never",
            )
        else:
            self.generator.model = model
            if (cache := self.generator.prefix_cache) is not None and cache.disk is not None:
                cache.disk.follow_model()  # the checkpoint may have changed while unloaded
            log.info("model loaded again in %.1fs", time.perf_counter() - started)
        self.model, self.weights_bytes = model, weights
        self.compute_dtype = name_of(model.model.norm.weight.dtype)
        self.loads += 1
        assert self.budgets is not None
        wire(weights + self.budgets.kv_bytes + self.budgets.prefix_cache_bytes)

    def _make_prefix_cache(self, model: Model, budget_bytes: int) -> PrefixCache | None:
        settings = self.config.prompt_cache
        if settings is None:
            return PrefixCache(budget_bytes) if budget_bytes else None
        # The cache's dtype (see batch.py) and quantization: files of another format never load.
        args = model.args
        layout = KVLayout(
            num_layers=args.num_hidden_layers,
            kv_heads=args.num_key_value_heads,
            head_dim=args.head_dim,
            dtype=model.model.norm.weight.dtype,
            kv_bits=self.config.kv_bits,
        )
        disk = DiskPrefixCache(settings, layout)
        log.info("prompt cache: %d file(s) in %s", len(disk), disk.dir)
        return PrefixCache(budget_bytes, disk=disk)

    def ensure_loaded(self) -> MistralError | None:
        """Load the weights if an idle unload freed them; the error to answer if that fails."""
        if self.model is not None:
            return None
        log.info("loading the model again for a request (it was unloaded while idle)")
        try:
            self.load()
        except MistralError as exc:
            return exc
        except Exception as exc:  # noqa: BLE001 - e.g. the checkpoint was deleted meanwhile
            log.exception("cannot load the model again")
            return ModelLoadError(f"cannot load the model again: {type(exc).__name__}: {exc}")
        return None

    def unload(self) -> None:
        """Free the weights, the KV and the prefix cache (the scheduler must be idle)."""
        generator = self.generator
        if self.model is None or generator is None:
            return
        generator.close()
        generator.model = generator.cache = None  # type: ignore[assignment]
        if generator.prefix_cache is not None:
            generator.prefix_cache.clear()
        self.model = None
        self.weights_bytes = self.kv_bytes = 0
        self._expires = self.expires_at = None
        gc.collect()  # modules can hold reference cycles; their arrays must go now
        mx.synchronize()
        mx.clear_cache()  # hand the freed buffers back to the system, not to MLX's pool
        unwire()
        self.unloads += 1
        log.info(
            "model unloaded (keep-alive %ss); the next request loads it again", self.keep_alive
        )

    def set_keep_alive(self, seconds: float, *, load: bool = False) -> MistralError | None:
        """Use `seconds` from now on (counted again from the end of the current work)."""
        if self.pinned:
            return None
        self.keep_alive = seconds
        self._expires = self.expires_at = None
        return self.ensure_loaded() if load and seconds > 0 else None

    def busy(self) -> None:
        """A step ran: the keep-alive counts from the end of the work; note the KV in use."""
        self._expires = self.expires_at = None
        self._worked = True
        if self.generator is not None:
            self.kv_bytes = self.generator.kv_bytes_in_use

    def idle(self) -> None:
        """No request runs or waits: start the keep-alive clock; unload when it runs out."""
        if self._worked:
            self._worked = False
            if self.generator is not None and self.model is not None:
                # Drafts waited for the forward's cost: time it now, between requests.
                self.generator.speculation.measure_if_wanted()
            # The finished requests' KV and activations sit in MLX's buffer pool, which would
            # keep a long context's gigabytes from the rest of the Mac until the next unload.
            mx.clear_cache()
        if self.model is None or self.pinned:
            return
        now = time.monotonic()
        if self._expires is None:
            self.kv_bytes = 0
            self._expires = now + self.keep_alive
            finite = math.isfinite(self.keep_alive)
            self.expires_at = time.time() + self.keep_alive if finite else None
        if now >= self._expires:
            self.unload()

    def idle_wait(self) -> float:
        """How long the idle engine may block: until the unload is due, at most half a second."""
        if self._expires is None:
            return 0.5
        return max(0.0, min(0.5, self._expires - time.monotonic()))

    @property
    def unloads_at(self) -> float | None:
        """When the weights will be freed (a time.time()), counting from now while requests
        run; None when unloaded or never."""
        if self.model is None or not math.isfinite(self.keep_alive):
            return None
        return self.expires_at if self.expires_at is not None else time.time() + self.keep_alive

    def memory_usage(self) -> dict[str, int | None]:
        """Bytes in use: weights, the running batch's KV, the prefix cache, their total; and
        the cap (None without one)."""
        cache = None if self.generator is None else self.generator.prefix_cache
        prefix = 0 if cache is None else cache.nbytes
        return {
            "weights_bytes": self.weights_bytes,
            "kv_bytes": self.kv_bytes,
            "prefix_cache_bytes": prefix,
            "total_bytes": self.weights_bytes + self.kv_bytes + prefix,
            "limit_bytes": self.config.max_memory_bytes,
        }
