"""Nightly cycle: kill -9 mid-cycle keeps the champion, the next cycle resumes and completes; lock; queue."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from surgenet_assist.core.bundle import load_bundle
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
    trainer_loop(NightlyConfig(db=url, random_init=True, progress=False), at=None, poll_s=0, max_loops=1)
    row = {r["id"]: r for r in store.training_runs()}[rid]
    assert row["status"] == "finished" and row["task"] == "nightly"
    assert row["metrics"]["outcome"].startswith("skipped: no human labels")
