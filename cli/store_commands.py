"""`db`, `import` and `export` commands of the label store.

``cli/main.py`` calls :func:`register` on its Typer app. Every command takes ``--db URL`` (else
``$SURGENET_ASSIST_DB_URL``, else the SQLite file in the data dir). User errors reach cli/main.py's error
handler, which prints them on one line.
"""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from surgenet_assist.core.errors import DatasetFormatError, UsageError

err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)

DbOption = typer.Option(None, "--db", help="Database URL (sqlite:///file.db or postgresql+psycopg://...).")
ProjectOption = typer.Option("default", "--project", help="Project name in the store.")


def _store(db: str | None, project: str = "default", *, migrate: bool = False) -> Any:
    """Open the store; commands that write pass ``migrate=True`` (create or migrate the schema), commands
    that only read refuse a store that is missing or not migrated, with the `db upgrade` hint."""
    from surgenet_assist.core.store import LabelStore

    return LabelStore(db, project=project, migrate=migrate)


def require_split(store: Any, split: str | None, project: str | None = None) -> None:
    """Refuse a split no frame of the project belongs to: an empty result would look like success."""
    if split is None:
        return
    known = store.split_names(project)
    if split not in known:
        raise UsageError(
            f"no frame of the store is in split {split!r}",
            f"use one of: {', '.join(known)}" if known else "`train` or `nightly` assigns splits to videos",
        )


def require_model_version(store: Any, model_version: str | None) -> None:
    """Refuse a model version that has no stored predictions."""
    if model_version is None:
        return
    known = store.prediction_model_versions()
    if model_version not in known:
        raise UsageError(
            f"no prediction of model version {model_version!r} is stored",
            f"use one of: {', '.join(known)}"
            if known
            else "pre-annotate first (`ls preannotate`, `nightly`)",
        )


LabelConfigOption = typer.Option(
    None,
    "--label-config",
    help="label-studio: the project's labeling config (XML file); default: the one `ls config` generates.",
)


def _label_studio_options(fmt: StrEnum, **given: Any) -> dict[str, Any]:
    """Keyword arguments for the Label Studio importer/exporter; refuses them for other formats."""
    used = {k: v for k, v in given.items() if v not in (None, False)}
    if fmt != "label-studio":
        if used:
            flags = ", ".join("--" + k.replace("_", "-") for k in used)
            raise typer.BadParameter(f"{flags}: only for label-studio")
        return {}
    if given.get("label_config") is not None:
        path = given["label_config"]
        try:
            used["label_config"] = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DatasetFormatError(
                f"cannot read labeling config {path}: {exc}", "give the project's config XML file"
            ) from None
    return used


class ImportFormat(StrEnum):
    cholecseg8k = "cholecseg8k"
    cholec80 = "cholec80"
    endoscapes = "endoscapes"
    label_studio = "label-studio"


class ExportFormat(StrEnum):
    label_studio = "label-studio"
    coco = "coco"
    cholecseg8k = "cholecseg8k"
    cholec80 = "cholec80"


def _print_report(report: Any) -> None:
    data = report.to_dict()
    table = Table(title=f"import {data['dataset']}: {data['source']}")
    table.add_column("what")
    table.add_column("count", justify="right")
    for key, value in data["counts"].items():
        table.add_row(key, str(value))
    table.add_row("skipped", str(data["skipped"]))
    out.print(table)
    for reason, n in data["skipped_by_reason"].items():
        out.print(f"  skipped {n} × {reason}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add the `db`, `import` and `export` sub-commands to ``app``."""
    db_app = typer.Typer(help="Label store database: migrate, inspect.", no_args_is_help=True)
    import_app = typer.Typer(
        help="Import labels from surgical datasets into the label store.", no_args_is_help=True
    )
    export_app = typer.Typer(help="Export labels/predictions from the label store.", no_args_is_help=True)
    app.add_typer(db_app, name="db")
    app.add_typer(import_app, name="import")
    app.add_typer(export_app, name="export")

    @db_app.command("upgrade")
    def db_upgrade(db: str | None = DbOption) -> None:
        """Create the schema or migrate it to the latest revision (keeps every stored row)."""
        from surgenet_assist.core.store import mask_url, resolve_url, upgrade

        rev = upgrade(db)
        out.print(f"{mask_url(resolve_url(db))} is at schema revision {rev}", highlight=False)

    @db_app.command("stats")
    def db_stats(
        db: str | None = DbOption,
        as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    ) -> None:
        """Counts of videos, frames, predictions and human labels per task and per source."""
        store = _store(db)
        try:
            stats = store.stats()
        finally:
            store.close()
        if as_json:
            typer.echo(json.dumps(stats, indent=2, sort_keys=True))
            return
        out.print(f"store: {stats['url']}", highlight=False)
        for key in ("projects", "videos", "frames", "model_versions", "training_runs", "acquisition_scores"):
            out.print(f"  {key}: {stats[key]}")
        out.print(f"  predictions: {stats['predictions']['total']} {stats['predictions']['by_task']}")
        ann = stats["annotations"]
        out.print(f"  human labels: {ann['total']} by task {ann['by_task']} by source {ann['by_source']}")
        prov = ann["provenance"]
        out.print(
            f"    started from a prediction: {prov['from_prediction']} "
            f"{prov['from_prediction_by_model_version']}, not reviewed since: {prov['unreviewed']}, "
            f"ground truth: {prov['ground_truth']}"
        )
        out.print(f"  videos by split: {stats['videos_by_split']}")

    def _make_import(fmt: ImportFormat) -> None:
        @import_app.command(fmt.value)
        def _import(
            path: Path = typer.Argument(..., help="Dataset file or folder."),
            db: str | None = DbOption,
            project: str = ProjectOption,
            as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
            label_config: Path | None = LabelConfigOption,
        ) -> None:
            from surgenet_assist.core.formats import cholec80, cholecseg8k, endoscapes, label_studio

            extra = _label_studio_options(fmt, label_config=label_config)

            fn = {
                ImportFormat.cholecseg8k: cholecseg8k.import_cholecseg8k,
                ImportFormat.cholec80: cholec80.import_cholec80,
                ImportFormat.endoscapes: endoscapes.import_endoscapes,
                ImportFormat.label_studio: label_studio.import_label_studio,
            }[fmt]
            store = _store(db, project, migrate=True)
            try:
                report = fn(store, path, project=project, progress=not as_json, **extra)
            finally:
                store.close()
            if as_json:
                typer.echo(json.dumps(report.to_dict(), indent=2))
            else:
                _print_report(report)

        _import.__doc__ = f"Import {fmt.value} labels (validated first, then written in one transaction)."

    for fmt in ImportFormat:
        _make_import(fmt)

    def _make_export(fmt: ExportFormat) -> None:
        @export_app.command(fmt.value)
        def _export(
            out_path: Path = typer.Option(..., "--out", help="Output file (label-studio, coco) or folder."),
            db: str | None = DbOption,
            project: str = ProjectOption,
            split: str | None = typer.Option(
                None, "--split", help="Only labels of this split (coco, cholecseg8k)."
            ),
            model_version: str | None = typer.Option(
                None, "--model-version", help="label-studio: only this model."
            ),
            label_config: Path | None = LabelConfigOption,
            tasks: Path | None = typer.Option(
                None,
                "--tasks",
                help="label-studio: the project's tasks (its JSON export) to attach the labels to.",
            ),
            annotations: bool = typer.Option(
                False, "--annotations", help="label-studio: also write human labels as annotations."
            ),
        ) -> None:
            from surgenet_assist.core.formats import cholec80, cholecseg8k, coco, label_studio

            extra = _label_studio_options(
                fmt, label_config=label_config, tasks=tasks, annotations=annotations
            )
            store = _store(db, project)
            try:
                require_split(store, split, project)
                require_model_version(store, model_version)
                if fmt is ExportFormat.label_studio:
                    n = label_studio.export_label_studio(
                        store, out_path, model_version=model_version, **extra
                    )
                    what = "annotations and predictions" if annotations else "predictions"
                    msg = f"{n} Label Studio tasks with {what}"
                elif fmt is ExportFormat.coco:
                    counts = coco.export_coco(store, out_path, split=split)
                    msg = f"{counts['images']} images, {counts['annotations']} RLE annotations"
                elif fmt is ExportFormat.cholecseg8k:
                    msg = f"{cholecseg8k.export_cholecseg8k(store, out_path, split=split)} frame masks"
                else:
                    msg = f"{cholec80.export_cholec80(store, out_path)} phase files"
            finally:
                store.close()
            out.print(f"wrote {msg} to {out_path}", highlight=False)

        _export.__doc__ = f"Export human labels (or predictions, for label-studio) as {fmt.value}."

    for fmt in ExportFormat:
        _make_export(fmt)
