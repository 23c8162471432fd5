"""Training benchmark: fine-tuning throughput and the wall time of one nightly cycle on synthetic data.

    .venv/bin/python bench/training.py [--frames 500] [--short-side 224] [--size 240x426] [--json OUT]

CPU: heads-only throughput (cached features), throughput with the last backbone stage unfrozen, and one full
nightly cycle (ingest, fine-tune, evaluate, gate, re-score, report) on ``--frames`` labelled frames. On a GPU,
the same plus continued DINO pretraining over ``--pretrain-frames`` frames (default 10,000). The backbone
is random-init (compute is identical to SurgeNetXL's; scores are not the point here).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from surgenet_assist.core.model import SurgeNetAssistModel
from surgenet_assist.core.store import LabelStore
from surgenet_assist.core.synthetic import generate_dataset
from surgenet_assist.training_loop.finetune import FinetuneConfig, LabelledFrames, finetune_heads
from surgenet_assist.training_loop.nightly import NightlyConfig, run_cycle
from surgenet_assist.training_loop.synthetic_store import populate_store


def throughput(
    model: SurgeNetAssistModel, data: LabelledFrames, short: int, stages: int, epochs: int
) -> float:
    cfg = FinetuneConfig(
        epochs=epochs, temporal_epochs=0, short_side=short, batch_size=16, train_backbone_stages=stages
    )
    hist = finetune_heads(copy.deepcopy(model), data, cfg, progress=False)
    return float(hist.images_per_second or 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=500, help="labelled training frames")
    ap.add_argument("--per-video", type=int, default=50)
    ap.add_argument("--size", default="240x426", help="HxW of the synthetic frames")
    ap.add_argument("--short-side", type=int, default=224)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--pretrain-frames", type=int, default=10_000)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--skip-throughput", action="store_true", help="only the nightly cycle (and pretraining)")
    args = ap.parse_args()
    h, w = (int(v) for v in args.size.split("x"))
    home = Path(tempfile.mkdtemp(prefix="bench-training-"))
    os.environ["SURGENET_ASSIST_HOME"] = str(home)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result: dict = {
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch_threads": torch.get_num_threads(),
        "frames": args.frames,
        "size": [h, w],
        "short_side": args.short_side,
    }

    model = SurgeNetAssistModel.create(random_init=True)
    clips = generate_dataset(range(4), 32, h, w)
    sample = LabelledFrames(
        np.concatenate([c.frames for c in clips]),
        np.concatenate([c.masks for c in clips]),
        np.concatenate([c.phases for c in clips]),
        np.concatenate([c.cvs for c in clips]),
    )
    if not args.skip_throughput:
        result["finetune_images_per_s_heads_only"] = round(
            throughput(model, sample, args.short_side, 0, 3), 1
        )
        result["finetune_images_per_s_last_stage_unfrozen"] = round(
            throughput(model, sample, args.short_side, 1, 1), 1
        )
    print(json.dumps(result), flush=True)

    n_train_videos = max(1, args.frames // args.per_video)
    url = f"sqlite:///{home}/store.db"
    store = LabelStore(url, migrate=True)
    t0 = time.perf_counter()
    populate_store(
        store,
        home / "clips",
        list(range(100, 100 + n_train_videos + 2)),
        frames=args.per_video,
        size=(h, w),
        splits=["train"] * n_train_videos + ["val", "test"],
        unlabelled_seeds=[999],
    )
    result["populate_store_s"] = round(time.perf_counter() - t0, 1)
    cfg = NightlyConfig(
        db=url,
        random_init=True,
        frame_size=(h, w),
        progress=True,
        finetune=FinetuneConfig(epochs=args.epochs, short_side=args.short_side, batch_size=16),
    )
    cfg.pretrain.enabled = False
    t0 = time.perf_counter()
    report = run_cycle(cfg)
    result["nightly_cycle_s"] = round(time.perf_counter() - t0, 1)
    result["nightly_timings_s"] = report["timings_s"]
    result["nightly_train_frames"] = report["num_train_frames"]
    result["nightly_outcome"] = report["outcome"]
    result["nightly_finetune_images_per_s"] = report["finetune"]["images_per_second"]

    if device == "cuda":
        from surgenet_assist.training_loop.pretrain import DINOConfig, DINOTrainer, FramePool

        pool = FramePool([(v["path"], v["fps"], i) for v in store.videos() for i in range(v["frame_count"])])
        batch = 64
        dcfg = DINOConfig(steps=max(1, args.pretrain_frames // batch), batch_size=batch, checkpoint_path=None)
        trainer = DINOTrainer(model.backbone, dcfg, device="cuda")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        trainer.train(pool, None, progress=True)
        torch.cuda.synchronize()
        result["pretrain_frames"] = dcfg.steps * batch
        result["pretrain_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
