"""Training-loop commands: train, evaluate, models list/promote/rollback, nightly, trainer.

Each works on one store project (``--project``, default ``default``: one store project per Label Studio
project, with its own registry, champion, training queue and splits); ``nightly --all-projects`` and the
``trainer`` without ``--project`` serve every project.

`train` runs unchanged under torchrun (`torchrun --nproc_per_node N -m surgenet_assist.cli.main train ...`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from surgenet_assist.core.errors import UsageError

DbOpt = Annotated[str | None, typer.Option("--db", help="label store URL (default: $SURGENET_ASSIST_DB_URL)")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", help="YAML with NightlyConfig fields")]
JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output")]
ProjectOpt = Annotated[
    str | None,
    typer.Option("--project", help="store project (LS project N: label-studio-N) [default: default]"),
]


def _config(
    config: Path | None,
    db: str | None,
    random_init: bool | None = None,
    epochs: int | None = None,
    short_side: int | None = None,
    frame_size: str | None = None,
    budget: float | None = None,
    force: bool | None = None,
    progress: bool = True,
    project: str | None = None,
    default_project: bool = True,
) -> Any:
    from surgenet_assist.core.store import DEFAULT_PROJECT
    from surgenet_assist.training_loop.nightly import NightlyConfig

    cfg = NightlyConfig.from_file(config) if config else NightlyConfig()
    if db:
        cfg.db = db
    if project:
        cfg.project = project
    elif default_project and not cfg.project:
        cfg.project = DEFAULT_PROJECT
    if random_init:
        cfg.random_init = True
    if epochs is not None:
        cfg.finetune.epochs = epochs
    if short_side is not None:
        cfg.finetune.short_side = short_side
    if frame_size:
        try:
            h, w = (int(v) for v in frame_size.lower().split("x"))
        except ValueError:
            raise UsageError(f"--frame-size {frame_size!r} is not HxW", "write it as e.g. 240x426") from None
        cfg.frame_size = (h, w)
    if budget is not None:
        cfg.budget_minutes = budget
    if force:
        cfg.force = True
    cfg.progress = progress
    return cfg


def _echo(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


def _registry(db: str | None, project: str | None) -> Any:
    """The registry of one project of the store at ``db`` (a read-only open: no migration)."""
    from surgenet_assist.core.store import DEFAULT_PROJECT, LabelStore
    from surgenet_assist.training_loop.registry import Registry

    name = project or DEFAULT_PROJECT
    return Registry(LabelStore(db, project=name), project=name)


def register(app: typer.Typer) -> None:
    models_app = typer.Typer(help="Model registry: list, promote, rollback.", no_args_is_help=True)
    app.add_typer(models_app, name="models")

    @app.command("train")
    def train(
        db: DbOpt = None,
        config: ConfigOpt = None,
        random_init: Annotated[bool, typer.Option("--random-init", help="random backbone (tests)")] = False,
        epochs: Annotated[int | None, typer.Option(help="head fine-tuning epochs")] = None,
        short_side: Annotated[int | None, typer.Option(help="model input short side")] = None,
        frame_size: Annotated[
            str | None, typer.Option(help="HxW frames are resized to, e.g. 240x426")
        ] = None,
        promote: Annotated[bool, typer.Option(help="run the promotion gate after registering")] = False,
        project: ProjectOpt = None,
        as_json: JsonOpt = False,
    ) -> None:
        """Fine-tune on the store's train split, evaluate on test, register a candidate (torchrun-ready)."""
        from surgenet_assist.core.store import REJECTED, LabelStore
        from surgenet_assist.training_loop import distributed as ddp
        from surgenet_assist.training_loop.nightly import judge_candidate, train_candidate
        from surgenet_assist.training_loop.registry import Registry

        ddp.init()
        try:
            cfg = _config(config, db, random_init, epochs, short_side, frame_size, project=project)
            store = LabelStore(cfg.db, project=cfg.project, migrate=ddp.is_main())
            result = train_candidate(store, cfg)
            out = {
                "version": result["version"],
                "test": result["test"]["primary"],
                "manifest_hash": result["manifest"],
                "world_size": ddp.world_size(),
                "images_per_second": result["history"].images_per_second,
            }
            if promote and ddp.is_main():  # the nightly cycle's gate, exactly (bootstrap over test videos)
                registry = Registry(store, project=cfg.project)
                decision, _ = judge_candidate(result, registry.champion(), result["splits"], cfg, store)
                if decision.promote:
                    registry.promote(result["version"])
                else:
                    registry.set_status(result["version"], REJECTED)
                out["gate"] = decision.to_dict()
            if ddp.is_main():
                _echo(out) if as_json else typer.echo(f"registered {out['version']}: {out['test']}")
        finally:
            ddp.cleanup()

    @app.command("train-clicks")
    def train_clicks(
        db: DbOpt = None,
        config: ConfigOpt = None,
        random_init: Annotated[bool, typer.Option("--random-init", help="random backbone (tests)")] = False,
        epochs: Annotated[int | None, typer.Option(help="click head training epochs")] = None,
        max_objects: Annotated[int | None, typer.Option(help="at most this many training objects")] = None,
        force: Annotated[bool, typer.Option(help="train even if labels and backbone are unchanged")] = False,
        project: ProjectOpt = None,
        as_json: JsonOpt = False,
    ) -> None:
        """Train the learned click head on the store's masks, gate it by NoC against day one on validation,
        register it (champion or rejected): the nightly cycle's "interactive" stage, run by hand."""
        import dataclasses

        from surgenet_assist.core.store import LabelStore
        from surgenet_assist.training_loop.click_training import click_backbone, run_click_stage

        cfg = _config(config, db, random_init, force=force, progress=not as_json, project=project)
        click = cfg.click
        if epochs is not None:
            click = dataclasses.replace(click, epochs=epochs)
        if max_objects is not None:
            click = dataclasses.replace(click, max_train_objects=max_objects)
        store = LabelStore(cfg.db, project=cfg.project, migrate=True)
        try:
            backbone = click_backbone(store, cfg.project, name=cfg.backbone, random_init=cfg.random_init)
            out = run_click_stage(
                store, backbone, project=cfg.project, config=click, size=cfg.frame_size,
                split_fractions=cfg.split_fractions, force=cfg.force, progress=cfg.progress, strict=True,
            )
        finally:
            store.close()
        if as_json:
            _echo(out)
            return
        typer.echo(out["outcome"])
        for level, m in (out.get("val") or {}).items():
            noc = f"NoC@85 {m['noc85']:.2f}  NoC@90 {m['noc90']:.2f}"
            typer.echo(f"  {level}: {noc}  ({m['objects']} objects)")
        for reason in (out.get("gate") or {}).get("reasons", []):
            typer.echo(f"  gate: {reason}")

    @app.command("evaluate")
    def evaluate(
        model: Annotated[str, typer.Option("--model", help="registry version or bundle directory")],
        db: DbOpt = None,
        config: ConfigOpt = None,
        split: Annotated[str, typer.Option(help="train, val, test or final")] = "test",
        short_side: Annotated[
            int | None, typer.Option(help="model input short side (default: the bundle's preprocessing)")
        ] = None,
        frame_size: Annotated[
            str | None, typer.Option(help="HxW frames are resized to (default: the bundle's preprocessing)")
        ] = None,
        matlab_compat: Annotated[
            bool, typer.Option("--matlab-compat", help="add relaxed phase metrics as the published Cholec80 "
                               "MATLAB script computes them (to compare with published numbers)")
        ] = False,
        project: ProjectOpt = None,
        as_json: JsonOpt = False,
    ) -> None:
        """Metrics of a model on a split of the store, plus annotation-efficiency figures.

        Frames are prepared as the bundle records (its ``preprocessing``: frame size, short side); an explicit
        --short-side / --frame-size overrides that and says so. A bundle without the section is evaluated as
        before: the config's frame size and short side."""
        from surgenet_assist.core.bundle import load_bundle
        from surgenet_assist.core.store import LabelStore
        from surgenet_assist.training_loop.datasets import load_split
        from surgenet_assist.training_loop.evaluate import annotation_efficiency, evaluate_model
        from surgenet_assist.training_loop.registry import Registry

        from .store_commands import require_split

        cfg = _config(
            config, db, short_side=short_side, frame_size=frame_size, progress=not as_json, project=project
        )
        store = LabelStore(cfg.db, project=cfg.project)
        require_split(store, split, cfg.project)
        path = Path(model)
        if not (path / "bundle.json").exists():
            row = Registry(store, project=cfg.project).get(model)
            path = Path(row["bundle_path"])
            thresholds = ((row.get("metrics") or {}).get("params") or {}).get("cvs_thresholds")
        else:
            thresholds = None
        net, info = load_bundle(path, allow_download=not cfg.random_init)
        contract = info.preprocessing
        size, short, temporal_fps = cfg.frame_size, cfg.finetune.short_side, 1.0
        if contract is not None and contract.source != "legacy":
            temporal_fps = contract.temporal_fps
            size = cfg.frame_size if frame_size else (contract.frame_size or cfg.frame_size)
            short = short_side or contract.short_side
            if frame_size or short_side:
                typer.echo(
                    f"explicit override: evaluating at frame size {size} and short side {short}; "
                    f"{info.version} was trained at {contract.frame_size} and {contract.short_side}",
                    err=True,
                )
        data = load_split(store, split, project=cfg.project, size=size, temporal_fps=temporal_fps)
        metrics = evaluate_model(
            net, data.frames, short_side=short, cvs_thresholds=thresholds, video_paths=data.video_paths,
            matlab_compat=matlab_compat,
        )
        metrics = {k: v for k, v in metrics.items() if not k.endswith("_confusion")}
        out = {
            "model": info.version,
            "split": split,
            "counts": data.counts(),
            "metrics": metrics,
            "annotation_efficiency": annotation_efficiency(store, cfg.project),
        }
        if as_json:
            _echo(out)
        else:
            typer.echo(f"{info.version} on {split} ({data.counts()['frames']} frames): {metrics['primary']}")

    @models_app.command("list")
    def models_list(db: DbOpt = None, project: ProjectOpt = None, as_json: JsonOpt = False) -> None:
        """Every version registered in the project, with status, headline metrics and lineage."""
        rows = _registry(db, project).versions()
        if as_json:
            _echo(rows)
            return
        for r in rows:
            primary = ((r.get("metrics") or {}).get("test") or {}).get("primary")
            typer.echo(f"{r['version']:<28} {r['status']:<18} {primary}")

    @models_app.command("promote")
    def models_promote(
        version: Annotated[str, typer.Argument(help="version to serve")],
        db: DbOpt = None,
        project: ProjectOpt = None,
    ) -> None:
        """Make VERSION the project's champion (skips the gate: an operator decision)."""
        registry = _registry(db, project)
        registry.promote(version)
        typer.echo(f"champion of {registry.project}: {version}")

    @models_app.command("rollback")
    def models_rollback(db: DbOpt = None, project: ProjectOpt = None) -> None:
        """Reinstate the project's previous champion."""
        registry = _registry(db, project)
        typer.echo(f"champion of {registry.project}: {registry.rollback()}")

    @app.command("nightly")
    def nightly(
        db: DbOpt = None,
        budget_minutes: Annotated[
            float | None, typer.Option(help="stop training to finish within this")
        ] = None,
        config: ConfigOpt = None,
        from_queue: Annotated[
            bool, typer.Option("--from-queue", help="run only if Label Studio queued one")
        ] = False,
        force: Annotated[bool, typer.Option("--force", help="train even if labels are unchanged")] = False,
        random_init: Annotated[bool, typer.Option("--random-init", help="random backbone (tests)")] = False,
        project: ProjectOpt = None,
        all_projects: Annotated[
            bool,
            typer.Option(
                "--all-projects",
                help="a cycle per project with human labels (--from-queue: per project with a queued run)",
            ),
        ] = False,
        as_json: JsonOpt = False,
    ) -> None:
        """One cycle: ingest, pretrain when due, fine-tune, evaluate, promote or reject, re-score, report."""
        from surgenet_assist.core.errors import SurgenetAssistError
        from surgenet_assist.training_loop.nightly import run_all_projects, run_cycle

        if all_projects and project:
            raise UsageError(
                "--all-projects and --project name different projects", "give one of them, not both"
            )
        from .backend_commands import sync_connected_projects

        sync_connected_projects(db, quiet=as_json)  # labels whose webhooks were lost train tonight too
        cfg = _config(
            config,
            db,
            random_init,
            budget=budget_minutes,
            force=force,
            progress=not as_json,
            project=project,
            default_project=not all_projects,
        )
        if not all_projects:
            report = run_cycle(cfg, from_queue=from_queue)
            if as_json:
                _echo(report)
            else:
                typer.echo(f"{report['outcome']} (report: {report.get('report')})")
            return
        reports = run_all_projects(cfg, from_queue=from_queue)
        if as_json:
            _echo(reports)
        else:
            if not reports:
                why = "nothing queued" if from_queue else "no human labels"
                typer.echo(f"no project to train ({why})")
            for name, report in reports.items():
                typer.echo(f"{name}: {report['outcome']} (report: {report.get('report')})")
        failed = sorted(n for n, r in reports.items() if str(r.get("outcome")).startswith("failed"))
        if failed:
            raise SurgenetAssistError(
                f"the cycle of project(s) {', '.join(failed)} failed (the other projects' cycles ran)",
                "read each failed project's outcome above; rerun one with `nightly --project NAME`",
            )

    @app.command("trainer")
    def trainer(
        db: DbOpt = None,
        config: ConfigOpt = None,
        at: Annotated[str, typer.Option("--at", help="daily cycle time, local HH:MM, or off")] = "02:00",
        poll_seconds: Annotated[float, typer.Option(help="how often to look for queued cycles")] = 60.0,
        budget_minutes: Annotated[float | None, typer.Option(help="time budget of each cycle")] = None,
        project: Annotated[
            str | None,
            typer.Option("--project", help="serve only this store project [default: every project]"),
        ] = None,
    ) -> None:
        """Run forever: the nightly cycle at --at, plus any cycle Label Studio queued (START_TRAINING); for
        every project with human labels (each under its own lock) unless --project names one."""
        from surgenet_assist.training_loop.nightly import parse_daily_time, trainer_loop

        if at != "off":
            parse_daily_time(at)  # refuse a bad time now, not at the first scheduled check
        cfg = _config(
            config, db, budget=budget_minutes, progress=False, project=project, default_project=False
        )
        every = cfg.project is None  # no --project (nor one in --config): every project
        from .backend_commands import sync_connected_projects

        trainer_loop(
            cfg,
            at=None if at == "off" else at,
            poll_s=poll_seconds,
            all_projects=every,
            before_cycle=lambda: sync_connected_projects(cfg.db, quiet=True),
        )
