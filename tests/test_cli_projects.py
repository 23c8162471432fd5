"""`--project` on the training commands and `nightly --all-projects`: one registry, champion and queue per
store project (one store project per Label Studio project)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from surgenet_assist.cli.main import app
from surgenet_assist.core.store import CHAMPION, INTERACTIVE_TASK, LabelStore


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


def test_models_promote_and_rollback_leave_click_heads_alone(tmp_path, _isolated_home):
    """A learned click head (task "interactive") has its own champion: rollback never brings an old one back
    (nor marks the model champion rolled back for it), and `models promote` refuses one with a clear error."""
    db = f"sqlite:///{tmp_path / 's.db'}"
    st = LabelStore(db, migrate=True)
    _bundle_dirs(tmp_path, "v-1", "v-2")
    for version in ("v-1", "v-2"):
        st.register_model_version(version, bundle_path=str(tmp_path / version))
    for version in ("clicks-1", "clicks-2"):  # click-head folders, no bundle.json
        (tmp_path / version).mkdir()
        st.register_model_version(version, task=INTERACTIVE_TASK, bundle_path=str(tmp_path / version))
    r = CliRunner()

    def run(*args):
        res = r.invoke(app, [*args, "--db", db])
        assert res.exit_code == 0, res.output
        return res.output

    run("models", "promote", "v-1")
    run("models", "promote", "v-2")
    st.set_model_status("clicks-1", CHAMPION)  # the click gate's doing, after the model's promotion
    st.set_model_status("clicks-2", CHAMPION)  # clicks-1: the newest previous-champion
    assert "champion of default: v-1" in run("models", "rollback")
    status = {m["version"]: m["status"] for m in st.model_versions()}
    assert status == {"v-1": "champion", "v-2": "rolled-back", "clicks-1": "previous-champion",
                      "clicks-2": "champion"}
    res = r.invoke(app, ["models", "promote", "clicks-1", "--db", db])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert "click head" in res.output and "train-clicks" in res.output and "no bundle" not in res.output
    assert st.model_versions(task=INTERACTIVE_TASK, status=CHAMPION)[0]["version"] == "clicks-2"
    assert {x["version"] for x in json.loads(run("models", "list", "--json"))} == set(status)  # all listed
    st.close()


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
