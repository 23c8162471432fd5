"""`surgenet-assist` command line: the composition root that wires core, backend, napari and training.

Errors a user can fix (bad input, missing weights, ...) are printed on one line, the problem and the fix,
with exit code 2 and no traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from surgenet_assist.core.errors import SurgenetAssistError
from surgenet_assist.core.zoo import DEFAULT_BACKBONE

console = Console(stderr=True)


class _FriendlyErrors(TyperGroup):
    """Shows a SurgenetAssistError as one line, 'Error: ... Fix: ...', with exit code 2 and no traceback."""

    def invoke(self, ctx):  # noqa: ANN001, ANN201 - click's signature
        try:
            return super().invoke(ctx)
        except SurgenetAssistError as exc:
            typer.echo(one_line_error(exc), err=True)
            raise typer.Exit(2) from None


def one_line_error(exc: SurgenetAssistError) -> str:
    """'Error: <problem> Fix: <what to do>' on a single line (messages may carry newlines from libraries)."""
    line = "Error: " + " ".join(exc.message.split())
    return line + " Fix: " + " ".join(exc.hint.split()) if exc.hint else line


app = typer.Typer(
    cls=_FriendlyErrors,
    help="surgenet-assist: SurgeNetXL pre-annotation for surgical video (Label Studio, napari, retraining).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
weights_app = typer.Typer(help="SurgeNet backbone weights: list, download, inspect.", no_args_is_help=True)
app.add_typer(weights_app, name="weights")


# --- weights --------------------------------------------------------------------------------------------
@weights_app.command("list")
def weights_list(
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """List every released SurgeNet backbone with URL, SHA-256, normalisation and licence."""
    from surgenet_assist.core.weights import cached_path
    from surgenet_assist.core.zoo import list_backbones

    specs = list_backbones()
    if as_json:
        typer.echo(json.dumps([s.to_dict() | {"cached": cached_path(s).exists()} for s in specs], indent=2))
        return
    table = Table(title="SurgeNet backbones (weights: CC BY-NC-SA 4.0, non-commercial)")
    for col in ("name", "arch", "pretraining data", "file", "cached"):
        table.add_column(col)
    for s in specs:
        table.add_row(
            s.name, s.arch, s.pretraining_data, s.file_name, "yes" if cached_path(s).exists() else ""
        )
    Console().print(table)


@weights_app.command("download")
def weights_download(
    name: Annotated[str, typer.Argument(help="backbone name, e.g. surgenetxl")] = DEFAULT_BACKBONE,
    from_file: Annotated[
        Path | None, typer.Option(help="copy a file obtained elsewhere into the cache")
    ] = None,
) -> None:
    """Download (or copy in) a backbone's weights, verify SHA-256, and cache them."""
    from surgenet_assist.core.weights import copy_into_cache, ensure_weights
    from surgenet_assist.core.zoo import get_spec

    spec = get_spec(name)
    path = copy_into_cache(spec, from_file) if from_file else ensure_weights(spec)
    typer.echo(str(path))


@weights_app.command("inspect")
def weights_inspect(
    file: Annotated[Path, typer.Argument(help="checkpoint file (.pth)")],
    name: Annotated[str, typer.Option(help="backbone whose architecture to check against")] = (
        DEFAULT_BACKBONE
    ),
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Check a checkpoint against the architecture: missing/unexpected keys, parameters, SHA-256."""
    from surgenet_assist.core.backbone import inspect_checkpoint

    info = inspect_checkpoint(file, name=name)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            typer.echo(f"{key}: {value}")
    if info["missing_keys"] or info["unexpected_keys"] or info["shape_mismatches"]:
        raise typer.Exit(1)


# --- predict --------------------------------------------------------------------------------------------
def _build_predictor(
    model: Path | None,
    weights: Path | None,
    random_init: bool,
    backbone: str,
    batch_size: int | None,
    device: str | None,
    short_side: int | None,
    compile: bool = False,
    cuda_graphs: bool = False,
):
    from surgenet_assist.core.model import SurgeNetAssistModel
    from surgenet_assist.core.predictor import Predictor

    if model is not None:
        return Predictor.from_bundle(
            model,
            batch_size=batch_size,
            device=device,
            short_side=short_side,
            compile=compile,
            cuda_graphs=cuda_graphs,
        )
    if random_init:
        console.print(
            "[yellow]Using a RANDOMLY INITIALISED backbone and untrained heads: outputs are "
            "meaningless except for testing the pipeline.[/]"
        )
    net = SurgeNetAssistModel.create(backbone, weights=weights, random_init=random_init)
    if not random_init:
        console.print(
            "[yellow]No --model bundle given: the heads are untrained (pretrained backbone only).[/]"
        )
    return Predictor(
        net,
        batch_size=batch_size,
        device=device,
        short_side=short_side,
        compile=compile,
        cuda_graphs=cuda_graphs,
    )


@app.command()
def predict(
    input: Annotated[
        list[str],
        typer.Argument(
            help="video file (mp4/avi/mkv), frame folder or image; or an archive: several videos, a folder "
            "of videos, a quoted glob ('archive/**/*.mp4') or a manifest (.txt/.csv/.json)"
        ),
    ],
    out: Annotated[
        Path | None, typer.Option("--out", help="output folder (archive: one sub-folder per video)")
    ] = None,
    model: Annotated[Path | None, typer.Option(help="model bundle directory")] = None,
    weights: Annotated[Path | None, typer.Option(help="backbone checkpoint (without --model)")] = None,
    random_init: Annotated[bool, typer.Option("--random-init", help="random backbone (testing)")] = False,
    backbone: Annotated[str, typer.Option(help="backbone name from `weights list`")] = DEFAULT_BACKBONE,
    fps: Annotated[
        float | None,
        typer.Option(help="frames per second to sample from a video (default: the model's temporal fps)"),
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="frames per forward pass (default: 4 on CPU, by memory on a GPU)")
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 (default: cuda if present)")] = None,
    short_side: Annotated[
        int | None, typer.Option(help="model input short side (default from bundle)")
    ] = None,
    overlay_every: Annotated[int, typer.Option(help="write an overlay PNG every N sampled frames")] = 1,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the model (long videos)")] = False,
    cuda_graphs: Annotated[
        bool, typer.Option("--cuda-graphs", help="compile with CUDA graphs for the fixed batch shape (GPU)")
    ] = False,
    to_store: Annotated[
        bool, typer.Option("--to-store", help="also write predictions into the label store (archive mode)")
    ] = False,
    db: Annotated[
        str | None, typer.Option("--db", help="label store URL (PostgreSQL for multi-node)")
    ] = None,
    store_project: Annotated[str | None, typer.Option(help="store project of the videos")] = None,
    decoder: Annotated[str, typer.Option(help="auto, pyav, opencv or torchcodec (archive mode)")] = "auto",
    decode_workers: Annotated[
        int, typer.Option(help="decoder processes per rank (archive mode, PyAV)")
    ] = 2,
) -> None:
    """Pre-annotate a video: per-frame masks (PNG), phases.csv, cvs.csv, overlays and a phase timeline PNG.

    Given an archive (or --to-store, or under torchrun) it runs resumably over every video, sharded over
    the ranks of `torchrun --nproc-per-node N --nnodes M -m surgenet_assist.cli.main predict ...`."""
    from surgenet_assist.cli import archive_commands
    from surgenet_assist.core.archive import looks_like_archive
    from surgenet_assist.training_loop.distributed import launched_by_torchrun

    def build(dev: str | None):  # noqa: ANN202 - a Predictor
        return _build_predictor(
            model, weights, random_init, backbone, batch_size, dev, short_side, compile, cuda_graphs
        )

    if looks_like_archive(input) or to_store or launched_by_torchrun():
        summary = archive_commands.predict_archive(
            input,
            out=out,
            to_store=to_store,
            db=db,
            store_project=store_project,
            fps=fps,
            decoder=decoder,
            decode_workers=decode_workers,
            overlay_every=overlay_every,
            build_predictor=build,
            device=device,
            console=console,
        )
        if summary is not None:
            archive_commands.print_summary(summary, console)
            archive_commands.exit_code(summary)
        return
    from surgenet_assist.core.errors import UsageError
    from surgenet_assist.core.prediction_writer import PredictionWriter
    from surgenet_assist.core.video import load_image

    if out is None:
        raise UsageError("no output folder", "give --out FOLDER")
    source = Path(input[0])
    predictor = build(device)
    writer = PredictionWriter(out, predictor.schema, overlay_every=overlay_every)
    if source.is_file() and source.suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}:
        image = load_image(source)
        pred = predictor.predict_frame(image)
        writer(pred, image)
        result = predictor.summarise([pred], fps=1.0)
    else:
        sample = fps if fps is not None else predictor.temporal_fps
        result = predictor.predict_video(source, sample_fps=sample, on_frame=writer, progress=True)
    summary = writer.finish(result, extra={"model_version": predictor.model_version, "input": str(source)})
    console.print(f"[green]{summary['frames']} frames pre-annotated[/] -> {out}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="output folder")] = Path("demo-output"),
    seed: Annotated[int, typer.Option(help="seed of the synthetic clips")] = 0,
    train_videos: Annotated[int, typer.Option(help="synthetic training videos")] = 3,
    frames_per_video: Annotated[int, typer.Option(help="frames per synthetic video (1 fps)")] = 60,
    epochs: Annotated[int, typer.Option(help="head fine-tuning epochs")] = 20,
    short_side: Annotated[int, typer.Option(help="model input short side")] = 192,
) -> None:
    """Offline end-to-end demo on synthetic surgery: fine-tune heads, pre-annotate a held-out clip, report."""
    from surgenet_assist.cli.demo import run_demo

    summary = run_demo(
        out,
        seed=seed,
        train_videos=train_videos,
        frames_per_video=frames_per_video,
        epochs=epochs,
        short_side=short_side,
        console=console,
    )
    console.print_json(json.dumps(summary["metrics"]))
    console.print(f"[green]Demo finished[/] -> {out} (bundle, overlays, timeline.png, metrics.md)")


@app.command()
def propagate(
    video: Annotated[Path, typer.Argument(help="video file or frame folder")],
    labels: Annotated[
        str,
        typer.Option(
            help="folder of keyframe masks (frame_000123.png, class ids; optional "
            "phases.csv / cvs.csv with a 'frame' column), or 'store'"
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="output folder")],
    fps: Annotated[float | None, typer.Option(help="sampling rate (default: every frame)")] = None,
    db: Annotated[str | None, typer.Option(help="label store URL, with --labels store")] = None,
    weights: Annotated[Path | None, typer.Option(help="backbone checkpoint")] = None,
    random_init: Annotated[bool, typer.Option("--random-init", help="random backbone (testing)")] = False,
    short_side: Annotated[int, typer.Option(help="feature input short side")] = 256,
) -> None:
    """Carry keyframe labels to the other frames of a video by SurgeNetXL feature similarity (no training)."""
    from surgenet_assist.cli.propagate import run_propagation

    summary = run_propagation(
        video,
        labels,
        out,
        fps=fps,
        db=db,
        weights=weights,
        random_init=random_init,
        short_side=short_side,
        console=console,
    )
    console.print(
        f"[green]{summary['propagated_frames']} frames propagated "
        f"({summary['unreliable_frames']} unreliable)[/] -> {out}"
    )


def _register_front_ends() -> None:
    """Each front-end's command module adds its commands (heavy imports stay inside the commands)."""
    from surgenet_assist.cli import (
        al_commands,
        backend_commands,
        effort_commands,
        store_commands,
        training_commands,
    )

    for module in (store_commands, backend_commands, training_commands, al_commands, effort_commands):
        module.register(app)


_register_front_ends()

if __name__ == "__main__":
    app()
