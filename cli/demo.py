"""The README's first command: an offline, self-contained run of the whole pre-annotation job.

Synthetic laparoscopic clips stand in for a team's videos: the heads are fine-tuned on a few labelled
clips, a held-out clip is pre-annotated from an mp4 file through the real Predictor, and the results
(bundle, overlays, timeline, metrics against ground truth) land in the output folder.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

import numpy as np
from rich.console import Console

from surgenet_assist.core.bundle import save_bundle
from surgenet_assist.core.model import SurgeNetAssistModel
from surgenet_assist.core.prediction_writer import PredictionWriter
from surgenet_assist.core.predictor import Predictor
from surgenet_assist.core.synthetic import generate_dataset
from surgenet_assist.core.visualize import learning_curves_png
from surgenet_assist.core.weights import cached_path
from surgenet_assist.core.zoo import DEFAULT_BACKBONE, get_spec
from surgenet_assist.training_loop.finetune import FinetuneConfig, LabelledFrames, finetune_heads
from surgenet_assist.training_loop.metrics import SegmentationAccumulator, cvs_metrics, phase_metrics


def _majority_baseline(train_phases: np.ndarray, test_phases: np.ndarray, num_phases: int) -> dict:
    majority = np.bincount(train_phases, minlength=num_phases).argmax()
    return phase_metrics(np.full_like(test_phases, majority), test_phases, num_phases)


def run_demo(
    out: Path,
    seed: int = 0,
    train_videos: int = 3,
    frames_per_video: int = 60,
    epochs: int = 25,
    short_side: int = 192,
    height: int = 240,
    width: int = 426,
    console: Console | None = None,
) -> dict:
    console = console or Console(stderr=True)
    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    spec = get_spec(DEFAULT_BACKBONE)
    if cached_path(spec).exists():
        console.print(f"Backbone: SurgeNetXL weights from {cached_path(spec)}")
        model = SurgeNetAssistModel.create(DEFAULT_BACKBONE, allow_download=False)
        backbone_note = "SurgeNetXL (pretrained)"
    else:
        console.print(
            "[bold yellow]SurgeNetXL weights are not cached: "
            "this demo uses a RANDOMLY INITIALISED backbone.[/] "
            "Scores will be far below what SurgeNetXL gives. Get the weights with "
            "`surgenet-assist weights download surgenetxl` (or --from-file on an offline machine)."
        )
        model = SurgeNetAssistModel.create(DEFAULT_BACKBONE, random_init=True)
        backbone_note = "random-init (SurgeNetXL weights not cached)"
    model.backbone.input_size = (short_side, int(round(short_side * 16 / 9 / 32)) * 32)

    console.print(f"Generating {train_videos + 1} synthetic clips of {frames_per_video} frames ...")
    clips = generate_dataset(
        [seed * 1000 + i for i in range(train_videos + 1)], frames_per_video, height, width, fps=1.0
    )
    train, test = clips[:-1], clips[-1]
    data = LabelledFrames(
        images=np.concatenate([c.frames for c in train]),
        masks=np.concatenate([c.masks for c in train]),
        phases=np.concatenate([c.phases for c in train]),
        cvs=np.concatenate([c.cvs for c in train]),
        video_ids=np.concatenate([np.full(len(c), i) for i, c in enumerate(train)]),
    )
    history = finetune_heads(model, data, FinetuneConfig(epochs=epochs, short_side=short_side, seed=seed))
    version = f"demo-{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}"
    bundle = save_bundle(
        model,
        out / "model-bundle",
        version=version,
        overwrite=True,
        training={
            "data": "synthetic",
            "synthetic_world": test.world,
            "train_frames": len(data),
            "epochs": epochs,
            "seed": seed,
            "backbone": backbone_note,
            "final_losses": {k: v[-1] for k, v in history.losses.items() if v},
        },
    )
    learning_curves_png(out / "learning_curves.png", history.losses | {"temporal": history.temporal_losses})

    video_path = test.write_video(out / "held_out_clip.mp4")
    predictor = Predictor.from_bundle(bundle, batch_size=8)
    writer = PredictionWriter(out / "pre-annotations", predictor.schema)
    seg = SegmentationAccumulator(predictor.schema.num_classes)

    def on_frame(pred, image) -> None:
        writer(pred, image)
        seg.update(pred.mask, test.masks[pred.index])

    console.print(f"Pre-annotating the held-out clip {video_path.name} ...")
    result = predictor.predict_video(video_path, sample_fps=None, on_frame=on_frame, progress=True)
    schema = predictor.schema
    metrics = {
        "segmentation": {k: v for k, v in seg.result().items() if not k.endswith("per_class")},
        "phase": phase_metrics(result.phase_labels, test.phases[result.indices], schema.num_phases),
        "phase_majority_baseline": _majority_baseline(data.phases, test.phases, schema.num_phases),
        "cvs": cvs_metrics(result.cvs_probs, test.cvs[result.indices], schema.cvs_keys),
    }
    writer.finish(
        result,
        ground_truth_phases=test.phases[result.indices],
        extra={"model_version": version, "metrics": metrics},
    )
    summary = {
        "model_version": version,
        "backbone": backbone_note,
        "synthetic_world": test.world,
        "train_frames": len(data),
        "test_frames": len(result.indices),
        "seconds": round(time.perf_counter() - started, 1),
        "metrics": metrics,
    }
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    (out / "metrics.md").write_text(_markdown(summary))
    return summary


def _markdown(summary: dict) -> str:
    m = summary["metrics"]
    return "\n".join(
        [
            f"# surgenet-assist demo — {summary['model_version']}",
            "",
            f"Backbone: {summary['backbone']}. Trained on {summary['train_frames']} synthetic frames "
            f"(world {summary['synthetic_world']}), "
            f"evaluated on a held-out clip of {summary['test_frames']} frames; "
            f"{summary['seconds']} s in total.",
            "",
            "| task | metric | value |",
            "|---|---|---|",
            f"| segmentation | mIoU | {m['segmentation']['mIoU']:.3f} |",
            f"| segmentation | mDice | {m['segmentation']['mDice']:.3f} |",
            f"| phase | accuracy | {m['phase']['accuracy']:.3f} |",
            f"| phase | macro-F1 | {m['phase']['macro_f1']:.3f} |",
            f"| phase | accuracy of always guessing the most common phase | "
            f"{m['phase_majority_baseline']['accuracy']:.3f} |",
            f"| CVS | mAP | {m['cvs']['mAP']:.3f} |",
            f"| CVS | balanced accuracy | {m['cvs']['balanced_accuracy']:.3f} |",
            "",
            "Pictures: `pre-annotations/timeline.png`, `pre-annotations/overlays/`, `learning_curves.png`.",
            "",
        ]
    )
