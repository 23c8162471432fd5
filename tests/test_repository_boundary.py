"""Nothing the suite, the benchmarks or the scripts read lies outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.repository_boundary import GUARD, REPO_ROOT, RepositoryBoundaryGuard

# Ways a file reaches a sibling of the repository: a relative climb, or a path built from the repo's parent.
_OUTSIDE_PATTERNS = [
    re.compile(r"\.\./shared"),
    re.compile(r"parents\[\d\]\.parent\s*/"),
    re.compile(r"parent\.parent\.parent\s*/"),
    re.compile(r"/work/shared"),
]
_SCANNED = ["tests", "bench", "scripts", ".ci", "Makefile", "docker-compose.yml", "Dockerfile"]
_TEXT_SUFFIXES = {".py", ".sh", ".toml", ".yml", ".yaml", ".md", ""}


def _scanned_files():
    for name in _SCANNED:
        root = REPO_ROOT / name
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            if path.suffix in _TEXT_SUFFIXES and path.name != Path(__file__).name:
                yield path


def test_no_source_refers_to_folders_beside_the_repository():
    offenders = []
    for path in _scanned_files():
        text = path.read_text(errors="replace")
        for pattern in _OUTSIDE_PATTERNS:
            if pattern.search(text):
                offenders.append(f"{path.relative_to(REPO_ROOT)}: {pattern.pattern}")
    assert not offenders, offenders


def test_fixtures_the_suite_needs_are_in_the_repository():
    fixtures = REPO_ROOT / "tests" / "fixtures"
    for name in ("surgenetxl_caformer_s18_keys.json", "surgenetxl_parity_seed0.npz", "README.md"):
        assert (fixtures / name).is_file(), name


def test_guard_records_a_read_beside_the_repository():
    sibling = REPO_ROOT.parent / "shared-does-not-exist" / "fixtures" / "keys.json"
    with pytest.raises(FileNotFoundError):
        sibling.open()
    assert str(sibling) in GUARD.take()  # cleared here, so this test itself passes


def test_guard_ignores_the_repository_and_temporary_files(tmp_path):
    guard = RepositoryBoundaryGuard(REPO_ROOT)
    assert not guard.is_outside(str(REPO_ROOT / "tests" / "fixtures" / "README.md"))
    assert not guard.is_outside(str(tmp_path / "x.txt"))
    assert guard.is_outside(str(REPO_ROOT.parent / "shared" / "fixtures" / "README.md"))


def test_guard_in_a_clone_under_the_temporary_folder(tmp_path, monkeypatch):
    """A clone in /tmp: pytest's and tempfile's folders are temporary; a sibling like /tmp/shared is not."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    clone = tmp_path / "surgenet-assist"
    clone.mkdir()
    guard = RepositoryBoundaryGuard(clone)
    assert guard.temp_in_neighbourhood
    assert guard.is_outside(str(tmp_path / "shared" / "fixtures" / "README.md"))
    assert not guard.is_outside(str(tmp_path / "pytest-of-root" / "pytest-3" / "x.png"))
    assert not guard.is_outside(str(tmp_path / "tmpab12cd34" / "store.db"))
    assert not guard.is_outside(str(clone / "tests" / "fixtures" / "README.md"))
