"""Fixtures and dataset builders shared by the label-store tests (imported by the test modules).

``store_url`` runs a test on SQLite (a temp file) and on PostgreSQL (a fresh schema per test, dropped after,
so runs never see each other's rows; skipped with a reason when no server is reachable).
"""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from surgenet_assist.core.schema import DEFAULT_SCHEMA


def _pg_schema_url(base: str, schema: str) -> str:
    url = make_url(base).update_query_dict({"options": f"-csearch_path={schema}"})
    return url.render_as_string(hide_password=False)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
        return
    base = request.getfixturevalue("postgres_url")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(base)
    with engine.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield _pg_schema_url(base, schema)
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()


@pytest.fixture
def store(store_url):
    from surgenet_assist.core.store import LabelStore

    st = LabelStore(store_url, migrate=True)
    yield st
    st.close()


def random_mask(rng: np.random.Generator, h: int = 24, w: int = 32, border: bool = True) -> np.ndarray:
    """Blocky class-id mask with a 1-px ignore border, like CholecSeg8k's."""
    small = rng.integers(0, DEFAULT_SCHEMA.num_classes, size=(h // 8 + 1, w // 8 + 1))
    mask = np.kron(small, np.ones((8, 8), dtype=np.int64))[:h, :w].astype(np.uint8)
    if border:
        mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = DEFAULT_SCHEMA.ignore_index
    return mask


def write_cholecseg8k(root: Path, frames: dict[tuple[str, int], np.ndarray], watershed_only=()) -> None:
    """CholecSeg8k layout: videoXX/videoXX_<start>/frame_<n>_endo{,_color_mask,_watershed_mask}.png."""
    import cv2

    palette = DEFAULT_SCHEMA.palette()
    palette[DEFAULT_SCHEMA.ignore_index] = (255, 255, 255)
    ws = np.zeros(256, dtype=np.uint8)
    for c in DEFAULT_SCHEMA.classes:
        ws[c.id] = c.watershed
    for (video, n), mask in frames.items():
        folder = root / video / f"{video}_{n - n % 80:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"frame_{n}_endo.png"), np.zeros((*mask.shape, 3), np.uint8))
        if (video, n) not in watershed_only:
            cv2.imwrite(str(folder / f"frame_{n}_endo_color_mask.png"), palette[mask][:, :, ::-1])
        cv2.imwrite(str(folder / f"frame_{n}_endo_watershed_mask.png"), ws[mask])


def write_phase_file(path: Path, phases: list[str], first_frame: int = 0) -> None:
    rows = "".join(f"{first_frame + i}\t{p}\n" for i, p in enumerate(phases))
    path.write_text("Frame\tPhase\n" + rows, encoding="utf-8")


def live_label_state(store) -> list[tuple]:
    """Everything a store says about its live human labels, independent of row ids and revision numbers:
    per label its video, frames, task, source, author, time, provenance, Label Studio annotation, payload, and
    whether it is the one that trains."""
    import json

    from surgenet_assist.core.schema import TASKS

    out = []
    for task in TASKS:
        trains = {r.annotation_id for r in store.training_labels(task)}
        for r in store.live_labels(task):
            mask = r.payload.get("mask")
            payload = {k: v for k, v in r.payload.items() if k != "mask"}
            out.append(
                (
                    r.video_path, r.frame_start, r.frame_end, task, r.source, r.author, r.updated_at,
                    r.provenance, r.ls_annotation_id, json.dumps(payload, sort_keys=True),
                    None if mask is None else mask.tobytes(), r.annotation_id in trains,
                )
            )
    return sorted(out, key=repr)
