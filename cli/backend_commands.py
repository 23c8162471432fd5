"""`surgenet-assist serve` (the Label Studio ML backend under uvicorn) and `surgenet-assist ls ...` tools."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from surgenet_assist.core.errors import BundleError, UsageError

ls_app = typer.Typer(
    help="Label Studio tools: labeling configs, project setup, bulk pre-annotation.", no_args_is_help=True
)


def serve(
    host: Annotated[str, typer.Option(help="bind address (0.0.0.0 in Docker)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port Label Studio connects to")] = 9090,
    workers: Annotated[int, typer.Option(help="worker processes (each loads the model once)")] = 1,
    threads: Annotated[
        int,
        typer.Option(
            help="/predict request threads per worker (they wait for media; the model runs in "
            "SURGENET_ASSIST_COMPUTE_SLOTS at a time)"
        ),
    ] = 16,
    model: Annotated[Path | None, typer.Option("--model", help="model bundle directory to serve")] = None,
    registry: Annotated[
        bool, typer.Option("--registry", help="serve the store's champion, hot-swapped")
    ] = False,
    db: Annotated[
        str | None, typer.Option("--db", help="label store URL (default: SQLite in the data dir)")
    ] = None,
    video_fps: Annotated[float, typer.Option(help="frames per second analysed in video tasks")] = 1.0,
) -> None:
    """Run the Label Studio ML backend (POST /predict /setup /webhook, GET /health /metrics /versions).

    Served by uvicorn: connections in an event loop, work on bounded pools per route family, /health from
    a snapshot (backend/server.py, docs/deploy.md). Every worker builds the app and loads its model before
    it accepts a connection."""
    import uvicorn

    from surgenet_assist.backend.server import HeaderTimeoutH11Protocol

    if model is not None and registry:
        raise UsageError("--model and --registry both choose the served model", "give one of them")
    if model is not None:
        from surgenet_assist.core.bundle import read_bundle_info

        read_bundle_info(model)  # a missing or incomplete bundle is refused before the server starts
    if workers < 1 or threads < 1:
        raise UsageError("--workers and --threads must be at least 1", "use --workers 1 --threads 16")
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO"), format="%(asctime)s %(levelname)s %(message)s"
    )
    # the options reach every worker process as the variables BackendSettings.from_env reads there
    chosen = {
        "SURGENET_ASSIST_MODEL": str(model.resolve()) if model else None,
        "SURGENET_ASSIST_REGISTRY": "1" if registry else None,
        "SURGENET_ASSIST_DB_URL": db,
        "SURGENET_ASSIST_VIDEO_FPS": str(video_fps),
        "SURGENET_ASSIST_PREDICT_THREADS": str(threads),
    }
    os.environ.update({k: v for k, v in chosen.items() if v is not None})
    uvicorn.run(
        "surgenet_assist.cli.backend_commands:backend_server",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        http=HeaderTimeoutH11Protocol,
        lifespan="on",
        timeout_keep_alive=5,
        log_level=os.environ.get("LOG_LEVEL", "info").lower(),
    )


def backend_server():  # noqa: ANN201 - an ASGI app (uvicorn's factory, called in each worker process)
    """The backend as uvicorn serves it: the Flask app (model loaded now, before any connection) behind
    :class:`~surgenet_assist.backend.server.BackendServer`."""
    from surgenet_assist.backend.app import BackendSettings, create_app
    from surgenet_assist.backend.server import BackendServer, serve_limits

    settings = BackendSettings.from_env()
    app = create_app(
        settings,
        assist_factory=day_one_assist,
        click_segmenter_factory=interactive_click_segmenter,
        backbone_loader=cached_surgenetxl,
    )
    app.extensions["surgenet"].warm()  # the backbone loads now, so the first /setup stays well under 3 s
    limits = settings.server_limits()
    serve_limits(limits)
    return BackendServer(app, limits)


def cached_surgenetxl():  # noqa: ANN201 - a torch module
    """The cached SurgeNetXL backbone: the fallback for clicks and day-one features when no model is served
    (never downloads while serving)."""
    from surgenet_assist.core.backbone import load_backbone

    return load_backbone(allow_download=False, progress=False)


def day_one_assist(settings, store, schema, fetch, backbone):  # noqa: ANN001, ANN201 - see create_app
    """Propagation + instant heads on the project's serving backbone (``create_app``: the served model's,
    else the cached SurgeNetXL weights)."""
    from surgenet_assist.training_loop.assist import DayOneAssist

    def resolve(url: str) -> Path:
        return Path(url) if Path(url).exists() else fetch(url, None)

    return DayOneAssist(
        store,
        backbone,
        schema=schema,
        short_side=settings.day_one_short_side,
        sample_fps=settings.video_sample_fps,
        resolve=resolve,
        project=settings.store_project,
        feature_cache_bytes=settings.day_one_cache_mb << 20,
    )


def interactive_click_segmenter(settings, backbone):  # noqa: ANN001, ANN201 - see create_app
    """The click-to-mask engine of Label Studio's interactive mode, on the serving backbone."""
    from surgenet_assist.core.interactive import ClickSegmenter

    return ClickSegmenter(
        backbone, short_side=settings.day_one_short_side, cache_bytes=settings.click_cache_mb << 20
    )


@ls_app.command("config")
def ls_config(
    kind: Annotated[
        str, typer.Option(help="image (masks + CVS + phase) or video (phase timeline + CVS)")
    ] = "image",
    frame_rate: Annotated[float, typer.Option(help="video FPS for <Video frameRate>")] = 25.0,
    interactive: Annotated[
        bool,
        typer.Option(
            "--interactive", help="add smart click (KeyPointLabels) and box (RectangleLabels) tools (image)"
        ),
    ] = False,
) -> None:
    """Print a labeling config for Label Studio (paste it in Settings -> Labeling Interface -> Code)."""
    from surgenet_assist.backend.labeling_configs import KINDS, label_config

    if kind not in KINDS:
        raise UsageError(f"unknown labeling config kind {kind!r}", f"use --kind {' or --kind '.join(KINDS)}")
    if interactive and kind != "image":
        raise UsageError(
            f"--interactive needs --kind image, not {kind!r}",
            "use --kind image --interactive (clicks and boxes are drawn on frames)",
        )
    typer.echo(label_config(kind, frame_rate=frame_rate, interactive=interactive), nl=False)


@ls_app.command("setup-project")
def ls_setup_project(
    url: Annotated[str, typer.Option(help="Label Studio URL, e.g. http://127.0.0.1:8080")],
    api_key: Annotated[str, typer.Option(envvar="LABEL_STUDIO_API_KEY", help="legacy token or PAT")],
    frames: Annotated[Path | None, typer.Option(help="folder of frame images (image project)")] = None,
    video: Annotated[Path | None, typer.Option(help="a video file (video project)")] = None,
    project: Annotated[
        int | None,
        typer.Option(
            "--project",
            help="an existing project: connect the backend if it is not, create or repair its webhook",
        ),
    ] = None,
    backend_url: Annotated[
        str | None, typer.Option(help="URL LS uses to reach `serve`")
    ] = "http://127.0.0.1:9090",
    document_root: Annotated[
        Path | None,
        typer.Option(
            envvar="LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT",
            help="LS's LOCAL_FILES_DOCUMENT_ROOT; files under it use local-files storage, others upload",
        ),
    ] = None,
    title: Annotated[str | None, typer.Option(help="project title")] = None,
    backend_user: Annotated[
        str | None, typer.Option(envvar="BASIC_AUTH_USER", help="the backend's Basic Auth user, if any")
    ] = None,
    backend_password: Annotated[
        str | None, typer.Option(envvar="BASIC_AUTH_PASS", help="the backend's Basic Auth password")
    ] = None,
    webhook_secret: Annotated[
        str | None,
        typer.Option(
            envvar="SURGENET_ASSIST_WEBHOOK_SECRET",
            show_default=False,
            help="the backend's webhook secret: the project's webhook sends it as X-Surgenet-Webhook-Secret",
        ),
    ] = None,
    db: Annotated[
        str | None, typer.Option("--db", help="label store URL, where the project is connected")
    ] = None,
    interactive: Annotated[
        bool,
        typer.Option(
            "--interactive",
            help="click/box-to-mask: the interactive image config, backend connected for interactive "
            "pre-annotations (needs --frames)",
        ),
    ] = False,
) -> None:
    """Create a project with our config, local-files storage, the tasks, and this backend connected, with a
    webhook that carries the secret (or, with --project, repair an existing one); connect it in the store."""
    from surgenet_assist.backend.app import BackendSettings
    from surgenet_assist.backend.ls_api import LabelStudioToolError
    from surgenet_assist.backend.ls_client import connect_project, setup_project
    from surgenet_assist.backend.settings import check_webhook_secret
    from surgenet_assist.core.formats.label_studio import store_project_name
    from surgenet_assist.core.store import LabelStore

    if interactive and video is not None:
        raise UsageError(
            "--interactive works on frame projects, not on a video",
            "give --frames DIR with --interactive (clicks and boxes are drawn on frames)",
        )
    if project is not None and (frames is not None or video is not None):
        raise UsageError(
            "--project names an existing project; --frames/--video make a new one",
            "give --project ID alone to repair a project, or --frames/--video without it",
        )
    if project is not None and not backend_url:
        raise UsageError("--project needs --backend-url", "give the URL Label Studio uses to reach `serve`")
    check_webhook_secret(webhook_secret)
    auth = (backend_user, backend_password) if backend_user and backend_password else None
    if project is not None:
        res = connect_project(
            url,
            api_key,
            project,
            backend_url=backend_url or "",
            backend_auth=auth,
            interactive=interactive,
            webhook_secret=webhook_secret,
        )
    else:
        res = setup_project(
            url,
            api_key,
            frames=frames,
            video=video,
            backend_url=backend_url or None,
            title=title,
            document_root=document_root,
            backend_auth=auth,
            interactive=interactive,
            webhook_secret=webhook_secret,
        )
    name = store_project_name(res.project_id, BackendSettings.from_env().store_project)
    with LabelStore(db, migrate=True) as store:
        store.ensure_project(name)  # connected: the backend takes this project's webhooks
    typer.echo(
        f"project {res.project_id}: {len(res.task_ids)} tasks, ML backend {res.ml_backend_id}, "
        f"local storage {res.storage_id}, store project {name}"
    )
    if res.webhook is None:
        return
    if not res.webhook.ok:
        raise LabelStudioToolError(
            f"project {res.project_id} is set up, but its webhook is not: {res.webhook.problem}",
            res.webhook.fix,
        )
    typer.echo(
        f"webhook {res.webhook.webhook_id}: {res.webhook.url}, "
        + ("with the secret header" if webhook_secret else "without a secret header")
    )
    if not webhook_secret:
        typer.echo(
            "warning: no SURGENET_ASSIST_WEBHOOK_SECRET: a backend with Basic Auth or a secret refuses this "
            "webhook's deliveries; set it (the backend's) and run `ls setup-project --project "
            f"{res.project_id}` again",
            err=True,
        )


@ls_app.command("preannotate")
def ls_preannotate(
    url: Annotated[str, typer.Option(help="Label Studio URL")],
    api_key: Annotated[str, typer.Option(envvar="LABEL_STUDIO_API_KEY", help="legacy token or PAT")],
    project: Annotated[int, typer.Option(help="project id")],
    batch: Annotated[int, typer.Option(help="frames per model batch")] = 32,
    model: Annotated[
        Path | None, typer.Option("--model", help="bundle; default: the store's champion")
    ] = None,
    db: Annotated[str | None, typer.Option("--db", help="label store URL (for the champion)")] = None,
    video_fps: Annotated[float, typer.Option(help="frames per second analysed in video tasks")] = 1.0,
    include_test_videos: Annotated[
        bool,
        typer.Option(help="also pre-annotate tasks of test and final videos (their labels are then marked "
                     "as started from this model)"),
    ] = False,
) -> None:
    """Predict all tasks without a prediction of the current model version; resumable. Tasks of test and
    final videos get an empty prediction unless --include-test-videos (docs/store.md). Under torchrun
    (`torchrun --nproc-per-node N -m surgenet_assist.cli.main ls preannotate ...`) each rank takes a share."""
    from surgenet_assist.backend.app import BackendSettings, ModelHolder
    from surgenet_assist.backend.ls_client import preannotate
    from surgenet_assist.core.formats.label_studio import store_project_name

    settings = BackendSettings(
        model_path=str(model) if model else None, registry=model is None, db_url=db, batch_size=batch
    )
    store = None
    if model is None or db is not None:  # the champion, and the splits of the project's videos
        from surgenet_assist.core.store import LabelStore

        store = LabelStore(db)
    holder = ModelHolder(settings, store=store)
    if holder.predictor is None:
        raise BundleError(
            "no model to pre-annotate with", "pass --model BUNDLE or promote a champion (`models promote`)"
        )
    from surgenet_assist.cli.archive_commands import preannotate_shard

    rank, world = preannotate_shard()  # under torchrun: this rank's share of the tasks
    rep = preannotate(
        url,
        api_key,
        project,
        holder.predictor,
        batch=batch,
        video_sample_fps=video_fps,
        rank=rank,
        world_size=world,
        store=store,
        store_project=store_project_name(project),
        held_out=include_test_videos,
    )
    typer.echo(
        (f"rank {rank}/{world}: " if world > 1 else "")
        + f"{rep.predicted} predicted, {rep.skipped} already had {rep.model_version}, "
        f"{len(rep.held_out)} held out (test/final videos: empty prediction), "
        f"{len(rep.failed)} failed, {rep.total} tasks"
    )
    for task_id, why in rep.failed.items():
        typer.echo(f"  task {task_id}: {why}", err=True)
    if rep.failed:
        raise typer.Exit(1)


def sync_connected_projects(db: str | None, *, quiet: bool = False) -> list[dict[str, Any]] | None:
    """Reconcile every Label Studio project the store holds, when this process has a Label Studio connection
    (``LABEL_STUDIO_URL`` and ``LABEL_STUDIO_API_KEY``); None without one. The nightly cycle and the trainer
    run it before training."""
    from surgenet_assist.backend.app import BackendSettings
    from surgenet_assist.backend.sync import sync_all
    from surgenet_assist.core.store import LabelStore

    settings = BackendSettings.from_env()
    settings.check()
    api = settings.label_studio_api()
    if api is None:
        return None
    with LabelStore(db, migrate=True) as store:
        summaries = sync_all(api, store)
    api.close()
    if not quiet:
        for s in summaries:
            counts = s.get("counts", {})
            typer.echo(
                f"synced Label Studio project {s['label_studio_project']}: "
                + (
                    s["error"]
                    if "error" in s
                    else f"{counts.get('new revisions', 0)} new revisions, "
                    f"{counts.get('tombstoned (gone from Label Studio)', 0)} tombstoned"
                ),
                err=True,
            )
    return summaries


@ls_app.command("sync")
def ls_sync(
    url: Annotated[str, typer.Option(envvar="LABEL_STUDIO_URL", help="Label Studio URL")],
    api_key: Annotated[
        str, typer.Option(envvar="LABEL_STUDIO_API_KEY", help="personal access token or legacy token")
    ],
    project: Annotated[
        list[int] | None, typer.Option("--project", help="Label Studio project id (repeatable)")
    ] = None,
    all_connected: Annotated[
        bool, typer.Option("--all", help="every project the store already holds (label-studio-<id>)")
    ] = False,
    db: Annotated[str | None, typer.Option("--db", help="label store URL")] = None,
    store_project: Annotated[
        str | None, typer.Option(help="write into this store project instead of label-studio-<id>")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable summary")] = False,
) -> None:
    """Make the store's labels of Label Studio projects equal what Label Studio holds (lost webhooks, deleted
    tasks, drafts): creates, updates and tombstones; safe to repeat and to interrupt."""
    import json

    from surgenet_assist.backend.ls_api import LabelStudioAPI
    from surgenet_assist.backend.sync import connected_projects, sync_project
    from surgenet_assist.core.store import LabelStore

    if not project and not all_connected:
        raise UsageError("no project to sync", "give --project ID (repeatable) or --all")
    api = LabelStudioAPI(url, api_key)
    store = LabelStore(db, migrate=True)
    try:
        ids = sorted(set(project or []) | (set(connected_projects(store)) if all_connected else set()))
        summaries = []
        for pid in ids:
            summaries.append(sync_project(api, store, pid, store_project=store_project, progress=not as_json))
            store.ensure_project(summaries[-1]["store_project"])  # synced = connected: webhooks taken
    finally:
        store.close()
        api.close()
    if as_json:
        typer.echo(json.dumps(summaries, indent=2))
        return
    for s in summaries:
        c = s["counts"]
        typer.echo(
            f"Label Studio project {s['label_studio_project']} -> {s['store_project']}: "
            f"{c.get('tasks', 0)} tasks, {c.get('annotations', 0)} annotations, "
            f"{c.get('new revisions', 0)} new revisions, {c.get('unchanged (already stored)', 0)} unchanged, "
            f"{c.get('tombstoned (gone from Label Studio)', 0)} tombstoned, {s['skipped']} skipped"
        )


def register(app: typer.Typer) -> None:
    """Add `serve` and the `ls` sub-app to the main CLI."""
    app.command("serve")(serve)
    app.add_typer(ls_app, name="ls")
