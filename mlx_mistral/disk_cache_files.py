"""The disk prompt cache's folder: what it owns, what it may delete, how it reads a header.

The cache deletes files (least recently used first, and what a crash left), so it must never
delete anything it did not write. It owns one folder, marked by `MARKER` (a format version);
it refuses a folder that is not marked and holds anything else, adopts an unmarked folder laid
out as the cache has always laid it out, and inside its folder touches only names of its own
scheme (`MODEL_DIR_NAME`, `ENTRY_NAME`, `TEMP_NAME`) that are regular files or real folders:
no symlink is ever followed, no FIFO or device opened.

Pure Python: the server checks the folder before it loads the model.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import MistralError

log = logging.getLogger("mlx_mistral.disk_cache")

MARKER = "mlx-mistral-prompt-cache.json"
MARKER_CONTENT = {"format": "mlx-mistral-prompt-cache", "layout": 2}
SUFFIX = ".safetensors"
MODEL_DIR_NAME = re.compile(r"[0-9a-f]{24}")
ENTRY_NAME = re.compile(r"[0-9]{1,9}-[0-9a-f]{32}\.safetensors")
# `.tmp-<pid>-<random>-<entry>` now, `.<pid>-<n>-<entry>` before the marker existed.
TEMP_NAME = re.compile(r"\.(tmp-)?[0-9]+-[0-9a-z]+-[0-9]{1,9}-[0-9a-f]{32}\.safetensors")
MARKER_TEMP_NAME = re.compile(r"\.tmp-[0-9]+-[0-9a-f]+-" + re.escape(MARKER))
# Another process's temporary file is its write in progress until it has not changed for this
# long (a 512 MiB entry takes seconds to write).
STALE_TEMP_SECONDS = 3600.0
MAX_HEADER_BYTES = 16 * 2**20  # a 32k-token prompt's ids take ~175 KB of header
PRIVATE_DIR, PRIVATE_FILE = 0o700, 0o600  # the files hold users' prompt token ids


class CacheDirError(MistralError):
    """A prompt-cache folder the cache cannot own (it holds files the cache did not write)."""

    code = "prompt_cache_dir"


def claim_cache_dir(root: Path) -> None:
    """Make `root` the cache's own folder: create and mark it, adopt a folder an earlier version
    of the cache wrote, or refuse.

    Raises:
        CacheDirError: `root` is not a folder, holds files the cache did not write, or is marked
            by another version of the cache.
    """
    try:
        if not root.exists():
            root.parent.mkdir(parents=True, exist_ok=True)
            root.mkdir(mode=PRIVATE_DIR, exist_ok=True)
        if not root.is_dir():
            raise CacheDirError(f"prompt cache folder {root} is not a folder: {_ADVICE}")
        names = os.listdir(root)
        if MARKER in names:
            _check_marker(root / MARKER)
        else:
            strays = sorted(
                n
                for n in names
                if not (MARKER_TEMP_NAME.fullmatch(n) or _is_earlier_model_dir(root / n))
            )
            if strays:
                shown = ", ".join(strays[:3]) + (", ..." if len(strays) > 3 else "")
                raise CacheDirError(
                    f"prompt cache folder {root} holds files the cache did not write ({shown}); "
                    f"it deletes old files in its folder, so it needs one of its own: {_ADVICE}"
                )
            _write_marker(root)
        _make_private(root)
    except OSError as exc:
        raise CacheDirError(
            f"prompt cache folder {root}: {exc.strerror or exc}: {_ADVICE}"
        ) from None


_ADVICE = "give --prompt-cache-dir a new or empty folder, or 'off'"


def _check_marker(path: Path) -> None:
    try:
        content = json.loads(read_small_file(path, 4096))
    except (OSError, ValueError) as exc:
        raise CacheDirError(f"{path} is not the prompt cache's marker ({exc}): {_ADVICE}") from None
    if content != MARKER_CONTENT:
        raise CacheDirError(
            f"{path.parent} was written by another version of the prompt cache ({content}): "
            f"{_ADVICE}"
        )


def _write_marker(root: Path) -> None:
    temp = root / f".tmp-{os.getpid()}-{secrets.token_hex(4)}-{MARKER}"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, PRIVATE_FILE)
    with os.fdopen(fd, "w") as f:
        json.dump(MARKER_CONTENT, f)
    os.replace(temp, root / MARKER)  # two servers adopting at once write the same marker


def _is_earlier_model_dir(path: Path) -> bool:
    """A folder of the layout the cache wrote before it marked its folder: a real folder named
    by a model identity, holding only entries and temporary files."""
    if not MODEL_DIR_NAME.fullmatch(path.name) or not stat.S_ISDIR(path.lstat().st_mode):
        return False
    return all(ENTRY_NAME.fullmatch(n) or TEMP_NAME.fullmatch(n) for n in os.listdir(path))


def _make_private(path: Path) -> None:
    try:
        if stat.S_IMODE(path.stat().st_mode) != PRIVATE_DIR:
            path.chmod(PRIVATE_DIR)
    except OSError as exc:  # e.g. a folder another user owns: still usable, say so
        log.warning("prompt cache: cannot make %s private (%s)", path, exc.strerror or exc)


def make_model_dir(root: Path, name: str) -> Path:
    """The folder of one model identity inside the cache's folder (0700, never a symlink).

    Raises:
        CacheDirError: the name is taken by something that is not a real folder.
    """
    path = root / name
    try:
        path.mkdir(mode=PRIVATE_DIR)
    except FileExistsError:
        if not stat.S_ISDIR(path.lstat().st_mode):
            raise CacheDirError(
                f"{path} is not a folder the prompt cache made (a symlink or a file): "
                "remove it, or give --prompt-cache-dir another folder"
            ) from None
    _make_private(path)
    return path


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)


def read_small_file(path: Path, limit: int) -> bytes:
    """A regular file's bytes, refused when it is larger than `limit`, a symlink, a FIFO or a
    device (opened without blocking and without following links, then checked).

    Raises:
        OSError, ValueError: unreadable, not a regular file, or too large.
    """
    fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("not a regular file")
        if info.st_size > limit:
            raise ValueError(f"{info.st_size} bytes, more than {limit}")
        return f.read(limit)


def open_regular_file(path: Path):
    """`path` opened for binary reading if it is a regular file (never follows a symlink,
    never blocks on a FIFO).

    Raises:
        OSError, ValueError: unreadable or not a regular file.
    """
    fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _NONBLOCK)
    f = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        f.close()
        raise ValueError("not a regular file")
    return f


def parse_header(f) -> tuple[dict[str, str], dict[str, dict], int]:
    """A safetensors file's metadata, its tensors' entries (dtype, shape, data_offsets) and the
    size the header says the file has; every field type-checked.

    Raises:
        ValueError: not a well-formed safetensors header.
    """
    head = f.read(8)
    if len(head) != 8:
        raise ValueError("shorter than a safetensors header")
    n = int.from_bytes(head, "little")
    if n > MAX_HEADER_BYTES:
        raise ValueError("header length out of range")
    raw = f.read(n)
    if len(raw) != n:
        raise ValueError("truncated header")
    header = json.loads(raw)
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ValueError("__metadata__ is not an object of strings")
    end = 0
    for name, entry in header.items():
        if not _is_tensor_entry(entry):
            raise ValueError(f"tensor {name[:64]!r} has no valid dtype, shape and data_offsets")
        end = max(end, entry["data_offsets"][1])
    return meta, header, 8 + n + end


def _is_tensor_entry(entry: object) -> bool:
    def ints(v: object, count: int | None = None) -> bool:
        return (
            isinstance(v, list)
            and (count is None or len(v) == count)
            and all(type(x) is int and x >= 0 for x in v)
        )

    return (
        isinstance(entry, dict)
        and isinstance(entry.get("dtype"), str)
        and ints(entry.get("shape"))
        and ints(entry.get("data_offsets"), 2)
        and entry["data_offsets"][0] <= entry["data_offsets"][1]
    )


def entry_files(model_dir: Path) -> Iterator[os.DirEntry]:
    """The cache's entries in one model folder: its own names, regular files only; anything
    else there is named in a log line and left alone."""
    for item in _scan(model_dir):
        if ENTRY_NAME.fullmatch(item.name) and item.is_file(follow_symlinks=False):
            yield item
        elif not TEMP_NAME.fullmatch(item.name):
            log.warning("prompt cache: ignoring %s (not a file the cache wrote)", item.path)


def remove_stale_temp_files(model_dir: Path) -> None:
    """Remove temporary files a crashed write left: ours by name, regular, and unchanged for
    `STALE_TEMP_SECONDS` (a younger one may be another server's write in progress)."""
    now = time.time()
    for item in _scan(model_dir):
        if TEMP_NAME.fullmatch(item.name) and item.is_file(follow_symlinks=False):
            try:
                if now - item.stat(follow_symlinks=False).st_mtime > STALE_TEMP_SECONDS:
                    os.unlink(item.path)
            except OSError:
                continue


def all_entries(root: Path) -> Iterator[tuple[int, int, Path]]:
    """(mtime in ns, size, path) of every entry of every model in the cache's folder."""
    for folder in _scan(root):
        if MODEL_DIR_NAME.fullmatch(folder.name) and folder.is_dir(follow_symlinks=False):
            for item in _scan(Path(folder.path)):
                if ENTRY_NAME.fullmatch(item.name) and item.is_file(follow_symlinks=False):
                    try:
                        info = item.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    yield info.st_mtime_ns, info.st_size, Path(item.path)


def _scan(folder: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as items:
            return list(items)
    except OSError:
        return []


def create_private_file(path: Path) -> None:
    """Create `path` empty and 0600 (never through a symlink, never over an existing file), so
    what is then written to it is private from the first byte."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, PRIVATE_FILE))


def temp_name(entry_name: str) -> str:
    """A temporary name of this process's own for a write of `entry_name`."""
    return f".tmp-{os.getpid()}-{secrets.token_hex(4)}-{entry_name}"


WEIGHT_SAMPLE_BYTES = 4096


def hash_weights(digest, path: Path) -> None:
    """Feed `digest` a safetensors file's header and, of every tensor, the first, middle and last
    `WEIGHT_SAMPLE_BYTES` of its data: a fine-tune changes nearly every value of the tensors it
    trains, so any of them shows, and a 7B checkpoint costs ~2,000 small reads, not 4 GB.

    Raises:
        OSError, ValueError: unreadable, or not a safetensors file.
    """
    with open(path, "rb") as f:  # a hub snapshot's weights are symlinks to its blobs
        meta, tensors, _ = parse_header(f)
        base = f.tell()
        digest.update(json.dumps([meta, tensors], sort_keys=True).encode())
        for name in sorted(tensors, key=lambda n: tensors[n]["data_offsets"]):
            start, end = tensors[name]["data_offsets"]
            size = min(WEIGHT_SAMPLE_BYTES, end - start)
            for offset in sorted({start, (start + end - size) // 2, end - size}):
                f.seek(base + offset)
                digest.update(f.read(size))


class WriteBackoff:
    """What a failed write (a full disk, a file-size limit) changes: one log line, then no write
    for `retry_seconds`, and after that only once the disk has room for twice the entry that
    failed; a write that succeeds again is logged too."""

    def __init__(self, folder: Path, retry_seconds: float):
        self.folder = folder
        self.retry_seconds = retry_seconds
        self.failing = False
        self._until = 0.0  # time.monotonic() before which nothing is written
        self._needed = 0

    def allows(self, nbytes: int) -> bool:
        """Whether to try writing an entry of about `nbytes` now."""
        if not self.failing:
            return True
        now = time.monotonic()
        if now < self._until:
            return False
        try:
            free = shutil.disk_usage(self.folder).free
        except OSError:
            free = 0
        if free < 2 * max(nbytes, self._needed):
            self._until = now + self.retry_seconds
            return False
        return True

    def failed(self, nbytes: int, exc: BaseException) -> None:
        if not self.failing:
            reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0]
            log.warning(
                "prompt cache: cannot write to %s (%s); trying again in %gs once %.0f MiB are free",
                self.folder,
                reason,
                self.retry_seconds,
                2 * nbytes / 2**20,
            )
        self.failing, self._needed = True, nbytes
        self._until = time.monotonic() + self.retry_seconds

    def succeeded(self) -> None:
        if self.failing:
            log.info("prompt cache: writing to %s again", self.folder)
            self.failing = False
