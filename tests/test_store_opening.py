"""Opening the label store has no hidden side effects: no torch, no folders, no files, no migrations, unless
``migrate=True`` (services and writing commands) or ``surgenet-assist db upgrade`` asked for them."""
# ruff: noqa: F811  (fixtures imported from store_helpers are parameters of the tests below)

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import sqlalchemy as sa
from store_helpers import store_url  # noqa: F401 - fixture
from typer.testing import CliRunner

from surgenet_assist.core.errors import StoreError
from surgenet_assist.core.store import LabelStore, upgrade


def _tables(url: str) -> list[str]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return sa.inspect(conn).get_table_names()
    finally:
        engine.dispose()


def test_store_import_open_read_and_write_do_not_import_torch(tmp_path):
    """In a fresh interpreter: the default store (its path comes from core.paths), a write and the reads."""
    script = textwrap.dedent(
        """
        import json, sys
        import numpy as np
        from surgenet_assist.core.store import LabelStore, upgrade
        upgrade()
        with LabelStore() as store:
            vid = store.add_video("v.mp4", 25, 100)
            store.record_annotation(vid, 3, "segmentation", np.zeros((8, 8), np.uint8), source="napari")
            store.record_annotation(vid, 3, "cvs", [1, 0, 1], source="napari")
            n = len(store.training_labels("segmentation")) + len(store.current_human_labels("cvs"))
            store.labelling_queue("segmentation")
            store.claim_queued_run()
        heavy = sorted(m for m in ("torch", "torchvision", "timm") if m in sys.modules)
        print(json.dumps({"labels": n, "heavy": heavy}))
        """
    )
    env = {**os.environ, "SURGENET_ASSIST_HOME": str(tmp_path / "home")}
    env.pop("SURGENET_ASSIST_DB_URL", None)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"labels": 2, "heavy": []}
    assert (tmp_path / "home" / "surgenet-assist.db").exists()


def test_opening_a_missing_sqlite_store_creates_nothing(tmp_path, monkeypatch):
    folder = tmp_path / "not" / "there"
    with pytest.raises(StoreError) as info:
        LabelStore(f"sqlite:///{folder / 'labels.db'}")
    assert "no label store" in info.value.message and "db upgrade" in info.value.hint
    assert not (tmp_path / "not").exists()
    # the default store under the data dir: same, the data dir is not created either
    home = tmp_path / "home"
    monkeypatch.setenv("SURGENET_ASSIST_HOME", str(home))
    with pytest.raises(StoreError, match="no label store"):
        LabelStore()
    assert not home.exists()
    # asked to: folder, file and schema appear
    LabelStore(migrate=True).close()
    assert (home / "surgenet-assist.db").exists()
    LabelStore().close()


def test_opening_an_unmigrated_database_does_not_migrate_it(store_url):
    """SQLite (an empty file) and PostgreSQL (an empty schema): refused with the hint, left untouched."""
    if store_url.startswith("sqlite"):
        sa.create_engine(store_url).connect().close()  # an empty SQLite file
    with pytest.raises(StoreError) as info:
        LabelStore(store_url)
    assert "no label-store schema" in info.value.message and "db upgrade" in info.value.hint
    assert _tables(store_url) == []
    with LabelStore(store_url, migrate=True) as store:
        assert store.stats()["videos"] == 0
    assert "annotations" in _tables(store_url)
    LabelStore(store_url).close()  # at head: opens without migrate


def test_read_commands_refuse_a_missing_store_with_the_upgrade_hint(tmp_path):
    from surgenet_assist.cli.main import app

    db = f"sqlite:///{tmp_path / 'missing.db'}"
    runner = CliRunner()
    for args in (
        ["db", "stats", "--db", db],
        ["export", "coco", "--out", str(tmp_path / "c.json"), "--db", db],
        ["al", "next", "--db", db],
    ):
        res = runner.invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        assert "no label store" in res.output and "db upgrade" in res.output, res.output
        assert "Traceback" not in res.output
    assert not (tmp_path / "missing.db").exists()
    assert runner.invoke(app, ["db", "upgrade", "--db", db]).exit_code == 0
    res = runner.invoke(app, ["db", "stats", "--json", "--db", db])
    assert res.exit_code == 0 and json.loads(res.output)["videos"] == 0


def test_writing_commands_and_services_create_the_store(tmp_path):
    """`import` (a writing command) migrates; so do the backend and the napari session (services)."""
    from surgenet_assist.backend.app import BackendSettings, create_app
    from surgenet_assist.cli.main import app
    from surgenet_assist.napari_plugin.session import ReviewSession

    phases = tmp_path / "video01-phase.txt"
    phases.write_text("Frame\tPhase\n0\tPreparation\n1\tPreparation\n")
    db = f"sqlite:///{tmp_path / 'new' / 'a.db'}"
    res = CliRunner().invoke(app, ["import", "cholec80", str(phases), "--db", db])
    assert res.exit_code == 0, res.output
    from surgenet_assist.core.store.migrations import head_revision

    assert upgrade(db) == head_revision()

    backend_db = f"sqlite:///{tmp_path / 'backend' / 'b.db'}"
    create_app(BackendSettings(db_url=backend_db))
    assert "annotations" in _tables(backend_db)

    session = ReviewSession(f"sqlite:///{tmp_path / 'napari' / 'c.db'}")
    try:
        assert session.store.stats()["videos"] == 0
    finally:
        session.close()
