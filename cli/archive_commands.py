"""`surgenet-assist predict` over an archive: many videos, one process or sharded under torchrun.

The CLI is where torchrun's ranks are read (through ``training_loop.distributed``, the one place that reads
them); ``core.archive`` does the rest. Rank 0 plans (lists the videos, reads their durations, leaves out
the finished ones, balances the rest) and broadcasts the plan, so every rank works on the same plan even
while another rank is already writing; at the end every rank's outcomes are gathered and rank 0 prints and
writes the summary.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from surgenet_assist.core.errors import SurgenetAssistError, UsageError

# an archive rank may wait for the slowest one for hours before the final gather
_GATHER_TIMEOUT_MIN = 7 * 24 * 60


def _plan(
    inputs: list[str], out: Path | None, store: Any, version: str, store_project: str | None, world: int
) -> dict[str, Any]:
    from surgenet_assist.core.archive import assign_shards, collect_videos, describe_videos, finished

    videos = describe_videos(collect_videos(inputs))
    done = finished(videos, out=out, store=store, model_version=version, store_project=store_project)
    pending = [v for v in videos if v.key not in done]
    return {
        "videos": len(videos),
        "finished": sorted(v.key for v in videos if v.key in done),
        "shares": assign_shards(pending, world),
        "hours": sum(v.duration for v in videos) / 3600,
    }


def predict_archive(
    inputs: list[str],
    *,
    out: Path | None,
    to_store: bool,
    db: str | None,
    store_project: str | None,
    fps: float | None,
    decoder: str,
    decode_workers: int,
    overlay_every: int,
    build_predictor: Callable[[str | None], Any],
    device: str | None,
    console: Console,
) -> dict[str, Any] | None:
    """Run (this rank's share of) an archive; rank 0 returns the summary of the whole run, others None."""
    import torch

    from surgenet_assist.core.archive import ArchiveOptions, VideoOutcome, run_archive, summarise_outcomes
    from surgenet_assist.training_loop import distributed

    if out is None and not to_store:
        raise UsageError("nothing to write the predictions to", "give --out FOLDER and/or --to-store")
    started = time.monotonic()
    distributed.init(backend="gloo", timeout_minutes=_GATHER_TIMEOUT_MIN)  # objects only: gloo everywhere
    rank, world = distributed.rank(), distributed.world_size()
    if device is None and torch.cuda.is_available():
        device = f"cuda:{distributed.local_rank()}"
    store = None
    try:
        predictor = build_predictor(device)
        if to_store:
            from surgenet_assist.core.store import LabelStore

            store = LabelStore(db, migrate=rank == 0) if rank == 0 else None
            distributed.barrier()  # rank 0 created/migrated the store before the others open it
            store = store or LabelStore(db)
            if distributed.multi_node() and store.engine.dialect.name == "sqlite":
                raise UsageError(
                    "a multi-node run cannot share a SQLite label store (each node would write its own file)",
                    "give --db postgresql+psycopg://user@host/db (or SURGENET_ASSIST_DB_URL) on every node",
                )
        plan: dict[str, Any] | None = None
        error: tuple[type, str, str | None] | None = None  # (kind, message, hint): exceptions pickle poorly
        if rank == 0:
            try:
                plan = _plan(inputs, out, store, predictor.model_version, store_project, world)
            except SurgenetAssistError as exc:
                error = (type(exc), exc.message, exc.hint)
        plan, error = distributed.broadcast_object((plan, error))
        if error is not None:
            raise error[0](error[1], error[2])
        assert plan is not None
        if rank == 0:
            console.print(
                f"{plan['videos']} videos ({plan['hours']:.2f} h), {len(plan['finished'])} finished before, "
                f"{sum(len(s) for s in plan['shares'])} to do on {world} rank(s); "
                f"model {predictor.model_version}"
            )
        opts = ArchiveOptions(
            out=out,
            store=store,
            store_project=store_project,
            sample_fps=fps if fps is not None else predictor.temporal_fps,
            decoder=decoder,
            decode_workers=decode_workers,
            overlay_every=overlay_every,
        )
        mine = run_archive(plan["shares"][rank], predictor, opts, rank=rank, world_size=world)
        if out is not None:  # each rank's own record survives a failed gather
            (out / ".archive").mkdir(parents=True, exist_ok=True)
            (out / ".archive" / f"rank-{rank}.json").write_text(
                json.dumps([o.to_dict() for o in mine], indent=2)
            )
        everyone: list[VideoOutcome] = [o for part in distributed.gather_objects(mine) for o in part]
        everyone += [
            VideoOutcome(k, "", "skipped") for k in plan["finished"]
        ]
        summary = summarise_outcomes(everyone, time.monotonic() - started)
        summary["ranks"] = world
        summary["model_version"] = predictor.model_version
        if rank != 0:
            return None
        if out is not None:
            (out / "archive-summary.json").write_text(json.dumps(summary, indent=2))
        return summary
    finally:
        if store is not None:
            store.close()
        distributed.cleanup()


def print_summary(summary: dict[str, Any], console: Console) -> None:
    """The final lines: counts, frames/s, and each failed video with its reason."""
    console.print(
        f"[green]{summary['done']} videos pre-annotated[/], {summary['skipped (finished before)']} finished "
        f"before, {summary['failed']} failed; {summary['frames']} frames in {summary['seconds']:.1f} s "
        f"({summary['frames_per_s']:.1f} frames/s) on {summary['ranks']} rank(s)"
    )
    for path, why in summary["failures"].items():
        console.print(f"[red]failed[/] {path}: {why}")


def preannotate_shard() -> tuple[int, int]:
    """(rank, world size) for `ls preannotate` under torchrun: tasks are split by rank, no collective."""
    from surgenet_assist.training_loop import distributed

    return distributed.launch_rank_and_size()


def exit_code(summary: dict[str, Any]) -> None:
    if summary["failed"]:
        raise typer.Exit(1)
