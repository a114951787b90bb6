"""The output directory: what `--force` may replace, the temporaries beside it, the final swap.

A conversion writes into a hidden sibling `.OUT.tmp-PID-HEX` and renames it to OUT when it is
complete, so OUT is never half-written. What keeps that from costing the user data or disk:

- `--force` replaces OUT only when it holds nothing but what a conversion writes (config, MLX
  weights, index, tokenizer and side files), so a mistyped `--out` cannot delete a thesis. The
  check runs before converting and again just before the swap.
- A temporary whose process no longer exists (SIGKILL, a crash, power loss) is removed by the
  next conversion to the same OUT; a live process's temporary is left alone. A PID in another
  PID namespace or on another machine sharing the disk looks dead: such a conversion would fail
  at its final rename, losing its own work but no user data.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import struct
import sys
from collections.abc import Iterable
from pathlib import Path

from mlx_mistral.errors import ConversionError

from .writer import INDEX_FILE, METADATA

_SHARD_NAME = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors")
_MAX_HEADER_BYTES = 100 * 2**20


def sibling(out: Path, tag: str) -> Path:
    """A fresh hidden name beside `out` (same filesystem, so the final rename is atomic)."""
    return out.parent / f".{out.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}"


def make_parents(directory: Path) -> Path | None:
    """Create `directory` and its missing ancestors; return the topmost one created, if any."""
    top = None
    for parent in [directory, *directory.parents]:
        if parent.exists():
            break
        top = parent
    directory.mkdir(parents=True, exist_ok=True)
    return top


def check_replaceable(out: Path, side_files: Iterable[str]) -> None:
    """Refuse unless the existing `out` is an earlier conversion's output (or empty).

    Args:
        out: an existing path.
        side_files: the names a conversion writes besides weights and index (config, tokenizer).

    Raises:
        ConversionError: `out` is not a directory, or holds anything a conversion does not write;
            the message names the first such file.
    """
    if out.is_symlink() or not out.is_dir():
        raise ConversionError(f"output {out} exists and is not a directory; not replacing it")
    allowed = {"config.json", INDEX_FILE, *side_files}
    names = sorted(p.name for p in out.iterdir())
    for name in names:
        path = out / name
        if path.is_symlink() or not path.is_file():
            foreign = _first_file(path)
        elif _SHARD_NAME.fullmatch(name):
            foreign = None if _written_by_mlx(path) else path
        else:
            foreign = None if name in allowed else path
        if foreign is not None:
            raise ConversionError(
                f"output {out} holds {foreign.relative_to(out)}, which no conversion writes; "
                "--force replaces only an earlier conversion's output"
            )
    if names and "config.json" not in names:
        raise ConversionError(
            f"output {out} has no config.json, so it is not an earlier conversion"
        )


def _first_file(path: Path) -> Path:
    """The first file under a foreign directory (what the user would miss), else `path` itself."""
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            dirs.sort()
            if files:
                return Path(root) / min(files)
    return path


def _written_by_mlx(path: Path) -> bool:
    """True when the safetensors header carries the MLX stamp our writer (and mlx-lm) puts there.

    A PyTorch checkpoint saved by transformers has the same file names; this tells it apart.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                return False
            (length,) = struct.unpack("<Q", head)
            if length > _MAX_HEADER_BYTES:
                return False
            header = json.loads(f.read(length))
    except (OSError, ValueError):
        return False
    return isinstance(header, dict) and header.get("__metadata__") == METADATA


def remove_checkpoint(directory: Path, side_files: Iterable[str]) -> bool:
    """Delete a checked earlier output file by file; keep anything that appeared since.

    Returns:
        True when the directory is gone.
    """
    allowed = {"config.json", INDEX_FILE, *side_files}
    try:
        for path in directory.iterdir():
            if path.is_file() and not path.is_symlink():
                if path.name in allowed or _SHARD_NAME.fullmatch(path.name):
                    path.unlink()
        directory.rmdir()
    except OSError:
        return False
    return True


def replace(tmp: Path, out: Path, *, force: bool, side_files: Iterable[str]) -> None:
    """Move the finished `tmp` to `out`; an old `out` goes only once the new one is in place.

    Raises:
        ConversionError: `out` appeared while converting (without `force`), or now holds
            something a conversion does not write.
    """
    if not (out.exists() or out.is_symlink()):
        os.rename(tmp, out)
        return
    if not force:
        raise ConversionError(f"output {out} appeared while converting; not replacing it")
    check_replaceable(out, side_files)
    old = sibling(out, "old")
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    if not remove_checkpoint(old, side_files):
        print(f"note: could not remove all of the earlier output, now {old}", file=sys.stderr)


def remove_stale(out: Path, side_files: Iterable[str]) -> None:
    """Remove what dead conversions to `out` left beside it; say so on stderr.

    A `tmp` directory is a dead process's unfinished output. An `old` one is an earlier output
    it was replacing: removed only when `out` exists, since otherwise it is the only copy.
    """
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(tmp|old)-(\d+)-[0-9a-f]{{8}}")
    if not out.parent.is_dir():
        return
    for path in sorted(out.parent.iterdir()):
        match = pattern.fullmatch(path.name)
        if match is None or path.is_symlink() or not path.is_dir():
            continue
        kind, pid = match.group(1), int(match.group(2))
        if _alive(pid) or (kind == "old" and not out.exists()):
            continue
        if kind == "tmp":
            shutil.rmtree(path, ignore_errors=True)
        else:
            remove_checkpoint(path, side_files)
        if not path.exists():
            print(f"note: removed {path}, left by process {pid}, which has exited", file=sys.stderr)


def _alive(pid: int) -> bool:
    """Whether a process with this PID exists (a zombie counts: its parent may still act)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # someone else's process, or a number we cannot check: leave it alone
    return True
