"""One fine-tuning fit with a resumable checkpoint: shared by the nightly cycle and the backbone gate of
continued pretraining (``pretrain.select_backbone``), so neither imports the other."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

from surgenet_assist.core.backbone import state_dict_sha256
from surgenet_assist.core.model import SurgeNetAssistModel
from surgenet_assist.core.paths import data_home

from . import distributed as ddp
from .datasets import SplitData
from .evaluate import evaluate_model
from .finetune import FinetuneHistory, finetune_heads


def work_dir(key: str) -> Path:
    """Checkpoint folder of one fit (``data_home()/work/<key>``)."""
    return data_home() / "work" / key


def fit(
    model: SurgeNetAssistModel,
    splits: dict[str, SplitData],
    cfg: Any,
    manifest: str,
    deadline: float | None,
    tag: str = "main",
) -> tuple[FinetuneHistory, dict[str, Any]]:
    """Fine-tune ``model`` in place on train (checkpointed), return history and val metrics (per video too:
    the backbone gate's paired test reads them).

    ``cfg`` is a ``nightly.NightlyConfig`` (its ``finetune`` and ``progress``). The checkpoint folder is keyed
    by the training data (``manifest``), the fine-tuning settings, ``tag`` and the starting weights, so a
    killed run resumes only when all of them are unchanged.
    """
    ft = dataclasses.replace(cfg.finetune, deadline=deadline)
    start = state_dict_sha256(model.state_dict())  # the starting weights (parent backbone and heads)
    key = hashlib.sha256((manifest + ft.key() + tag + start).encode()).hexdigest()
    ft.checkpoint_dir = str(work_dir(key[:20]))
    history = finetune_heads(model, splits["train"].frames, ft, progress=cfg.progress and ddp.is_main())
    val_split = splits["val"]
    val = evaluate_model(
        model, val_split.frames, short_side=ft.short_side, per_video=True, video_paths=val_split.video_paths
    )
    return history, val
