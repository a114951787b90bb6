"""The disk prompt cache's folder: it deletes only files it wrote, follows no symlink, refuses a
folder it does not own with one line, adopts the layout it wrote before, shares a folder with
another server, and keeps its files private."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
import time

import pytest

from mlx_mistral.batch import BatchGenerator
from mlx_mistral.disk_cache_files import MARKER, CacheDirError
from mlx_mistral.prefix_cache import PrefixCache
from tests.test_disk_cache import chat, disk_cache, fill, run

ENTRY = "300-" + "ab" * 16 + ".safetensors"
LONG_AGO = time.time() - 10 * 86400


def fake_model(folder):
    """A model's files as users keep them: what eviction must never touch."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"weights" * 1000)
    for path in folder.iterdir():
        os.utime(path, (LONG_AGO, LONG_AGO))  # older than any entry: first in line to evict
    return folder


def test_eviction_deletes_only_the_entries_it_wrote(tiny_model, tmp_path):
    model, tokenizer = tiny_model
    root = tmp_path / "cache"
    first = fill(tiny_model, root)
    (model_dir,) = [p for p in root.iterdir() if p.is_dir()]
    (entry,) = model_dir.glob("*.safetensors")
    # Inside the cache's own folder: a model, a symlinked folder of weights, an entry-named
    # symlink to a file outside, and junk in the model folder; all older than the entry.
    outside = fake_model(tmp_path / "outside")
    fake_model(root / "models" / "mistral")
    (root / ("cd" * 12)).symlink_to(outside, target_is_directory=True)
    (outside / ENTRY).write_bytes(b"x" * 100)
    (model_dir / ("7-" + "ef" * 16 + ".safetensors")).symlink_to(outside / "model.safetensors")
    (model_dir / "weights.safetensors").write_bytes(b"w" * 100)
    os.utime(entry, (LONG_AGO + 1, LONG_AGO + 1))
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p != entry}
    # A cap of about one entry: the next write must evict the old entry, and only it.
    disk = disk_cache(root, max_bytes=int(entry.stat().st_size * 1.5))
    generator = BatchGenerator(model, tokenizer, prefix_cache=PrefixCache(0, disk=disk))
    run(generator, chat(tokenizer, "Something else entirely, please.")[:-3] + [1, 2, 3])
    disk.flush()
    disk.close()
    assert not entry.exists() and len(list(model_dir.glob("[0-9]*-*.safetensors"))) == 2
    for path, data in before.items():
        assert path.read_bytes() == data, f"{path} was touched"
    assert len(first) > 256


def test_a_folder_holding_other_files_is_refused(tiny_model, tmp_path):
    fake_model(tmp_path / "models")
    with pytest.raises(CacheDirError, match="holds files the cache did not write"):
        disk_cache(tmp_path / "models")
    with pytest.raises(CacheDirError, match="not a folder"):
        disk_cache(tmp_path / "models" / "config.json")
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]


@pytest.mark.slow
def test_the_server_refuses_a_folder_it_does_not_own_in_one_line(tiny_hf_checkpoint, tmp_path):
    for folder in (tiny_hf_checkpoint, fake_model(tmp_path / "models")):
        before = sorted(p.name for p in folder.iterdir())
        argv = [sys.executable, "-m", "mlx_mistral.server", "--model", str(tiny_hf_checkpoint)]
        argv += ["--port", "0", "--prompt-cache-dir", str(folder)]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert done.returncode == 1
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
        assert lines[0].startswith("mlx-mistral serve: error: prompt cache folder")
        assert str(folder) in lines[0] and "new or empty folder" in lines[0]
        assert sorted(p.name for p in folder.iterdir()) == before


def test_the_layout_written_before_the_marker_is_adopted(tiny_model, tmp_path):
    root = tmp_path / "cache"
    fill(tiny_model, root)
    (root / MARKER).unlink()  # as the cache wrote it before it marked its folder
    (model_dir,) = [p for p in root.iterdir() if p.is_dir()]
    (entry,) = model_dir.glob("*.safetensors")
    os.chmod(root, 0o755)
    disk = disk_cache(root)
    assert len(disk) == 1 and entry.exists() and (root / MARKER).is_file()
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    disk.close()


def test_two_caches_share_a_folder(tiny_model, tmp_path):
    model, tokenizer = tiny_model
    root = tmp_path / "cache"
    fill(tiny_model, root)
    (model_dir,) = [p for p in root.iterdir() if p.is_dir()]
    # Another server's write in progress, and one a crash left long ago.
    live = model_dir / (".tmp-999999-0a1b2c3d-" + ENTRY)
    stale = model_dir / (".tmp-999998-0a1b2c3d-" + ENTRY)
    for path in (live, stale):
        path.write_bytes(b"partial")
    os.utime(stale, (LONG_AGO, LONG_AGO))
    a, b = disk_cache(root), disk_cache(root)
    assert live.exists() and not stale.exists()
    # Both write, the same entry and different ones: every entry stays whole.
    for disk, users in ((a, ["Paris?"]), (b, ["Paris?", "Rome?"])):
        generator = BatchGenerator(model, tokenizer, prefix_cache=PrefixCache(0, disk=disk))
        for user in users:
            run(generator, chat(tokenizer, user))
    for disk in (a, b):
        disk.close()
    third = disk_cache(root)
    assert len(third) == 3
    for entry in list(third._index.values()):
        assert third._load(entry) is not None
    assert live.exists()
    third.close()


def test_files_are_private(tiny_model, tmp_path):
    root = tmp_path / "cache"
    fill(tiny_model, root)
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    for path in root.rglob("*"):
        expected = 0o700 if path.is_dir() else 0o600
        assert stat.S_IMODE(path.stat().st_mode) == expected, path


def test_a_failed_write_leaves_nothing_and_backs_off(tiny_model, tmp_path, caplog):
    resource = pytest.importorskip("resource")
    model, tokenizer = tiny_model
    root = tmp_path / "cache"
    disk = disk_cache(root, write_retry_seconds=0.5)
    generator = BatchGenerator(model, tokenizer, prefix_cache=PrefixCache(0, disk=disk))
    # A file-size limit far below one entry (~220 KB) fails every write as a full disk would
    # (Python ignores SIGXFSZ, so the write gets EFBIG); only for this process, root or not.
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    with caplog.at_level(logging.INFO, "mlx_mistral.disk_cache"):
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
        try:
            run(generator, chat(tokenizer, "First?"))
            disk.flush()
            run(generator, chat(tokenizer, "Second, while writes are paused?"))
            disk.flush()
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        failures = [r for r in caplog.records if "cannot write" in r.getMessage()]
        assert len(failures) == 1 and failures[0].exc_info is None
        assert sorted(p.name for p in disk.dir.iterdir()) == []  # no temporary file left
        time.sleep(0.6)  # the back-off is over and the disk has room: writes resume
        run(generator, chat(tokenizer, "Third?"))
        disk.flush()
    assert len(list(disk.dir.glob("*.safetensors"))) == 1 and len(disk) == 1
    assert "writing to" in caplog.text and "again" in caplog.text
    disk.close()


def test_an_entry_swapped_for_a_symlink_is_not_followed(tiny_model, tmp_path):
    model, tokenizer = tiny_model
    prompt = fill(tiny_model, tmp_path / "cache")
    (entry,) = (tmp_path / "cache").glob("*/*.safetensors")
    disk = disk_cache(tmp_path / "cache")  # indexed while it was a regular file
    outside = tmp_path / "elsewhere.safetensors"
    entry.rename(outside)
    entry.symlink_to(outside)
    before = outside.stat()
    generator = BatchGenerator(model, tokenizer, prefix_cache=PrefixCache(0, disk=disk))
    assert run(generator, prompt)[1] == 0
    disk.close()
    after = outside.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
