"""Nightly cycle: kill -9 mid-cycle keeps the champion, the next cycle resumes and completes; lock; queue."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from surgenet_assist.core.bundle import load_bundle
from surgenet_assist.core.errors import SurgenetAssistError
from surgenet_assist.core.model import SurgeNetAssistModel
from surgenet_assist.core.store import LabelStore
from surgenet_assist.training_loop.nightly import CycleLocked, NightlyConfig, cycle_lock, run_cycle
from surgenet_assist.training_loop.registry import Registry
from surgenet_assist.training_loop.synthetic_store import populate_store

SIZE = (64, 112)


def _config(url: str) -> dict:
    return {
        "db": url,
        "random_init": True,
        "frame_size": list(SIZE),
        "finetune": {
            "epochs": 6,
            "temporal_epochs": 10,
            "short_side": 64,
            "batch_size": 8,
            "checkpoint_every": 2,
        },
        "pretrain": {"enabled": False},
        "rescore_max_frames_per_video": 6,
        "progress": False,
        "click_head": False,  # the interactive stage has its own test (test_click_head.py)
    }


@pytest.fixture
def store_with_champion(tmp_path, _isolated_home):
    url = f"sqlite:///{tmp_path}/store.db"
    store = LabelStore(url, migrate=True)
    populate_store(
        store,
        tmp_path / "clips",
        [31, 32, 33, 34, 35],
        frames=12,
        size=SIZE,
        splits=["train", "train", "train", "val", "test", "train"],  # the unlabelled one is re-scored
        unlabelled_seeds=[36],
    )
    registry = Registry(store)
    champion = registry.register_candidate(
        SurgeNetAssistModel.create(random_init=True),
        metrics={},
        manifest_hash="initial",
        seeds={},
        parent=None,
    )
    registry.promote(champion)
    return url, store, registry, champion


@pytest.mark.slow
def test_kill_9_mid_cycle_keeps_champion_and_next_cycle_resumes(
    store_with_champion, tmp_path, _isolated_home
):
    url, store, registry, champion = store_with_champion
    cfg_path = tmp_path / "nightly.yaml"
    cfg_path.write_text(yaml.safe_dump(_config(url)))
    env = os.environ | {"SURGENET_ASSIST_HOME": str(_isolated_home)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "surgenet_assist.cli.main", "nightly", "--config", str(cfg_path), "--json"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    work = Path(_isolated_home) / "work"
    deadline = time.time() + 120
    try:
        while not list(work.glob("*/finetune_last.pt")):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    # champion untouched and still loadable; the dead run is visible as running
    assert registry.champion()["version"] == champion
    load_bundle(registry.champion()["bundle_path"], allow_download=False)
    running = [r for r in store.training_runs() if r["status"] == "running"]
    assert len(running) == 1

    report = run_cycle(NightlyConfig.from_dict(_config(url)))
    assert report["interrupted_runs_closed"] == [running[0]["id"]]
    assert report["finetune"]["resumed_from_step"] >= 2
    assert report["outcome"].startswith(("promoted", "rejected"))
    assert report["champion_after"] in {champion, report["candidate"]}
    out = Path(report["report"]).parent
    assert {"report.md", "learning_curves.png", "confusion_segmentation.png"} <= {
        p.name for p in out.iterdir()
    }
    assert report["acquisition_scores"]["segmentation"] > 0
    runs = {r["id"]: r["status"] for r in store.training_runs()}
    assert runs[running[0]["id"]] == "interrupted" and runs[report["training_run"]] == "finished"
    # same labels again: nothing to train
    again = run_cycle(NightlyConfig.from_dict(_config(url)))
    if report["champion_after"] == report["candidate"]:
        assert again["outcome"].startswith("skipped")


def test_second_cycle_is_refused_while_one_holds_the_lock(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    store = LabelStore(url, migrate=True)
    with cycle_lock(store), pytest.raises(CycleLocked):
        run_cycle(NightlyConfig(db=url, random_init=True, progress=False))
    with cycle_lock(store):  # released after use
        pass


def test_queue_claims_a_queued_run_once(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    store = LabelStore(url, migrate=True)
    assert run_cycle(NightlyConfig(db=url, random_init=True, progress=False), from_queue=True)["outcome"] == (
        "nothing queued"
    )
    rid = store.record_training_run(status="queued", params={"trigger": "label-studio START_TRAINING"})
    claimed = store.claim_queued_run()
    assert claimed is not None and claimed["id"] == rid
    assert store.claim_queued_run() is None
    assert {r["id"]: r["status"] for r in store.training_runs()}[rid] == "running"


def test_trainer_consumes_a_cycle_queued_by_label_studio(tmp_path):
    from surgenet_assist.training_loop.nightly import trainer_loop

    url = f"sqlite:///{tmp_path}/s.db"
    store = LabelStore(url, migrate=True)
    rid = store.record_training_run(status="queued", params={"trigger": "label-studio START_TRAINING"})
    cfg = NightlyConfig(db=url, random_init=True, progress=False, click_head=False)
    trainer_loop(cfg, at=None, poll_s=0, max_loops=1)
    row = {r["id"]: r for r in store.training_runs()}[rid]
    assert row["status"] == "finished" and row["task"] == "nightly"
    assert row["metrics"]["outcome"].startswith("skipped: no human labels")


def test_trainer_claims_queued_runs_of_every_project(tmp_path, _isolated_home):
    """The webhook queues a run in the Label Studio project's store project; a trainer started without
    --project claims each project's run, in that project."""
    from surgenet_assist.training_loop.nightly import trainer_loop

    url = f"sqlite:///{tmp_path}/s.db"
    a = LabelStore(url, project="label-studio-1", migrate=True)
    b = LabelStore(url, project="label-studio-2")
    ra, _ = a.queue_training_run({"trigger": "label-studio START_TRAINING"})
    rb, _ = b.queue_training_run({"trigger": "label-studio START_TRAINING"})
    cfg = NightlyConfig(db=url, random_init=True, progress=False, click_head=False)
    trainer_loop(cfg, at=None, poll_s=0, max_loops=1)
    for store, rid in ((a, ra), (b, rb)):
        (row,) = store.training_runs()
        assert row["id"] == rid and row["status"] == "finished" and row["project"] == store.project
        assert row["metrics"]["outcome"].startswith("skipped: no human labels")
    assert a.queued_run_projects() == []
    # a trainer of one project leaves the other's queue alone
    a.queue_training_run()
    rb2, _ = b.queue_training_run()
    cfg = NightlyConfig(db=url, project="label-studio-1", random_init=True, progress=False, click_head=False)
    trainer_loop(cfg, at=None, poll_s=0, max_loops=1)
    assert a.queued_run_projects() == ["label-studio-2"]
    assert {r["id"]: r["status"] for r in b.training_runs()}[rb2] == "queued"


def test_cycle_locks_are_per_project(tmp_path, _isolated_home):
    url = f"sqlite:///{tmp_path}/s.db"
    a = LabelStore(url, project="label-studio-1", migrate=True)
    b = LabelStore(url, project="label-studio-2")
    b.queue_training_run()
    with cycle_lock(a):
        with pytest.raises(CycleLocked):
            run_cycle(NightlyConfig(db=url, project="label-studio-1", random_init=True, progress=False))
        # another project's cycle is not blocked
        cfg = NightlyConfig(
            db=url, project="label-studio-2", random_init=True, progress=False, click_head=False
        )
        report = run_cycle(cfg, from_queue=True)
    assert report["project"] == "label-studio-2" and report["outcome"].startswith("skipped")
    assert [r["status"] for r in b.training_runs()] == ["finished"] and a.training_runs() == []


def test_run_all_projects_runs_each_project_with_labels(tmp_path, _isolated_home, monkeypatch):
    from surgenet_assist.training_loop import nightly

    url = f"sqlite:///{tmp_path}/s.db"
    for name in ("label-studio-1", "label-studio-2", "label-studio-3"):
        st = LabelStore(url, project=name, migrate=True)
        v = st.add_video("case.mp4", 25, 10)
        if name != "label-studio-2":  # project 2 has videos but no human label
            st.record_annotation(v, 1, "cvs", [1, 0, 1], source="napari")
        st.close()
    seen = []

    def fake_cycle(cfg, from_queue=False):
        seen.append(cfg.project)
        if cfg.project == "label-studio-1":
            raise RuntimeError("out of memory")
        return {"outcome": "promoted v1", "project": cfg.project}

    monkeypatch.setattr(nightly, "run_cycle", fake_cycle)
    reports = nightly.run_all_projects(NightlyConfig(db=url, progress=False))
    assert seen == ["label-studio-1", "label-studio-3"]  # a failed project does not stop the others
    assert reports["label-studio-1"]["outcome"] == "failed: out of memory"
    assert reports["label-studio-3"]["outcome"] == "promoted v1"


def test_registry_is_per_project(tmp_path, _isolated_home):
    url = f"sqlite:///{tmp_path}/s.db"
    a = LabelStore(url, project="label-studio-1", migrate=True)
    b = LabelStore(url, project="label-studio-2")
    root = tmp_path / "registry"
    ra, rb = Registry(a, root=root), Registry(b, root=root)
    model = SurgeNetAssistModel.create(random_init=True)
    kw = dict(metrics={}, manifest_hash="m", seeds={}, parent=None)
    a1, a2 = ra.register_candidate(model, **kw), ra.register_candidate(model, **kw)
    b1 = rb.register_candidate(model, **kw)
    ra.promote(a1)
    rb.promote(b1)
    ra.promote(a2)
    assert ra.champion()["version"] == a2 and rb.champion()["version"] == b1
    assert [r["version"] for r in ra.versions()] == [a1, a2] and [r["version"] for r in rb.versions()] == [b1]
    assert ra.rollback() == a1 and rb.champion()["version"] == b1
    with pytest.raises(SurgenetAssistError, match="no model version"):
        rb.promote(a2)  # another project's version
    import json

    assert json.loads((root / "CHAMPION-label-studio-1").read_text())["version"] == a1
    assert json.loads((root / "CHAMPION-label-studio-2").read_text())["version"] == b1
    assert ra.remove_orphans(min_age_s=0) == []  # B's bundles are not A's orphans


def test_trainer_reconciles_before_a_cycle_runs_and_only_then(tmp_path):
    """The CLI passes `ls sync` of every connected project as ``before_cycle``: it runs before the daily
    cycle and before a queued one, and not on the polls in between (nothing to train)."""
    from surgenet_assist.training_loop.nightly import trainer_loop

    url = f"sqlite:///{tmp_path / 'hook.db'}"
    calls = []
    cfg = NightlyConfig(db=url, random_init=True, progress=False, click_head=False)
    trainer_loop(cfg, at=None, poll_s=0, max_loops=2, before_cycle=lambda: calls.append("sync"))
    assert calls == []  # nothing queued, no daily cycle due
    trainer_loop(cfg, at="00:00", poll_s=0, max_loops=1, before_cycle=lambda: calls.append("sync"))
    assert calls == ["sync"]  # the daily cycle (no project has labels yet: it trains nothing)

    def failing():
        calls.append("failed sync")
        raise RuntimeError("Label Studio is down")

    trainer_loop(cfg, at="00:00", poll_s=0, max_loops=1, before_cycle=failing)  # logged; the loop goes on
    assert calls[-1] == "failed sync"


def test_train_promote_uses_the_cycles_gate(tmp_path, _isolated_home):
    """`train --promote` decides through the same gate as the nightly cycle: the champion re-evaluated on the
    test videos and the improvement's bootstrap interval reported."""
    from typer.testing import CliRunner

    from surgenet_assist.cli.main import app

    url = f"sqlite:///{tmp_path}/s.db"
    store = LabelStore(url, migrate=True)
    splits = ["train", "val", "test", "test"]
    populate_store(store, tmp_path / "clips", [41, 42, 43, 44], frames=8, size=SIZE, splits=splits)
    registry = Registry(store)
    first = registry.register_candidate(
        SurgeNetAssistModel.create(random_init=True), metrics={}, manifest_hash="x", seeds={}, parent=None
    )
    registry.promote(first)
    args = ["train", "--db", url, "--random-init", "--epochs", "1", "--short-side", "48", "--promote"]
    res = CliRunner().invoke(app, [*args, "--json", "--frame-size", f"{SIZE[0]}x{SIZE[1]}"])
    assert res.exit_code == 0, res.output
    gate = json.loads(res.output[res.output.index("{") :])["gate"]
    assert gate["videos"] == 2 and gate["improvement_ci"] is not None and gate["reasons"]
