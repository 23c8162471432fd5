"""Distributed fine-tuning: 2 processes on CPU (gloo) under torchrun give one registered candidate."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from surgenet_assist.core.store import LabelStore
from surgenet_assist.training_loop.synthetic_store import populate_store

SIZE = (64, 112)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_gloo_run_registers_one_candidate(tmp_path, _isolated_home):
    url = f"sqlite:///{tmp_path}/store.db"
    store = LabelStore(url, migrate=True)
    populate_store(
        store,
        tmp_path / "clips",
        [61, 62, 63, 64],
        frames=10,
        size=SIZE,
        splits=["train", "train", "val", "test"],
    )
    cfg = {
        "db": url,
        "random_init": True,
        "frame_size": list(SIZE),
        "progress": False,
        "finetune": {"epochs": 3, "temporal_epochs": 3, "short_side": 64, "batch_size": 4},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    torchrun = Path(sys.executable).with_name("torchrun")
    env = os.environ | {"SURGENET_ASSIST_HOME": str(_isolated_home), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            str(torchrun),
            "--nnodes=1",
            "--nproc_per_node=2",
            f"--master_port={_free_port()}",
            "-m",
            "surgenet_assist.cli.main",
            "train",
            "--config",
            str(tmp_path / "cfg.yaml"),
            "--json",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert out["world_size"] == 2
    rows = store.model_versions()
    assert [r["version"] for r in rows] == [out["version"]] and rows[0]["status"] == "candidate"
    assert Path(rows[0]["bundle_path"], "bundle.json").exists()
    assert set(out["test"]) == {"segmentation", "phase", "cvs"}
