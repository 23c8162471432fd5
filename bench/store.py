"""Label store benchmark: ingest rate for 10,000 frame-level annotations with masks, the training-set query
over them, on SQLite and PostgreSQL; and the import time of a 1-hour Cholec80 phase file (90,000 frames).

    .venv/bin/python bench/store.py [--pg URL] [--n 10000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from surgenet_assist.core.errors import StoreError
from surgenet_assist.core.formats.cholec80 import import_cholec80
from surgenet_assist.core.schema import DEFAULT_SCHEMA
from surgenet_assist.core.store import AnnotationInput, LabelStore, segmentation_payload

PG_DEFAULT = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def masks(n: int, h: int = 120, w: int = 214) -> list:
    """Blocky masks (a quarter of CholecSeg8k's 480x854) with an ignore border; 64 distinct, reused."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(64):
        small = rng.integers(0, DEFAULT_SCHEMA.num_classes, size=(h // 20 + 1, w // 20 + 1))
        m = np.kron(small, np.ones((20, 20), dtype=np.int64))[:h, :w].astype(np.uint8)
        m[0, :] = m[-1, :] = m[:, 0] = m[:, -1] = 255
        out.append(segmentation_payload(m))
    return [out[i % 64] for i in range(n)]


def bench_store(url: str, n: int, batch: int) -> dict[str, float]:
    store = LabelStore(url, migrate=True)
    vid = store.add_video("bench-video", 25, n)
    payloads = masks(n)
    t0 = time.perf_counter()
    for lo in range(0, n, batch):
        items = [
            AnnotationInput(
                vid,
                i,
                "segmentation",
                payloads[i],
                "label-studio",
                author="bench",
                ls_annotation_id=i,
                ls_task_id=i,
            )
            for i in range(lo, min(n, lo + batch))
        ]
        store.record_annotations(items)
    ingest = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(200):
        store.record_annotation(vid, n + i, "segmentation", payloads[i], source="napari", author="bench")
    single = (time.perf_counter() - t0) / 200
    t0 = time.perf_counter()
    labels = store.training_labels("segmentation")
    query = time.perf_counter() - t0
    assert len(labels) == n + 200
    t0 = time.perf_counter()
    meta = store.training_labels("segmentation", with_payload=False)
    query_meta = time.perf_counter() - t0
    assert len(meta) == n + 200
    store.close()
    return {
        "ingest_per_s": n / ingest,
        "single_per_s": 1 / single,
        "query_s": query,
        "query_meta_s": query_meta,
    }


def bench_cholec80(url: str) -> float:
    n = 90_000
    with tempfile.TemporaryDirectory() as tmp:
        ids = np.minimum(np.arange(n) // (n // 7), 6)
        path = Path(tmp) / "video01-phase.txt"
        path.write_text(
            "Frame\tPhase\n" + "".join(f"{i}\t{DEFAULT_SCHEMA.phase_names[p]}\n" for i, p in enumerate(ids))
        )
        store = LabelStore(url, migrate=True)
        t0 = time.perf_counter()
        import_cholec80(store, path)
        elapsed = time.perf_counter() - t0
        assert (store.phase_labels(store.video_id("video01")) == ids).all()
        store.close()
    return elapsed


def report(name: str, r: dict[str, float], c80: float) -> None:
    print(
        f"{name:10s} ingest {r['ingest_per_s']:8.0f} annotations/s (batched)   "
        f"{r['single_per_s']:6.0f}/s (one transaction each)   "
        f"training-set query {r['query_s']:.2f} s with masks, {r['query_meta_s']:.2f} s metadata only   "
        f"Cholec80 90,000-frame import {c80:.2f} s"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--pg", default=PG_DEFAULT, help="PostgreSQL URL (a temporary schema is used and dropped)"
    )
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--batch", type=int, default=500, help="annotations per transaction in the ingest test")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/bench.db"
        report("SQLite", bench_store(url, args.n, args.batch), bench_cholec80(f"sqlite:///{tmp}/c80.db"))
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    try:
        engine = sa.create_engine(args.pg, connect_args={"connect_timeout": 3})
        with engine.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    except Exception as exc:  # noqa: BLE001 - any failure means "skip PostgreSQL"
        print(
            f"PostgreSQL skipped: cannot reach {make_url(args.pg).render_as_string()} ({type(exc).__name__})"
        )
        return
    url = make_url(args.pg).update_query_dict({"options": f"-csearch_path={schema}"})
    pg = url.render_as_string(hide_password=False)
    try:
        r = bench_store(pg, args.n, args.batch)
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE; CREATE SCHEMA "{schema}"'))
        report("PostgreSQL", r, bench_cholec80(pg))
    except StoreError as exc:
        print(f"PostgreSQL failed: {exc.message}")
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        engine.dispose()


if __name__ == "__main__":
    main()
