"""The wheel installs everything under the surgenet_assist namespace, with its data files, and imports
the same way as the editable install."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from the files git knows (a clone's view): a stale ``build/`` folder in the checkout
    would otherwise hide a package missing from pyproject's explicit list."""
    import shutil

    out = tmp_path_factory.mktemp("wheel")
    src = tmp_path_factory.mktemp("source")
    listed = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "--cached", "--others", "--exclude-standard"],
        capture_output=True, text=True, check=True,
    ).stdout.split("\n")  # fmt: skip
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(src),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
        ],
        check=True,
        cwd=out,
    )
    return next(out.glob("surgenet_assist-*.whl"))


def test_wheel_has_only_the_namespace_and_its_data(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"surgenet_assist"}  # no top-level core/backend/... modules
    for required in (
        "surgenet_assist/core/backbone.py",
        "surgenet_assist/backend/app.py",
        "surgenet_assist/napari_plugin/napari.yaml",
        "surgenet_assist/training_loop/nightly.py",
        "surgenet_assist/cli/main.py",
    ):
        assert required in names, required
    assert any(n.startswith("surgenet_assist/core/store/migrations/versions/") for n in names)
    # every package of the source tree ships (the package list is explicit: a new folder is easy to miss)
    root = Path(__file__).resolve().parents[1]
    for top in ("core", "backend", "cli", "training_loop", "napari_plugin"):
        for init in (root / top).rglob("__init__.py"):
            shipped = "surgenet_assist/" + init.relative_to(root).as_posix()
            assert shipped in names, f"{init.parent.relative_to(root)} is not in pyproject's package list"
    assert any(
        n.startswith("surgenet_assist/backend/labeling_configs/") and n.endswith(".xml") for n in names
    )
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "surgenet-assist = surgenet_assist.cli.main:app" in text and "napari.manifest" in text


def test_installed_wheel_imports_like_the_editable_install(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
    )
    code = (
        "import surgenet_assist.core as c, surgenet_assist.backend as b, surgenet_assist.cli.main as m;"
        "from surgenet_assist.core.schema import DEFAULT_SCHEMA;"
        "print(c.__file__); print(DEFAULT_SCHEMA.num_classes)"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.split()
    assert first.startswith(str(target)) and second == "13"
    assert not (target / "core").exists() and not (target / "backend").exists()
