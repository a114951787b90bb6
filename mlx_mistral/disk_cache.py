"""Prompt KV on disk, so a long system prompt is not prefilled again after a restart.

Each entry is one safetensors file: the KV of every layer for a token prefix, with the token ids
and the model's identity in the file's header. Files live in a folder of their own per model
identity (a hash of config.json and the weights' content, see `model_identity`, plus the KV
format), inside one folder the cache owns (see `disk_cache_files`: it deletes nothing else).
No file is trusted: its header must name this identity, its tensors must be exactly the model's
KV layout (names, dtypes, every dimension), its data must match its checksum and be finite and
not all zero, and its token ids must be the prompt's. Any failure is a miss: the file is logged
once and removed, and the request is prefilled as a cold one.

Writes run on a writer thread (a prompt of 4,000 tokens on v0.2 is 512 MiB of float16 KV), so
the engine only hands over evaluated arrays (MLX's streams are per thread: a lazy array cannot be
evaluated off the thread that made it). A file is written 0600 under a temporary name of this
process's own and renamed, so a crash leaves no torn entry and two servers sharing the folder
never write into one file; a failed write (a full disk) is removed and writing backs off. The
folder is kept under a byte cap, least recently used (file mtime, touched on each hit) first.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import logging
import os
import queue
import sys
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .cache import QuantizedKVCache
from .checkpoint_files import INDEX_FILE, safetensors_files
from .disk_cache_files import (
    SUFFIX,
    WriteBackoff,
    all_entries,
    claim_cache_dir,
    create_private_file,
    entry_files,
    hash_weights,
    make_model_dir,
    open_regular_file,
    parse_header,
    remove_stale_temp_files,
    temp_name,
)
from .prefix_cache import KV, LayerKV, common_prefix_length

if TYPE_CHECKING:
    from .engine import Engine
    from .tokenizer import Tokenizer

log = logging.getLogger("mlx_mistral.disk_cache")

FORMAT = "mlx-mistral-prompt-cache/1"
DEFAULT_DISK_BYTES = 10 * 2**30
MAX_PENDING_WRITES = 2  # beyond this the engine outruns the disk: later prefixes are skipped


def default_cache_dir() -> Path:
    """Where prompt caches go by default: the user's cache directory (XDG on Linux)."""
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "mlx-mistral" / "prompt-cache"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mlx-mistral" / "prompt-cache"


def model_identity(model_dir: str | os.PathLike[str]) -> str:
    """A hash naming one checkpoint by its content: config.json, the index, and each weight
    file's name, size, header and a sample of every tensor's bytes (`hash_weights`). Two
    fine-tunes of one base model (same config, sizes and, after `cp -p`, times) differ."""
    root = Path(model_dir)
    digest = hashlib.sha256()
    for name in ("config.json", INDEX_FILE):
        if (root / name).is_file():
            digest.update(name.encode() + b"\0" + (root / name).read_bytes())
    for path in safetensors_files(root):
        digest.update(f"{path.name}\0{path.stat().st_size}\n".encode())
        hash_weights(digest, path)
    return digest.hexdigest()


@dataclass(frozen=True)
class DiskCacheSettings:
    """Where and how much: `model_identity` from `model_identity()`; prefixes shorter than
    `min_tokens` are cheaper to prefill than to read back."""

    directory: Path
    model_identity: str
    max_bytes: int = DEFAULT_DISK_BYTES
    min_tokens: int = 256
    write_retry_seconds: float = 60.0  # after a failed write (e.g. a full disk)
    # The checkpoint: its identity is computed again when the model is loaded again after an
    # idle unload, since its weights may have changed meanwhile.
    model_path: Path | None = None


@dataclass(frozen=True)
class KVLayout:
    """What the model's KV is: every file's tensors are checked against it before use."""

    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: mx.Dtype
    kv_bits: int | None = None  # quantized as (packed uint32, scales, biases) per QuantizedKVCache

    @property
    def kv_format(self) -> str:
        """Part of the identity: a float16 cache must not load into a float32 or 8-bit one."""
        return f"{self.dtype}/kv_bits={self.kv_bits}"

    def expected(self, tokens: int) -> dict[str, tuple[mx.Dtype, tuple[int, ...]]]:
        """Every tensor a file holding `tokens` positions must have: name -> (dtype, shape)."""
        rows = (1, self.kv_heads, tokens)
        if self.kv_bits is None:
            parts = {"": (self.dtype, (*rows, self.head_dim))}
        else:
            groups = self.head_dim // QuantizedKVCache.group_size
            packed = (mx.uint32, (*rows, self.head_dim * self.kv_bits // 32))
            parts = {".0": packed, ".1": (self.dtype, (*rows, groups))}
            parts[".2"] = parts[".1"]
        return {
            f"{i}.{name}{suffix}": part
            for i in range(self.num_layers)
            for name in ("keys", "values")
            for suffix, part in parts.items()
        }

    def check(self, tokens: int, found: dict[str, tuple[str, tuple[int, ...]]]) -> None:
        """Raise ValueError unless `found` (name -> (dtype name, shape)) is exactly the tensors
        of `tokens` positions (dtype names as MLX or safetensors spell them)."""
        expected = self.expected(tokens)
        if set(found) != set(expected):
            extra = sorted(set(found) ^ set(expected))[:3]
            raise ValueError(f"its tensors are not this model's KV (differing: {extra})")
        for name, (dtype, shape) in expected.items():
            short = str(dtype).removeprefix("mlx.core.")
            names = {str(dtype), short, _SAFETENSORS_DTYPES[dtype]}
            if found[name][0] not in names or tuple(found[name][1]) != shape:
                raise ValueError(
                    f"{name} is {found[name][0]} {list(found[name][1])} where this model's KV "
                    f"is {short} {list(shape)}"
                )


_SAFETENSORS_DTYPES = {mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16", mx.uint32: "U32"}


# (unsigned view, all bits but the sign, exponent all ones): a value whose bits without the sign
# reach the last is infinite or NaN. On bits, since MLX's float16 on an x86 CPU is ~30x slower.
_FLOAT_BITS = {
    mx.float16: (np.uint16, 0x7FFF, 0x7C00),
    mx.bfloat16: (np.uint16, 0x7FFF, 0x7F80),
    mx.float32: (np.uint32, 0x7FFFFFFF, 0x7F800000),
}


def _check_values(tensors: dict[str, mx.array]) -> None:
    """Raise ValueError when a float tensor (evaluated, contiguous) holds NaN or infinity (it
    would poison every answer that attends to it) or only zeros (no model's keys, values or
    scales are)."""
    for name, a in tensors.items():
        if a.dtype in _FLOAT_BITS:
            unsigned, magnitude, exponent = _FLOAT_BITS[a.dtype]
            largest = int(np.bitwise_and(np.frombuffer(memoryview(a), unsigned), magnitude).max())
            if largest >= exponent:
                raise ValueError(f"{name} holds values that are not finite")
            if largest == 0:
                raise ValueError(f"{name} holds only zeros")


@dataclass
class _Entry:
    path: Path
    ids: np.ndarray  # int64


def _flatten(layers: list[LayerKV]) -> dict[str, mx.array]:
    tensors = {}
    for i, pair in enumerate(layers):
        for name, part in zip(("keys", "values"), pair):
            if isinstance(part, tuple):
                tensors.update({f"{i}.{name}.{j}": a for j, a in enumerate(part)})
            else:
                tensors[f"{i}.{name}"] = part
    return tensors


def _unflatten(tensors: dict[str, mx.array], num_layers: int) -> list[LayerKV]:
    def part(i: int, name: str) -> KV:
        if f"{i}.{name}" in tensors:
            return tensors[f"{i}.{name}"]
        parts = []
        while f"{i}.{name}.{len(parts)}" in tensors:
            parts.append(tensors[f"{i}.{name}.{len(parts)}"])
        if not parts:
            raise ValueError(f"no {name} for layer {i}")
        return tuple(parts)

    layers = [(part(i, "keys"), part(i, "values")) for i in range(num_layers)]
    if len(tensors) != len(_flatten(layers)):
        raise ValueError(f"{len(tensors)} tensors where {num_layers} layers have fewer")
    return layers


def checksum(tensors: dict[str, mx.array]) -> str:
    """CRC-32 of the tensors' bytes in name order (evaluated, contiguous arrays): catches a
    file whose data was damaged while its header still reads well."""
    crc = 0
    for name in sorted(tensors):
        crc = zlib.crc32(name.encode(), crc)
        crc = zlib.crc32(memoryview(tensors[name]).cast("B"), crc)
    return f"{crc:08x}"


def read_header(path: Path) -> tuple[dict[str, str], dict[str, dict], int]:
    """A cache file's metadata and its tensors' entries, checked against its size.

    Raises:
        OSError, ValueError: not a regular file, or not a well-formed safetensors file.
    """
    with open_regular_file(path) as f:
        meta, tensors, size = parse_header(f)
        actual = os.fstat(f.fileno()).st_size
    if actual != size:
        raise ValueError(f"{actual} bytes where its header says {size}")
    return meta, tensors


class DiskPrefixCache:
    """The on-disk tier under the in-memory `PrefixCache`: `lookup` on the engine thread,
    `store` queues a write for the writer thread.

    Args:
        settings: directory, byte cap, model identity.
        layout: the model's KV (layers, heads, head size, dtype, quantization); part of the
            identity, and every file's tensors must match it.
    """

    def __init__(self, settings: DiskCacheSettings, layout: KVLayout):
        self.layout = layout
        self.root = Path(settings.directory)
        claim_cache_dir(self.root)
        self._lock = threading.Lock()  # the index: read on the engine thread, grown by the writer
        self._index: dict[str, _Entry] = {}
        self._use_identity(settings)
        self._backoff = WriteBackoff(self.root, settings.write_retry_seconds)
        self._writes: queue.Queue = queue.Queue()
        self._writer = threading.Thread(
            target=self._write_loop, name="prompt-cache-writer", daemon=True
        )
        self._writer.start()

    def _use_identity(self, settings: DiskCacheSettings) -> None:
        self.settings = settings
        self.identity = hashlib.sha256(
            f"{settings.model_identity}\0{self.layout.kv_format}".encode()
        ).hexdigest()
        self.dir = make_model_dir(self.root, self.identity[:24])
        self._scan()

    def follow_model(self) -> None:
        """After the model was loaded again: when its weights changed meanwhile, use the new
        weights' folder, so no answer starts from the old weights' KV."""
        if self.settings.model_path is None:
            return
        identity = model_identity(self.settings.model_path)
        if identity != self.settings.model_identity:
            log.info("prompt cache: the checkpoint changed on disk; using its own entries")
            self.flush()  # the old weights' queued KV goes to the old folder
            self._use_identity(dataclasses.replace(self.settings, model_identity=identity))

    # -- the index -------------------------------------------------------------------------------
    def _scan(self) -> None:
        remove_stale_temp_files(self.dir)
        index = {}
        for item in sorted(entry_files(self.dir), key=lambda item: item.name):
            path = Path(item.path)
            ids = self._check_header(path)
            if ids is not None:
                index[path.name] = _Entry(path, ids)
        with self._lock:
            self._index = index

    def _check_header(self, path: Path) -> np.ndarray | None:
        """The token ids of a file made for this model, else None (logged, file removed)."""
        try:
            meta, tensors = read_header(path)
            if meta.get("format") != FORMAT:
                raise ValueError("not a prompt-cache file")
            if meta.get("model") != self.identity:
                raise ValueError("made for another model or KV format")
            ids = _token_ids(meta)
            self.layout.check(len(ids), {k: (t["dtype"], t["shape"]) for k, t in tensors.items()})
            return ids
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self._discard(path, exc)
            return None

    def _discard(self, path: Path, reason: object) -> None:
        log.warning("ignoring prompt-cache file %s: %s", path, reason)
        with self._lock:
            self._index.pop(path.name, None)
        path.unlink(missing_ok=True)

    def __len__(self) -> int:
        return len(self._index)

    # -- reading (engine thread) -----------------------------------------------------------------
    def lookup(
        self, prompt: np.ndarray, *, longer_than: int = 0
    ) -> tuple[int, np.ndarray, list[LayerKV]] | None:
        """The longest stored prefix of `prompt` beyond `longer_than` tokens, leaving one token
        to prefill: (its length, the entry's token ids, the entry's whole KV), or None."""
        with self._lock:
            entries = list(self._index.values())
        best, best_len = None, 0
        for entry in entries:
            n = common_prefix_length(entry.ids, prompt)
            if n > best_len:
                best, best_len = entry, n
        best_len = min(best_len, len(prompt) - 1)
        if best is None or best_len <= longer_than or best_len < self.settings.min_tokens:
            return None
        layers = self._load(best)
        return None if layers is None else (best_len, best.ids, layers)

    def _load(self, entry: _Entry) -> list[LayerKV] | None:
        try:
            with open_regular_file(entry.path) as f:  # it may have been swapped since the scan
                tensors, meta = mx.load(f, format="safetensors", return_metadata=True)
                if meta.get("model") != self.identity:
                    raise ValueError("made for another model or KV format")
                if not np.array_equal(_token_ids(meta), entry.ids):
                    raise ValueError("its token ids changed since it was indexed")
                found = {k: (str(a.dtype), a.shape) for k, a in tensors.items()}
                self.layout.check(len(entry.ids), found)  # before reading the data
                mx.eval(tensors)
            layers = _unflatten(tensors, self.layout.num_layers)
            if checksum(tensors) != meta.get("crc32"):
                raise ValueError("its data does not match its checksum")
            _check_values(tensors)
        except Exception as exc:  # noqa: BLE001 - whatever a file does, it is a miss, never a crash
            self._discard(entry.path, exc)
            return None
        with contextlib.suppress(OSError):  # another server may have evicted it meanwhile
            os.utime(entry.path, follow_symlinks=False)  # least recently used goes first
        return layers

    def covers(self, ids: np.ndarray) -> bool:
        """Whether some file already holds the KV of `ids` (as the whole or a prefix of it)."""
        with self._lock:
            entries = list(self._index.values())
        return any(
            len(e.ids) >= len(ids) and common_prefix_length(e.ids, ids) == len(ids) for e in entries
        )

    # -- writing ---------------------------------------------------------------------------------
    def store(self, tokens: np.ndarray, layers: list[LayerKV]) -> bool:
        """Queue a write of `layers` (evaluated arrays: they cross to the writer thread) for
        `tokens`; False when it is too short, already stored, or the writer is behind."""
        if len(tokens) < self.settings.min_tokens or self.covers(tokens):
            return False
        if not self._backoff.allows(_nbytes(layers)):
            return False
        if self._writes.qsize() >= MAX_PENDING_WRITES:
            log.info(
                "prompt cache: the disk writer is behind; not storing a %d-token prefix",
                len(tokens),
            )
            return False
        self._writes.put((np.asarray(tokens, dtype=np.int64), layers))
        return True

    def _write_loop(self) -> None:
        while True:
            item = self._writes.get()
            try:
                if item is None:
                    return
                self._write(*item)
                self._backoff.succeeded()
            except Exception as exc:  # noqa: BLE001 - a full disk must not take the server down
                self._backoff.failed(_nbytes(item[1]), exc)
            finally:
                self._writes.task_done()

    def _write(self, ids: np.ndarray, layers: list[LayerKV]) -> None:
        if self.covers(ids):
            return
        key = hashlib.sha256(ids.astype("<i4").tobytes()).hexdigest()[:32]
        path = self.dir / f"{len(ids)}-{key}{SUFFIX}"
        temp = self.dir / temp_name(path.name)
        tensors = _flatten(layers)
        metadata = {
            "crc32": checksum(tensors),
            "format": FORMAT,
            "model": self.identity,
            "tokens": base64.b64encode(ids.astype("<i4").tobytes()).decode(),
        }
        try:
            create_private_file(temp)
            mx.save_safetensors(str(temp), tensors, metadata=metadata)
            if temp.stat().st_size > self.settings.max_bytes:
                temp.unlink()
                return
            os.replace(temp, path)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        with self._lock:
            # Entries that are prefixes of the new one are redundant now.
            for name, entry in list(self._index.items()):
                if len(entry.ids) < len(ids) and np.array_equal(entry.ids, ids[: len(entry.ids)]):
                    del self._index[name]
                    entry.path.unlink(missing_ok=True)
            self._index[path.name] = _Entry(path, ids)
        self._evict(keep=path)

    def _evict(self, *, keep: Path) -> None:
        """Remove the least recently used entries (of every model) until under the byte cap:
        only the cache's own names, regular files, never through a symlink; never `keep`, the
        entry just written (a coarse file clock can give it an older entry's time)."""
        files = list(all_entries(self.root))
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if total <= self.settings.max_bytes:
                return
            if path == keep:
                continue
            if path.parent == self.dir:
                with self._lock:
                    self._index.pop(path.name, None)
            path.unlink(missing_ok=True)
            total -= size

    def flush(self) -> None:
        """Wait until every queued write is on disk."""
        self._writes.join()

    def close(self) -> None:
        """Finish the queued writes and stop the writer thread."""
        if self._writer.is_alive():
            self._writes.put(None)
            self._writer.join()


def _nbytes(layers: list[LayerKV]) -> int:
    return sum(a.nbytes for _, a in tree_flatten(layers))


def _token_ids(meta: dict[str, str]) -> np.ndarray:
    ids = np.frombuffer(base64.b64decode(meta["tokens"], validate=True), dtype="<i4")
    if len(ids) == 0 or ids.min() < 0:
        raise ValueError("its token ids are not a prompt's")
    return ids.astype(np.int64)


def system_prompt_prefix(tokenizer: Tokenizer, system: str) -> list[int]:
    """The prompt ids every chat with this system prompt starts with: `<s>[INST] {system}` and
    the blank line before the first user text (see `mlx_mistral.chat`), found as what two chats
    with different user texts share, so it is exactly what real requests' prompts begin with."""
    a, b = (
        tokenizer.encode_chat(
            [{"role": "system", "content": system}, {"role": "user", "content": u}]
        )
        for u in ("A", "Z")
    )
    return a[: common_prefix_length(np.asarray(a), np.asarray(b))]


def warm_system_prompt(engine: Engine, system: str) -> int:
    """Prefill a system prompt so that the first request using it starts with its KV (from
    the disk cache when an earlier run stored it); returns the prefix's length in tokens."""
    from .sampling.params import SamplingParams

    ids = system_prompt_prefix(engine.tokenizer, system)
    events = list(engine.submit(ids, SamplingParams(temperature=0, max_tokens=1)))
    cached = events[-1].cached_tokens if events else 0
    log.info("warm prompt: %d tokens prefilled, %d of them from the prompt cache", len(ids), cached)
    return len(ids)
