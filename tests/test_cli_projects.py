"""`--project` on the training commands and `nightly --all-projects`: one registry, champion and queue per
store project (one store project per Label Studio project)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from surgenet_assist.cli.main import app
from surgenet_assist.core.store import LabelStore


def _bundle_dirs(tmp_path, *versions):
    for v in versions:
        (tmp_path / v).mkdir()
        (tmp_path / v / "bundle.json").write_text("{}")


def test_models_commands_work_on_one_project(tmp_path, _isolated_home):
    db = f"sqlite:///{tmp_path / 's.db'}"
    a = LabelStore(db, project="label-studio-1", migrate=True)
    b = LabelStore(db, project="label-studio-2")
    _bundle_dirs(tmp_path, "a-1", "a-2", "b-1")
    for store, version in ((a, "a-1"), (a, "a-2"), (b, "b-1")):
        store.register_model_version(version, bundle_path=str(tmp_path / version))
    r = CliRunner()

    def run(*args):
        res = r.invoke(app, [*args, "--db", db])
        assert res.exit_code == 0, res.output
        return res.output

    run("models", "promote", "a-1", "--project", "label-studio-1")
    run("models", "promote", "b-1", "--project", "label-studio-2")
    assert "champion of label-studio-1: a-2" in run("models", "promote", "a-2", "--project", "label-studio-1")
    rows = json.loads(run("models", "list", "--project", "label-studio-1", "--json"))
    assert {x["version"]: x["status"] for x in rows} == {"a-1": "previous-champion", "a-2": "champion"}
    assert "a-1" in run("models", "rollback", "--project", "label-studio-1")
    assert {m["version"]: m["status"] for m in b.model_versions()} == {"b-1": "champion"}
    assert json.loads(run("models", "list", "--json")) == []  # the default project has none
    res = r.invoke(app, ["models", "promote", "b-1", "--project", "label-studio-1", "--db", db])
    assert res.exit_code == 2 and "b-1" in res.output and "Traceback" not in res.output


def test_nightly_all_projects(tmp_path, _isolated_home):
    db = f"sqlite:///{tmp_path / 's.db'}"
    LabelStore(db, migrate=True).close()
    r = CliRunner()
    res = r.invoke(app, ["nightly", "--all-projects", "--db", db])
    assert res.exit_code == 0 and "no project to train (no human labels)" in res.output
    res = r.invoke(app, ["nightly", "--all-projects", "--project", "x", "--db", db])
    assert res.exit_code == 2 and "--all-projects" in res.output
    with LabelStore(db, project="label-studio-7") as st:
        st.queue_training_run({"trigger": "label-studio START_TRAINING"})
    res = r.invoke(app, ["nightly", "--all-projects", "--from-queue", "--random-init", "--json", "--db", db])
    assert res.exit_code == 0, res.output
    reports = json.loads(res.output)
    assert list(reports) == ["label-studio-7"]
    assert reports["label-studio-7"]["outcome"].startswith("skipped: no human labels")
