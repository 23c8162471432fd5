"""Where surgenet-assist keeps things on disk, and whether it may download, without importing torch.

Everything lives under :func:`data_home`: ``$SURGENET_ASSIST_HOME`` if set, else the platform's user data
dir (XDG on Linux). The path functions only compute paths; none of them creates a folder, so opening the label
store or asking where the weights cache is has no side effect on disk. :func:`atomic_directory` is how every
artefact folder is written (write beside, then rename). ``$SURGENET_ASSIST_OFFLINE=1``
forbids downloads (air-gapped hospital machines). Core reads these variables here and nowhere else (the
store's ``$SURGENET_ASSIST_DB_URL`` is read where the URL is resolved, ``core/store/db.py``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from platformdirs import user_data_dir

HOME_ENV = "SURGENET_ASSIST_HOME"
OFFLINE_ENV = "SURGENET_ASSIST_OFFLINE"
DB_FILE = "surgenet-assist.db"


def data_home() -> Path:
    """Root of everything surgenet-assist keeps on disk (weights cache, default database, registry)."""
    return Path(os.environ.get(HOME_ENV) or user_data_dir("surgenet-assist", appauthor=False))


def weights_cache_dir() -> Path:
    """Downloaded backbone checkpoints (``data_home()/weights``)."""
    return data_home() / "weights"


def default_db_path() -> Path:
    """The default SQLite label store (``data_home()/surgenet-assist.db``)."""
    return data_home() / DB_FILE


def downloads_allowed() -> bool:
    """False when ``$SURGENET_ASSIST_OFFLINE=1``: missing weights are then an error, never a download."""
    return os.environ.get(OFFLINE_ENV) != "1"


@contextlib.contextmanager
def atomic_directory(folder: str | Path) -> Iterator[Path]:
    """A temporary folder beside ``folder`` to write into. When the block ends without error it replaces
    ``folder`` in one rename (an existing one is removed first), so a reader never sees half an artefact
    (bundles, click heads, instant heads, embedding-cache entries); on error nothing is left behind."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        yield tmp
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
