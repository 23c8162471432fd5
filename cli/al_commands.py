"""Active-learning commands: `al score` (write the queue with the served model), `al next` (read it).

Both use the store's ``acquisition_scores`` rows, the same rows the nightly cycle writes and Label Studio /
napari read, so the three never disagree about what to label next.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from .store_commands import _store, require_split

DbOpt = Annotated[str | None, typer.Option("--db", help="label store URL (default: $SURGENET_ASSIST_DB_URL)")]
ProjectOpt = Annotated[str, typer.Option("--project", help="store project")]
JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output")]


def register(app: typer.Typer) -> None:
    al_app = typer.Typer(help="Active learning: which frames to label next.", no_args_is_help=True)
    app.add_typer(al_app, name="al")

    @al_app.command("score")
    def score(
        strategy: Annotated[str, typer.Option("--strategy", help="hybrid (default), entropy...")] = "hybrid",
        model: Annotated[
            str | None, typer.Option("--model", help="bundle path (default: the registry's champion)")
        ] = None,
        fps: Annotated[float, typer.Option("--fps", help="frames sampled per second of video")] = 1.0,
        max_frames: Annotated[int, typer.Option("--max-frames", help="per video, evenly spread")] = 200,
        queue_size: Annotated[int, typer.Option("--queue-size", help="queued frames per task")] = 200,
        split: Annotated[str, typer.Option("--split", help="videos of this split ('' = all)")] = "train",
        short_side: Annotated[int | None, typer.Option("--short-side")] = None,
        db: DbOpt = None,
        project: ProjectOpt = "default",
        as_json: JsonOpt = False,
    ) -> None:
        """Score sampled frames of the project with its champion (or --model) and store the queue."""
        from surgenet_assist.core.errors import SurgenetAssistError
        from surgenet_assist.training_loop.acquisition import get_strategy, score_frames
        from surgenet_assist.training_loop.registry import Registry

        get_strategy(strategy)  # an unknown name fails before the model loads
        store = _store(db, project, migrate=True)
        require_split(store, split or None, project)
        version = None
        if model is None:
            champ = Registry(store, project=project).champion()  # the project's champion
            if champ is None:
                raise SurgenetAssistError(
                    "no champion model to score with", "train one (`surgenet-assist train`) or pass --model"
                )
            model, version = champ["bundle_path"], champ["version"]
        result = score_frames(
            store,
            model,
            version,
            strategy,
            project=project,
            fps=fps,
            max_frames_per_video=max_frames,
            short_side=short_side,
            split=split or None,
            queue_size=queue_size,
            progress=not as_json,
        )
        if as_json:
            typer.echo(json.dumps(result, indent=2))
        else:
            queued = ", ".join(f"{t} {n}" for t, n in result["queue"].items())
            typer.echo(f"{result['frames_scored']} frames scored with {strategy}; queued: {queued}")

    @al_app.command("next")
    def next_frames(
        n: Annotated[int, typer.Option("--n", help="how many frames")] = 20,
        task: Annotated[str, typer.Option("--task", help="segmentation, phase or cvs")] = "segmentation",
        strategy: Annotated[
            str | None, typer.Option("--strategy", help="default: hybrid rows, else any method")
        ] = None,
        include_labelled: Annotated[bool, typer.Option("--include-labelled")] = False,
        db: DbOpt = None,
        project: ProjectOpt = "default",
        as_json: JsonOpt = False,
    ) -> None:
        """The next frames to label (highest acquisition priority first; labelled frames skipped)."""
        store = _store(db, project)
        paths = {v["id"]: v["path"] for v in store.videos(project)}
        items = store.labelling_queue(
            task, strategy, limit=n, exclude_labelled=not include_labelled, project=project
        )
        rows: list[dict[str, Any]] = [
            {
                "rank": i + 1,
                "video_id": it.video_id,
                "video": paths.get(it.video_id),
                "frame_index": it.frame_index,
                "task": it.task,
                "score": round(float(it.score), 6),
                "method": it.method,
                "model_version": it.model_version,
            }
            for i, it in enumerate(items)
        ]
        if as_json:
            typer.echo(json.dumps(rows, indent=2))
            return
        if not rows:
            typer.echo("queue empty: run `surgenet-assist al score` (or wait for the nightly cycle)")
        for r in rows:
            where = f"{r['video']}  frame {r['frame_index']}"
            typer.echo(f"{r['rank']:>3}  {where}  {r['method']} {r['score']:.3f}")
