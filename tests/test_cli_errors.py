"""Every command meets a typical user mistake with one line, 'Error: <problem> Fix: <what to do>', a
non-zero exit code and no traceback (issue 11, "one error story").

Each case runs the real `surgenet-assist` app (cli/main.py, every front-end registered) against a small
workspace: a migrated SQLite store with one imported video, a corrupt video, an unreadable JSON file, a
folder that is not a model bundle and a loopback port nobody listens on.
"""

from __future__ import annotations

import socket

import numpy as np
import pytest
from PIL import Image
from store_helpers import write_phase_file
from typer.testing import CliRunner

from surgenet_assist.cli.main import app
from surgenet_assist.core.store import LabelStore


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("mistakes")
    db = f"sqlite:///{root / 'store.db'}"
    write_phase_file(root / "video01-phase.txt", ["Preparation"] * 10 + ["ClippingCutting"] * 5)
    runner = CliRunner()
    res = runner.invoke(app, ["import", "cholec80", str(root / "video01-phase.txt"), "--db", db, "--json"])
    assert res.exit_code == 0, res.output
    store = LabelStore(db)
    store.set_split(store.videos()[0]["id"], "test")  # `evaluate` and `al score` get past the split check
    store.close()
    (root / "corrupt.mp4").write_bytes(b"\x00not a video\xff" * 64)
    (root / "broken.json").write_text("{not json")
    (root / "broken.yaml").write_text("finetune: [unclosed")
    (root / "not-a-bundle").mkdir()
    (root / "empty").mkdir()
    (root / "keyframes").mkdir()
    frames = root / "frames"
    frames.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(frames / "f0.png")
    Image.fromarray(np.ones((32, 32), np.uint8)).save(root / "keyframes" / "frame_000000.png")
    return {
        "root": str(root),
        "db": db,
        "missing_db": f"sqlite:///{root / 'missing.db'}",
        "closed": f"http://127.0.0.1:{_closed_port()}",
        "pg_closed": f"postgresql+psycopg://postgres@127.0.0.1:{_closed_port()}/x",
    }


# (command line with {placeholders}, a word the message must contain)
MISTAKES = [
    ("weights download nosuch-backbone", "nosuch-backbone"),
    ("weights download --from-file {root}/missing.pth", "missing.pth"),
    ("weights inspect {root}/missing.pth", "missing.pth"),
    ("predict {root}/corrupt.mp4 --out {root}/o1 --random-init", "corrupt.mp4"),
    ("predict {root}/corrupt.mp4 --out {root}/o2 --model {root}/not-a-bundle", "not-a-bundle"),
    ("propagate {root}/corrupt.mp4 --labels {root}/keyframes --out {root}/o3 --random-init", "corrupt.mp4"),
    ("db upgrade --db mysql://u@h/x", "mysql"),
    ("db stats --db {missing_db}", "missing.db"),
    ("db stats --db {pg_closed}", "cannot reach"),
    ("import cholec80 {root}/empty --db {db}", "phase files"),
    ("import label-studio {root}/broken.json --db {db}", "broken.json"),
    ("import endoscapes {root}/empty --db {db}", "endoscapes"),
    ("import cholecseg8k {root}/empty --db {db}", "empty"),
    ("export coco --out {root}/c.json --split holdout --db {db}", "holdout"),
    ("export label-studio --out {root}/l.json --model-version v-unknown --db {db}", "v-unknown"),
    ("export cholec80 --out {root}/ph --db {missing_db}", "missing.db"),
    ("train --config {root}/missing.yaml --db {db}", "missing.yaml"),
    ("train --frame-size big --db {db}", "frame-size"),
    ("evaluate --model {root}/not-a-bundle --split holdout --db {db}", "holdout"),
    ("evaluate --model v-unknown --db {db}", "v-unknown"),
    ("models promote v-unknown --db {db}", "v-unknown"),
    ("models rollback --db {db}", "champion"),
    ("nightly --config {root}/broken.yaml --db {db}", "broken.yaml"),
    ("trainer --at 25:99 --db {db}", "25:99"),
    ("al score --strategy nosuch --db {db}", "nosuch"),
    ("al score --split holdout --db {db}", "holdout"),
    ("al score --split test --db {db}", "champion"),
    ("al next --task nosuch --db {db}", "nosuch"),
    ("ls config --kind nosuch", "nosuch"),
    ("ls setup-project --url {closed} --api-key k --frames {root}/frames", "127.0.0.1"),
    ("ls preannotate --url {closed} --api-key k --project 1 --model {root}/not-a-bundle", "not-a-bundle"),
    ("serve --model {root}/not-a-bundle", "not-a-bundle"),
    ("propagate {root}/frames --labels {root}/empty --out {root}/o4 --random-init", "no labels"),
]


@pytest.mark.parametrize(("command", "word"), MISTAKES, ids=[m[0].split(" {")[0] for m in MISTAKES])
def test_mistake_gets_one_line_with_the_fix(workspace, command, word):
    args = [part.format(**workspace) for part in command.split()]
    res = CliRunner().invoke(app, args)
    assert res.exit_code != 0, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    errors = [line for line in res.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, res.output
    assert " Fix: " in errors[0], res.output
    assert word.lower() in errors[0].lower(), res.output
