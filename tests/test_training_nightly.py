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
from store_helpers import store_url  # noqa: F401 - fixture (SQLite and PostgreSQL)

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
        splits=["train", "train", "train", "val", "test"],
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
    """`train --promote` decides through the same gate as the nightly cycle: the candidate beat the champion
    on validation, the champion is re-evaluated on the test videos, and with two test videos the verdict is
    "insufficient evidence" (the champion stays), with the improvement's interval reported."""
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
    assert gate["test"] == "paired t-interval over videos" and gate["min_videos"] == 3
    assert gate["verdict"] == "insufficient evidence" and not gate["promote"], gate
    assert gate["videos"] == 2 and gate["improvement_ci"] is not None
    assert gate["reasons"][0].startswith("insufficient evidence: 2 test videos")
    assert registry.champion()["version"] == first


# --- test-split reuse: the gap alarm and the rotation (issue 22, item 2) -----------------------------------
def _evaluation(scores: dict[int, float]) -> dict:
    """What ``evaluate_model(per_video=True)`` returns for videos scoring ``scores`` (one task)."""
    return {
        "primary": {"segmentation": sum(scores.values()) / len(scores)},
        "per_video_ids": list(scores),
        "per_video_primary": [{"segmentation": v} for v in scores.values()],
    }


def _night(st, cfg, test_scores: list[float] | None, final_scores: list[float]) -> dict:
    """One judged cycle's bookkeeping, as ``_cycle`` does it: rotate when due, then record the serving
    model's test and final per-video scores (``test_scores`` None: the candidate did not pass validation,
    the champion serves and its test scores count)."""
    from surgenet_assist.training_loop.nightly import rotate_test_split, test_reuse_report
    from surgenet_assist.training_loop.registry import GateDecision

    run = st.record_training_run(task="nightly", status="running")
    rotation = rotate_test_split(st, cfg, run)
    tests = [v["id"] for v in st.videos() if v["split"] == "test"]
    finals = [v["id"] for v in st.videos() if v["split"] == "final"]
    scores = test_scores or [0.7] * len(tests)
    champion_test = _evaluation(dict(zip(tests, scores, strict=True)))
    result = {"test": champion_test if test_scores else None, "champion_test": champion_test}
    per_video = dict(zip(map(str, finals), final_scores, strict=True))
    final = {"serving": {"version": "v1", "per_video": per_video}} if finals else {"frames": 0}
    reuse = test_reuse_report(st, cfg, run, result, GateDecision(False), final, rotation)
    st.update_training_run(run, status="finished", metrics={"test_reuse": reuse})
    return reuse


def _videos(st, splits: list[str]) -> list[int]:
    return [
        st.add_video(f"/videos/case{i:02d}.mp4", fps=25, frame_count=9, split=s) for i, s in enumerate(splits)
    ]


@pytest.fixture
def any_store(store_url):  # noqa: F811 - the fixture imported above
    st = LabelStore(store_url, migrate=True)
    yield st
    st.close()


def test_gap_alarm_fires_when_the_gap_leaves_its_interval_and_the_test_split_rotates(any_store):
    store = any_store
    cfg = NightlyConfig(db=store.url, progress=False)
    ids = _videos(store, ["train", "train", "val", "test", "test", "test", "final", "final", "final"])
    test_ids, final_ids = ids[3:6], ids[6:9]
    first = _night(store, cfg, [0.70, 0.72, 0.74], [0.69, 0.71, 0.73])
    # the first gap on this test split is the reference: +0.01 with its Welch interval, no alarm
    assert first["gap"]["value"] == pytest.approx(0.01) and first["reference_gap"] is None
    low, high = first["gap"]["interval"]
    assert low < 0.01 < high and not first["alarm"] and not first["rotation_due"]
    inside = _night(store, cfg, [0.71, 0.73, 0.75], [0.70, 0.72, 0.74])
    assert not inside["alarm"] and inside["reference_gap"]["run"] and inside["reads_since_rotation"] == 2
    # the test split now flatters the chosen model: +0.15 over final, outside the reference interval
    worn = _night(store, cfg, [0.85, 0.87, 0.89], [0.70, 0.72, 0.74])
    assert worn["gap"]["value"] == pytest.approx(0.15) and high < 0.15
    assert worn["alarm"] and "left the interval" in worn["alarm_reason"] and worn["rotation_due"]
    assert {v["id"]: v["split"] for v in store.videos()}[test_ids[0]] == "test"  # rotation is next cycle's

    rotated = _night(store, cfg, [0.8, 0.8, 0.8], [])
    assert rotated["rotation"]["rotated"] and "left the interval" in rotated["rotation"]["why"]
    splits = {v["id"]: v["split"] for v in store.videos()}
    assert [splits[v] for v in test_ids] == ["train"] * 3  # they decided too much to judge any more
    assert [splits[v] for v in final_ids] == ["test"] * 3  # never read by a decision before
    assert rotated["reads_since_rotation"] == 1 and not rotated["alarm"] and not rotated["rotation_due"]
    (record,) = store.training_runs(task="test-rotation")
    assert record["status"] == "finished" and record["params"]["new_test"] == final_ids
    assert _night(store, cfg, [0.8, 0.8, 0.8], [])["rotation"] is None  # once


def test_test_split_rotates_after_its_reads_and_waits_for_enough_final_videos(any_store):
    store = any_store
    cfg = NightlyConfig(db=store.url, progress=False, rotate_after_reads=2)
    ids = _videos(store, ["train", "val", "test", "test", "test", "final", "final"])
    assert not _night(store, cfg, [0.7, 0.7, 0.7], [0.7, 0.7])["rotation_due"]
    skipped = _night(store, cfg, None, [0.7, 0.7])  # rejected on validation: the test split was not read
    assert not skipped["read"] and skipped["reads_since_rotation"] == 1 and not skipped["rotation_due"]
    assert _night(store, cfg, [0.7, 0.7, 0.7], [0.7, 0.7])["rotation_due"]  # the second read
    waiting = _night(store, cfg, [0.7, 0.7, 0.7], [0.7, 0.7])
    assert not waiting["rotation"]["rotated"] and "waits until 3" in waiting["rotation"]["reason"]
    assert [v["split"] for v in store.videos()][2:5] == ["test"] * 3 and waiting["rotation_due"]
    store.set_split(store.add_video("/videos/new.mp4", fps=25, frame_count=100), "final")
    rotated = _night(store, cfg, [0.7, 0.7, 0.7], [])
    assert rotated["rotation"]["rotated"] and "candidates read this test split" in rotated["rotation"]["why"]
    assert sorted(rotated["rotation"]["new_test"]) == sorted([*ids[5:7], store.videos()[-1]["id"]])


def test_a_rotation_interrupted_between_its_record_and_its_end_is_completed(any_store):
    from surgenet_assist.training_loop.nightly import ROTATION_TASK, rotate_test_split

    store = any_store
    cfg = NightlyConfig(db=store.url, progress=False)
    ids = _videos(store, ["train", "test", "final"])
    plan = {"nightly_run": 1, "retired_to_train": [ids[1]], "new_test": [ids[2]], "why": "test"}
    store.record_training_run(task=ROTATION_TASK, status="running", params=plan)  # killed right after this
    assert rotate_test_split(store, cfg, None) is None  # no new rotation is due, the pending one is applied
    assert [v["split"] for v in store.videos()] == ["train", "train", "test"]
    assert [r["status"] for r in store.training_runs(task=ROTATION_TASK)] == ["finished"]


def test_champion_is_scored_at_its_own_recorded_frame_size(tmp_path):
    """A champion trained at another frame size than today's config is evaluated on the split loaded again
    at its own size (and short side); a model at the config's contract gets the cycle's frames."""
    from surgenet_assist.core.model import Preprocessing
    from surgenet_assist.training_loop.nightly import SplitScorer, load_data

    store = LabelStore(f"sqlite:///{tmp_path}/s.db", migrate=True)
    split_of = ["train", "val", "test"]
    populate_store(store, tmp_path / "clips", [71, 72, 73], frames=6, size=SIZE, splits=split_of)
    cfg = NightlyConfig(db=store.url, frame_size=(48, 84), progress=False)
    splits = load_data(store, cfg)
    scorer = SplitScorer(store, cfg, splits)
    model = SurgeNetAssistModel.create(random_init=True)
    contract = {"short_side": 48, "mean": tuple(model.backbone.mean), "std": tuple(model.backbone.std)}
    model.preprocessing = Preprocessing(**contract, frame_size=(48, 84))
    assert scorer.frames(model, "test") is splits["test"]
    model.preprocessing = Preprocessing(**contract, frame_size=SIZE)
    own = scorer.frames(model, "test")
    assert own.frames.images.shape[1:3] == SIZE and splits["test"].frames.images.shape[1:3] == (48, 84)
    assert scorer.frames(model, "test") is own  # loaded once per cycle
    result = scorer.evaluate(model, "test", surface_distance=False)
    assert result["per_video_ids"] == [v["id"] for v in store.videos() if v["split"] == "test"]
    store.close()


@pytest.mark.slow
def test_a_candidate_worse_on_validation_never_reads_the_test_split(tmp_path, _isolated_home):
    url = f"sqlite:///{tmp_path}/s.db"
    store = LabelStore(url, migrate=True)
    splits = ["train", "train", "val", "test", "test", "test"]
    populate_store(store, tmp_path / "clips", [81, 82, 83, 84, 85, 86], frames=10, size=SIZE, splits=splits)
    first = run_cycle(NightlyConfig.from_dict(_config(url)))
    assert first["outcome"].startswith("promoted") and first["gate"]["reasons"] == ["no champion yet"]
    assert first["gate"]["reference_after"]["segmentation"]["version"] == first["candidate"]
    # a candidate trained from scratch for one epoch, not warm-started: worse than the champion on validation
    weak = _config(url) | {"warm_start": False, "force": True}
    weak["finetune"] = weak["finetune"] | {"epochs": 1, "temporal_epochs": 1}
    report = run_cycle(NightlyConfig.from_dict(weak))
    assert report["gate"]["verdict"] == "rejected on validation", report["gate"]
    assert "the test split is not read" in report["gate"]["reasons"][0]
    assert report["candidate_primary"] is None and not report["test_reuse"]["read"]
    assert report["test_reuse"]["reads_since_rotation"] == 1  # the first cycle's read only
    row = Registry(store).get(report["candidate"])
    assert row["status"] == "rejected" and set(row["metrics"]["test"]) == {"not_evaluated"}
    assert Registry(store).champion()["version"] == first["candidate"]
    text = Path(report["report"]).read_text()
    assert "Verdict: **rejected on validation**" in text and "## Test-split reuse" in text
