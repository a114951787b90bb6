"""The wheel installs server/ and convert/ inside the package, never at the top level."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_layout(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
    )
    (wheel,) = tmp_path.glob("mlx_mistral-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names}
    assert top_level <= {
        "mlx_mistral",
        wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info",
    }
    assert "mlx_mistral/server/app.py" in names
    assert "mlx_mistral/convert/cli.py" in names
    assert "mlx_mistral/demo_model/config.json" in names
    from mlx_mistral.server.ui import ASSETS  # the page's files: data the wheel must carry

    for name in ("index.html", *ASSETS):
        assert f"mlx_mistral/server/page/{name}" in names, name
    assert not any(n.startswith(("server/", "convert/", "tests/")) for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert (
        "mlx-mistral = mlx_mistral.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    )


def test_console_script_reports_bad_input_without_traceback(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_mistral.cli",
            "generate",
            "--model",
            str(tmp_path / "nope"),
            "--prompt",
            "hi",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "nope" in result.stderr


def test_bad_sampling_flag_is_refused_before_loading_a_model():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_mistral.cli",
            "generate",
            "--prompt",
            "hi",
            "--temperature",
            "5",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "mlx-mistral: error: temperature must be in [0, 2], got 5.0."


@pytest.mark.parametrize(
    "argv, words",
    [
        (["generate"], "the following arguments are required: --prompt"),
        (["serve", "--port", "x"], "invalid int value: 'x'"),
        (["convert"], "required"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_usage_mistakes_are_one_line(argv, words):
    result = subprocess.run(
        [sys.executable, "-m", "mlx_mistral.cli", *argv], capture_output=True, text=True
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert words in result.stderr and result.stderr.startswith("mlx-mistral")


def test_no_large_file_is_tracked():
    """Only the demo model's weights may exceed 1 MB in the repository (a wheel once slipped in)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=False
    ).stdout.split(b"\0")
    if not any(listed):
        pytest.skip("not a git checkout")
    large = [
        name.decode()
        for name in listed
        if name
        and (ROOT / name.decode()).is_file()
        and (ROOT / name.decode()).stat().st_size > 1 << 20
        and not name.decode().startswith("mlx_mistral/demo_model")
    ]
    assert large == []


def test_the_licence_ships():
    assert "Apache License" in (ROOT / "LICENSE").read_text()


def test_text_that_is_not_utf8_is_one_line_not_a_traceback():
    cli = [sys.executable, "-m", "mlx_mistral.cli"]
    for locale in ("C.UTF-8", "C"):
        env = {**os.environ, "LC_ALL": locale, "PYTHONUTF8": "0"}
        result = subprocess.run(
            [*cli, "generate", "--prompt", b"caf\xe9 \xff", "--max-tokens", "2"],
            capture_output=True,
            env=env,
        )
        stderr = result.stderr.decode()
        assert result.returncode == 1 and "Traceback" not in stderr, stderr
        assert (
            stderr
            == "mlx-mistral: error: --prompt is not valid UTF-8 text (byte 0xE9 at character 3)\n"
        )
        result = subprocess.run(
            [*cli, "chat", "--max-tokens", "2"],
            input=b"caf\xe9\nHello!\n",
            capture_output=True,
            env=env,
        )
        stderr = result.stderr.decode()
        assert result.returncode == 0 and "Traceback" not in stderr, stderr
        assert "mlx-mistral: error: the message is not valid UTF-8 text (byte 0xE9" in stderr
        assert result.stdout.count(b">>> ") == 3  # the bad line, the good one, then the end
