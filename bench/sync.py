"""`ls sync` benchmark: reconcile a Label Studio project of 2,000 annotations (brush masks, phase and CVS
choices) into the label store, cold and when nothing changed, on SQLite and PostgreSQL.

The tasks are generated in Label Studio's export format and handed to the reconciliation in memory, so the
numbers are the store and translator side of a sync (the HTTP paging against a real server adds Label
Studio's own time, measured separately in tests/integration/test_label_studio_deploy.py; so does its answer
for each annotation the sync did not see, taken here from the export itself). Baseline measured
in the same run: importing the same tasks with `import label-studio` (write only, no reconciliation).

    .venv/bin/python bench/sync.py [--n 2000] [--pg URL]
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

from surgenet_assist.core.encoders import mask_to_brush_rle
from surgenet_assist.core.errors import StoreError
from surgenet_assist.core.formats.label_studio import import_label_studio
from surgenet_assist.core.formats.ls_config import image_config
from surgenet_assist.core.label_studio_sync import annotations_in, reconcile_label_studio
from surgenet_assist.core.schema import DEFAULT_SCHEMA
from surgenet_assist.core.store import LabelStore

PG_DEFAULT = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
H, W = 120, 214


def tasks(n: int, seed: int = 0) -> list[dict]:
    """``n`` image tasks of 20 videos, one annotation each: two brush regions, a phase and CVS choices."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        y, x = rng.integers(0, H // 2), rng.integers(0, W // 2)
        liver = np.zeros((H, W), np.uint8)
        liver[y : y + H // 3, x : x + W // 3] = 255
        tool = np.zeros((H, W), np.uint8)
        tool[H // 2 :, : W // 4] = 255

        def brush(rid: str, label: str, mask: np.ndarray) -> dict:
            return {
                "id": rid,
                "type": "brushlabels",
                "from_name": "mask",
                "to_name": "image",
                "original_width": W,
                "original_height": H,
                "value": {"format": "rle", "rle": mask_to_brush_rle(mask), "brushlabels": [label]},
            }

        phase = DEFAULT_SCHEMA.phase_names[i % DEFAULT_SCHEMA.num_phases]
        result = [
            brush(f"l{i}", "Liver", liver),
            brush(f"t{i}", "Grasper", tool),
            {"id": f"p{i}", "type": "choices", "from_name": "phase", "to_name": "image",
             "value": {"choices": [phase]}},
            {"id": f"c{i}", "type": "choices", "from_name": "cvs", "to_name": "image",
             "value": {"choices": ["C1"] if i % 3 else ["C1", "C2"]}},
        ]
        video = f"video{i % 20:02d}"
        out.append(
            {
                "id": i + 1,
                "data": {"image": f"/data/local-files/?d={video}/{i:06d}.png", "source_video": video,
                         "frame_index": i // 20},
                "annotations": [
                    {"id": 10_000 + i, "result": result, "completed_by": 1 + i % 3, "was_cancelled": False,
                     "updated_at": "2026-11-30T10:00:00Z"}
                ],
            }
        )
    return out


def bench(url: str, project_tasks: list[dict], tmp: Path) -> dict[str, float]:
    cfg = image_config()
    n = len(project_tasks)
    store = LabelStore(url, project="label-studio-1", migrate=True)

    def sync(these: list[dict]):  # noqa: ANN202
        t0 = time.perf_counter()
        report = reconcile_label_studio(
            store, these, annotation_exists=annotations_in(these), label_config=cfg, project="label-studio-1"
        )
        return report, time.perf_counter() - t0

    cold, t_cold = sync(project_tasks)
    warm, t_warm = sync(project_tasks)
    assert warm.counts.get("new revisions", 0) == 0 and not warm.counts["tombstoned (gone from Label Studio)"]
    gone = project_tasks[: n // 10]  # a tenth of the tasks deleted in Label Studio
    after, t_delete = sync(project_tasks[n // 10 :])
    store.close()

    import json

    (tmp / "export.json").write_text(json.dumps(project_tasks))
    other = LabelStore(url, project="baseline", migrate=True)
    t0 = time.perf_counter()
    import_label_studio(other, tmp / "export.json", label_config=cfg, project="baseline")
    t_import = time.perf_counter() - t0
    other.close()
    return {
        "annotations": n,
        "labels written (cold)": cold.counts["new revisions"],
        "cold sync s": t_cold,
        "cold annotations/s": n / t_cold,
        "no-change sync s": t_warm,
        "no-change annotations/s": n / t_warm,
        f"sync after {len(gone)} tasks deleted s": t_delete,
        "tombstoned": after.counts["tombstoned (gone from Label Studio)"],
        "baseline import s": t_import,
        "cold sync / import": t_cold / t_import,
        "no-change sync / cold sync": t_warm / t_cold,
    }


def _pg_schema(base: str) -> tuple[str, str]:
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    engine = sa.create_engine(base)
    with engine.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    engine.dispose()
    url = make_url(base).update_query_dict({"options": f"-csearch_path={schema}"})
    return url.render_as_string(hide_password=False), schema


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--pg", default=PG_DEFAULT, help="PostgreSQL URL ('' to skip)")
    args = ap.parse_args()
    project_tasks = tasks(args.n)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        results["sqlite"] = bench(f"sqlite:///{Path(tmp) / 'sync.db'}", project_tasks, Path(tmp))
        if args.pg:
            try:
                url, schema = _pg_schema(args.pg)
            except Exception as exc:  # noqa: BLE001 - no server here: say so and go on
                print(f"PostgreSQL skipped: {getattr(exc, 'message', exc)}")
            else:
                try:
                    results["postgresql"] = bench(url, project_tasks, Path(tmp))
                finally:
                    engine = sa.create_engine(args.pg)
                    with engine.begin() as conn:
                        conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
                    engine.dispose()
    for backend, res in results.items():
        print(f"\n{backend}")
        for key, value in res.items():
            print(f"  {key:<34} {value:,.3f}" if isinstance(value, float) else f"  {key:<34} {value}")


if __name__ == "__main__":
    try:
        main()
    except StoreError as exc:
        raise SystemExit(f"Error: {exc.message} Fix: {exc.hint}") from None
