"""A guard that notices when the test process reads a file outside the repository.

A fresh clone has nothing beside it, so a test that reads a sibling folder passes on a developer's machine and
fails everywhere else. Python's audit hooks see every ``open`` and directory listing
in this process; the guard records those that land next to the repository rather than inside it.
Temporary folders, the interpreter's own files (its prefix and every ``site-packages`` on ``sys.path``) and
the user's home (caches, Qt and matplotlib settings) are not the repository's neighbours and are ignored.

A clone may itself sit in the temporary folder (``/tmp/surgenet-assist``): then the temporary folder *is* the
neighbourhood, and only what Python's ``tempfile`` and pytest create there (``tmp*``, ``pytest-of-*``) counts
as temporary, so a read of ``/tmp/shared`` is still caught.
"""

from __future__ import annotations

import fnmatch
import os
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
_WATCHED_EVENTS = {"open", "os.listdir", "os.scandir"}
#: names that ``tempfile`` (``tmpXXXXXXXX``) and pytest (``pytest-of-<user>``) give their temporary folders
TEMPORARY_NAMES = ("tmp*", "pytest-of-*")


class RepositoryBoundaryGuard:
    """Records paths read outside ``repo`` but inside its parent folder (where a shared folder would be)."""

    def __init__(self, repo: Path = REPO_ROOT) -> None:
        self.repo = os.path.realpath(repo)
        self.neighbourhood = os.path.dirname(self.repo)
        temp = os.path.realpath(tempfile.gettempdir())
        site_packages = [p for p in sys.path if os.path.basename(p.rstrip(os.sep)) == "site-packages"]
        allowed = [self.repo, sys.prefix, sys.base_prefix, os.path.expanduser("~"), *site_packages]
        # a clone in the temporary folder itself: only tempfile's and pytest's own folders are temporary
        self.temp_in_neighbourhood = temp == self.neighbourhood
        if not self.temp_in_neighbourhood:
            allowed.append(temp)
        self.allowed = tuple(os.path.realpath(p) for p in allowed)
        self.violations: list[str] = []

    def is_outside(self, path: str) -> bool:
        """True when ``path`` sits beside the repository, not in it nor in an allowed system location."""
        full = os.path.abspath(path)
        if not _within(full, self.neighbourhood):
            return False
        if self.temp_in_neighbourhood and full != self.neighbourhood:
            top = os.path.relpath(full, self.neighbourhood).split(os.sep)[0]
            if any(fnmatch.fnmatch(top, pattern) for pattern in TEMPORARY_NAMES):
                return False
        return not any(_within(full, root) for root in self.allowed)

    def __call__(self, event: str, args: tuple) -> None:
        if event not in _WATCHED_EVENTS or not args:
            return
        path = args[0]
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if isinstance(path, str) and path and self.is_outside(path):
            self.violations.append(path)

    def take(self) -> list[str]:
        """The violations recorded since the last call, clearing them."""
        found, self.violations = self.violations, []
        return found


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


GUARD = RepositoryBoundaryGuard()
sys.addaudithook(GUARD)  # audit hooks cannot be removed; the guard only records, it never raises
