"""`db`, `import`, `export` commands through the `surgenet-assist` app (errors printed by cli/main.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from store_helpers import random_mask, write_cholecseg8k, write_phase_file
from typer.testing import CliRunner


@pytest.fixture
def app():
    from surgenet_assist.cli.main import app

    return app


@pytest.fixture
def db(tmp_path):
    return f"sqlite:///{tmp_path / 'cli.db'}"


def test_upgrade_import_stats_export(app, db, tmp_path):
    r = CliRunner()
    res = r.invoke(app, ["db", "upgrade", "--db", db])
    from surgenet_assist.core.store.migrations import head_revision

    assert res.exit_code == 0 and head_revision() in res.output
    write_phase_file(tmp_path / "video01-phase.txt", ["Preparation"] * 10 + ["ClippingCutting"] * 5)
    res = r.invoke(
        app, ["import", "cholec80", str(tmp_path / "video01-phase.txt"), "--db", db, "--project", "p1"]
    )
    assert res.exit_code == 0, res.output
    assert "new revisions" in res.output
    rng = np.random.default_rng(0)
    write_cholecseg8k(tmp_path / "seg", {("video01", 3): random_mask(rng), ("video02", 4): random_mask(rng)})
    res = r.invoke(app, ["import", "cholecseg8k", str(tmp_path / "seg"), "--db", db, "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["counts"]["new revisions"] == 2
    res = r.invoke(app, ["db", "stats", "--json", "--db", db])
    stats = json.loads(res.output)
    assert stats["videos"] == 3 and stats["annotations"]["by_task"] == {"phase": 1, "segmentation": 2}
    assert stats["annotations"]["by_source"] == {"import": 3}
    res = r.invoke(app, ["export", "cholecseg8k", "--out", str(tmp_path / "out"), "--db", db])
    assert res.exit_code == 0 and "2 frame masks" in res.output
    assert len(list((tmp_path / "out").rglob("*_endo_color_mask.png"))) == 2
    res = r.invoke(app, ["export", "cholec80", "--out", str(tmp_path / "ph"), "--db", db, "--project", "p1"])
    assert res.exit_code == 0 and (tmp_path / "ph" / "video01-phase.txt").exists()
    res = r.invoke(app, ["export", "coco", "--out", str(tmp_path / "c.json"), "--db", db])
    assert res.exit_code == 0 and json.loads((tmp_path / "c.json").read_text())["images"]
    res = r.invoke(app, ["export", "label-studio", "--out", str(tmp_path / "ls.json"), "--db", db])
    assert res.exit_code == 0 and json.loads((tmp_path / "ls.json").read_text()) == []


def test_errors_exit_2_with_fix_and_no_traceback(app, db, tmp_path):
    r = CliRunner()
    bad = tmp_path / "video09-phase.txt"
    bad.write_text("Frame\tPhase\n0\tPreparation\n1\tNotAPhase\n")
    res = r.invoke(app, ["import", "cholec80", str(bad), "--db", db])
    assert res.exit_code == 2
    assert "unknown phase 'NotAPhase'" in res.output and "Fix:" in res.output
    assert "Traceback" not in res.output
    res = r.invoke(app, ["db", "stats", "--db", "postgresql+psycopg://u:pw@127.0.0.1:1/x"])
    assert res.exit_code == 2 and "cannot reach" in res.output and "pw@" not in res.output
    assert "Fix:" in res.output
    res = r.invoke(app, ["db", "stats", "--json", "--db", db])  # the failed import wrote nothing
    assert json.loads(res.output)["annotations"]["revisions"] == 0


def test_env_url_is_used_without_db_option(app, tmp_path, monkeypatch):
    monkeypatch.setenv("SURGENET_ASSIST_DB_URL", f"sqlite:///{tmp_path / 'env.db'}")
    res = CliRunner().invoke(app, ["db", "upgrade"])
    assert res.exit_code == 0 and (tmp_path / "env.db").exists()
