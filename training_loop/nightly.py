"""The nightly cycle: ingest -> continued pretraining when due -> fine-tune -> evaluate -> promote or reject
-> re-score unlabeled frames for active learning -> report.

Crash safety: one cycle at a time (``fcntl`` lock file, plus a PostgreSQL advisory lock on a shared
database); every store write is one transaction; the candidate bundle is complete on disk before its row
exists; the champion changes only in the single ``set_model_status`` transaction at the end of the gate.
A ``kill -9`` at any point therefore leaves the old champion serving; the next cycle marks the dead run
``interrupted``, removes orphaned bundle dirs and resumes fine-tuning from the last checkpoint when the
training data are unchanged.

Everything is per store project (one store project per Label Studio project): a cycle trains the labels of
``NightlyConfig.project`` (default ``default``), on that project's splits, against that project's champion,
claims that project's queued runs and writes that project's acquisition queue, under that project's lock, so
the cycles of two projects never block or mix with each other. :func:`run_all_projects` runs one cycle per
project that has human labels; :func:`trainer_loop` (the ``trainer`` service) serves every project unless
one is named.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from surgenet_assist.core.bundle import load_bundle
from surgenet_assist.core.errors import SurgenetAssistError
from surgenet_assist.core.model import SurgeNetAssistModel
from surgenet_assist.core.paths import data_home
from surgenet_assist.core.store import DEFAULT_PROJECT, REJECTED, RUN_RUNNING, LabelStore
from surgenet_assist.core.zoo import DEFAULT_BACKBONE

from . import distributed as ddp
from .click_training import ClickTrainConfig
from .datasets import SPLITS, SplitData, assign_splits, combined_manifest_hash, load_split
from .evaluate import annotation_efficiency, cvs_thresholds_on, evaluate_model, overall_score
from .finetune import FinetuneConfig, FinetuneHistory
from .fitting import fit
from .registry import GateDecision, Registry, gate


class ConfigError(SurgenetAssistError):
    """A training config file or option cannot be used."""


def parse_daily_time(at: str) -> tuple[int, int]:
    """'HH:MM' (24-hour, local time) as (hour, minute); anything else is a ConfigError."""
    try:
        hour, minute = (int(v) for v in at.split(":"))
        dt.time(hour, minute)
    except ValueError:
        raise ConfigError(
            f"--at {at!r} is not a time of day", "write it as HH:MM, e.g. 02:00, or 'off'"
        ) from None
    return hour, minute


class CycleLocked(SurgenetAssistError):
    """Another nightly cycle holds the lock."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


@dataclass
class PretrainSettings:
    enabled: bool = True
    threshold_frames: int = 10_000  # new unlabeled frames since the last pretraining before it is due
    steps: int = 300
    batch_size: int = 32
    global_size: int = 224
    local_size: int = 96
    local_crops: int = 6
    replay_fraction: float = 0.3
    max_frames: int = 20_000
    out_dim: int = 4096


@dataclass
class NightlyConfig:
    """Everything a cycle needs; load overrides from YAML with :meth:`from_file`."""

    db: str | None = None
    project: str | None = None
    backbone: str = DEFAULT_BACKBONE
    random_init: bool = False  # tests / offline demos only
    frame_size: tuple[int, int] = (240, 426)  # frames and masks are resized to this for training/eval
    split_fractions: tuple[float, ...] = (0.6, 0.15, 0.15, 0.1)  # train, val, test (the gate's), final
    # train and judge on labels created from a prediction that nobody has touched since (docs/store.md)
    unreviewed_labels: bool = False
    finetune: FinetuneConfig = field(
        default_factory=lambda: FinetuneConfig(short_side=224, checkpoint_every=25)
    )
    margin: float = 0.005
    tolerance: float = 0.02
    warm_start: bool = True  # start from the champion's weights (heads and backbone)
    pretrain: PretrainSettings = field(default_factory=PretrainSettings)
    rescore_max_frames_per_video: int = 200
    rescore_fps: float = 1.0
    budget_minutes: float | None = None
    force: bool = False  # train even if the labels did not change since the champion
    report_dir: str | None = None
    progress: bool = True
    click_head: bool = True  # train and gate the learned click head (the "interactive" stage)
    click: ClickTrainConfig = field(default_factory=ClickTrainConfig)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NightlyConfig:
        data = dict(data)
        ft = FinetuneConfig(**{**dataclasses.asdict(cls().finetune), **data.pop("finetune", {})})
        pt = PretrainSettings(**data.pop("pretrain", {}))
        data["click"] = ClickTrainConfig(**data.pop("click", {}))
        for key in ("frame_size", "split_fractions"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(finetune=ft, pretrain=pt, **data)

    @classmethod
    def from_file(cls, path: str | Path) -> NightlyConfig:
        """Read a YAML file of overrides; a missing, unreadable or mistyped file is a ConfigError."""
        hint = "give a YAML file of NightlyConfig fields (see docs/nightly.md)"
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read the training config {path}: {exc}", hint) from None
        if not isinstance(data, dict):
            raise ConfigError(f"the training config {path} is not a mapping of fields", hint)
        try:
            return cls.from_dict(data)
        except TypeError as exc:  # an unknown field name
            raise ConfigError(
                f"the training config {path} has a field this version does not know: {exc}", hint
            ) from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- lock --------------------------------------------------------------------------------------------------
def _lock_name(project: str) -> str:
    """``nightly`` for the default project (the name before projects had their own cycles), else
    ``nightly-<project>`` with characters unsafe in a file name replaced."""
    if project == DEFAULT_PROJECT:
        return "nightly"
    return "nightly-" + "".join(c if c.isalnum() or c in "-_." else "_" for c in project)


@contextlib.contextmanager
def cycle_lock(store: LabelStore, path: Path | None = None, project: str | None = None) -> Iterator[None]:
    """Exclusive, non-blocking, per project (default: the store's): a second cycle of the same project fails
    at once; another project's cycle is not blocked. Released by the OS if the process dies."""
    name = _lock_name(project or store.project)
    path = path or data_home() / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+")  # noqa: SIM115 - held for the whole cycle
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CycleLocked(
                f"another training cycle is running (lock {path})",
                "wait for it to finish; a killed cycle releases the lock automatically",
            ) from None
        with store.exclusive_lock(name) as held:  # several trainer hosts on one database
            if not held:
                raise CycleLocked(
                    "another training cycle holds the database lock", "wait for the other trainer to finish"
                )
            fh.seek(0)
            fh.truncate()
            fh.write(f"{os.getpid()} {_now().isoformat()}\n")
            fh.flush()
            yield
    finally:
        fh.close()


# --- one training step: used by the cycle and by `surgenet-assist train` (torchrun-compatible) -------------
def load_parent(cfg: NightlyConfig, registry: Registry | None) -> tuple[SurgeNetAssistModel, str | None]:
    """The champion's model when warm-starting, else a fresh model from the configured backbone."""
    champ = registry.champion() if registry is not None else None
    if champ is not None and cfg.warm_start:
        model, _ = load_bundle(champ["bundle_path"], allow_download=not cfg.random_init)
        return model, champ["version"]
    model = SurgeNetAssistModel.create(cfg.backbone, random_init=cfg.random_init)
    return model, champ["version"] if champ else None


def load_data(store: LabelStore, cfg: NightlyConfig) -> dict[str, SplitData]:
    """Splits assigned on rank 0 only (the others wait), then every rank decodes the same frames."""
    if ddp.is_main():
        assign_splits(store, cfg.split_fractions, cfg.project)
    ddp.barrier()
    show = cfg.progress and ddp.is_main()
    return {
        s: load_split(
            store, s, project=cfg.project, size=cfg.frame_size, temporal_fps=cfg.finetune.temporal_fps,
            progress=show, unreviewed=cfg.unreviewed_labels,
        )
        for s in SPLITS
    }


def train_candidate(
    store: LabelStore,
    cfg: NightlyConfig,
    *,
    deadline: float | None = None,
    splits: dict[str, SplitData] | None = None,
    model: SurgeNetAssistModel | None = None,
    parent: str | None = None,
) -> dict[str, Any]:
    """Fine-tune, evaluate on test, register a candidate (rank 0). Returns what the cycle reports."""
    registry = Registry(store, project=cfg.project)
    splits = splits or load_data(store, cfg)
    if len(splits["train"].frames) == 0:
        raise SurgenetAssistError(
            "no human labels in the train split",
            "label some frames (Label Studio / napari / import) before training",
        )
    manifest = combined_manifest_hash(splits)
    if model is None:
        model, parent = load_parent(cfg, registry)
    history, val = fit(model, splits, cfg, manifest, deadline)
    thresholds = cvs_thresholds_on(model, splits["val"].frames, short_side=cfg.finetune.short_side)
    test = evaluate_model(
        model, splits["test"].frames, short_side=cfg.finetune.short_side, cvs_thresholds=thresholds,
        per_video=True,  # the gate's paired bootstrap, from the same predictions
    )
    version = None
    if ddp.is_main():
        version = registry.register_candidate(
            model,
            metrics=_slim(test),
            manifest_hash=manifest,
            seeds={"finetune": cfg.finetune.seed},
            parent=parent,
            params={
                "finetune": dataclasses.asdict(cfg.finetune),
                "frame_size": cfg.frame_size,
                "counts": {s: d.counts() for s, d in splits.items()},
                "val": _slim(val),
                "cvs_thresholds": thresholds,
            },
        )
    version = ddp.broadcast_object(version)
    return {
        "version": version,
        "model": model,
        "history": history,
        "val": val,
        "test": test,
        "manifest": manifest,
        "parent": parent,
        "splits": splits,
        "cvs_thresholds": thresholds,
    }


def _slim(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if not k.endswith("_confusion") and k != "per_video_primary"}


# --- continued pretraining decision ------------------------------------------------------------------------
def _total_frames(store: LabelStore, project: str | None) -> int:
    return int(sum(v.get("frame_count") or 0 for v in store.videos(project)))


def pretrain_due(store: LabelStore, cfg: NightlyConfig) -> tuple[bool, int]:
    """Due when the store holds ``threshold_frames`` more frames than at the last continued pretraining."""
    runs = store.training_runs(task="pretrain", project=cfg.project)
    done = [r for r in runs if r.get("status") == "finished"]
    last = int((done[-1].get("params") or {}).get("total_frames", 0)) if done else 0
    new = _total_frames(store, cfg.project) - last
    return cfg.pretrain.enabled and new >= cfg.pretrain.threshold_frames, new


# --- active learning ---------------------------------------------------------------------------------------
def rescore(store: LabelStore, bundle_path: str, version: str, cfg: NightlyConfig) -> dict[str, Any]:
    """Active-learning queue (default strategy, plus plain entropy rows) for sampled train-split frames;
    per-task counts of queued frames, see ``acquisition.score_frames``."""
    from .acquisition import score_frames

    result = score_frames(
        store,
        bundle_path,
        version,
        project=cfg.project,
        fps=cfg.rescore_fps,
        max_frames_per_video=cfg.rescore_max_frames_per_video,
        short_side=cfg.finetune.short_side,
        allow_download=not cfg.random_init,
        progress=cfg.progress,
    )
    return {**result["queue"], "strategy": result["strategy"], "frames_scored": result["frames_scored"]}


# --- report ------------------------------------------------------------------------------------------------
def write_report(
    out: Path,
    report: dict[str, Any],
    history: FinetuneHistory | None,
    test: dict[str, Any] | None,
    schema: Any,
) -> Path:
    """Markdown summary + learning curves + confusion matrices, pictures drawn by core.visualize."""
    from surgenet_assist.core.visualize import confusion_png, learning_curves_png

    out.mkdir(parents=True, exist_ok=True)
    pictures = []
    if history is not None:
        learning_curves_png(
            out / "learning_curves.png", history.losses | {"temporal": history.temporal_losses}
        )
        pictures.append("learning_curves.png")
    for key, names, fname in (
        ("segmentation_confusion", schema.class_names, "confusion_segmentation.png"),
        ("phase_confusion", schema.phase_names, "confusion_phase.png"),
    ):
        if test and key in test:
            title = key.replace("_", " ") + " (row-normalised, test split)"
            confusion_png(out / fname, np.asarray(test[key], float), names, title)
            pictures.append(fname)
    lines = [f"# Training cycle {report['started_at']}", "", f"Outcome: **{report['outcome']}**", ""]
    keys = ("candidate", "champion_before", "champion_after", "manifest_hash", "pretraining", "seconds")
    for key in (*keys, "final_split"):
        if key in report:
            lines.append(f"- {key.replace('_', ' ')}: `{json.dumps(report[key], default=str)}`")
    if "gate" in report:
        lines += ["", "## Promotion gate (frozen test split)", ""]
        lines += [f"- {r}" for r in report["gate"]["reasons"]]
        lines += ["", "| task | candidate | champion |", "|---|---|---|"]
        cand, champ = report.get("candidate_primary", {}), report.get("champion_primary") or {}
        for t in sorted(set(cand) | set(champ)):
            c, h = cand.get(t), champ.get(t)
            lines.append(f"| {t} | {'' if c is None else f'{c:.4f}'} | {'' if h is None else f'{h:.4f}'} |")
    if "interactive" in report:
        lines += _interactive_lines(report["interactive"])
    if "annotation_efficiency" in report:
        lines += [
            "",
            "## Annotation efficiency",
            "",
            "```json",
            json.dumps(report["annotation_efficiency"], indent=2),
            "```",
        ]
    lines += ["", "## Pictures", ""] + [f"![{p}]({p})" for p in pictures]
    lines += ["", "## Full record", "", "```json", json.dumps(report, indent=2, default=str), "```", ""]
    (out / "report.md").write_text("\n".join(lines))
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    return out / "report.md"


# --- the cycle ---------------------------------------------------------------------------------------------
def run_cycle(cfg: NightlyConfig, from_queue: bool = False) -> dict[str, Any]:
    """One full cycle of ``cfg.project`` (default: ``default``) under that project's lock; returns the report
    dict (also written as Markdown + PNGs). ``from_queue``: only if the project has a queued run (claimed)."""
    project = cfg.project or DEFAULT_PROJECT
    cfg = dataclasses.replace(cfg, project=project)
    store = LabelStore(cfg.db, project=project, migrate=True)
    try:
        return _run_cycle(store, cfg, from_queue)
    finally:
        store.close()


def _run_cycle(store: LabelStore, cfg: NightlyConfig, from_queue: bool) -> dict[str, Any]:
    started = time.time()
    deadline = started + cfg.budget_minutes * 60 if cfg.budget_minutes else None
    project = store.project
    report: dict[str, Any] = {"started_at": _now().isoformat(timespec="seconds"), "project": project}
    with cycle_lock(store):
        registry = Registry(store, project=project)
        report["interrupted_runs_closed"] = store.close_interrupted_runs(task="nightly", project=project)
        report["orphans_removed"] = registry.remove_orphans()
        if from_queue:
            row = store.claim_queued_run(task="nightly", project=project)
            if row is None:
                return {"outcome": "nothing queued", "project": project}
            run_id = row["id"]
        else:
            run_id = store.record_training_run(
                task="nightly", status=RUN_RUNNING, params={"trigger": "nightly"}, project=project
            )
        report["training_run"] = run_id
        try:
            _cycle(store, registry, cfg, report, deadline)
            if cfg.click_head:  # also when the whole-frame model was skipped: the click head has its own data
                with _timed(report, "interactive"):
                    report["interactive"] = click_stage(store, cfg, deadline)
            status = "finished"
        except BaseException as exc:
            report["outcome"] = f"failed: {getattr(exc, 'message', exc)!s}"
            store.update_training_run(
                run_id,
                status="failed",
                finished_at=_now(),
                metrics={"error": str(getattr(exc, "message", exc))[:500]},
            )
            raise
        report["seconds"] = round(time.time() - started, 1)
        stamp = report["started_at"].replace(":", "")
        out = (
            Path(cfg.report_dir)
            if cfg.report_dir
            else data_home() / "reports" / (stamp if project == DEFAULT_PROJECT else f"{stamp}-{project}")
        )
        report["report"] = str(
            write_report(out, report, report.pop("_history", None), report.pop("_test", None), store.schema)
        )
        store.update_training_run(
            run_id,
            status=status,
            finished_at=_now(),
            model_version=report.get("candidate"),
            metrics={
                k: report.get(k) for k in ("outcome", "gate", "candidate_primary", "seconds", "interactive")
            },
            num_labels=report.get("num_train_frames"),
            max_revision_id=report.get("label_version"),
        )
    return report


@contextlib.contextmanager
def _timed(report: dict[str, Any], name: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        report.setdefault("timings_s", {})[name] = round(time.perf_counter() - t0, 2)


def _cycle(
    store: LabelStore, registry: Registry, cfg: NightlyConfig, report: dict[str, Any], deadline: float | None
) -> None:
    # 1. ingest: split new videos, read the labels
    t_ingest = time.perf_counter()
    report["label_version"] = store.label_version()
    splits = load_data(store, cfg)
    manifest = combined_manifest_hash(splits)
    report["manifest_hash"] = manifest
    report["counts"] = {s: d.counts() for s, d in splits.items()}
    report["num_train_frames"] = len(splits["train"].frames)
    report.setdefault("timings_s", {})["ingest"] = round(time.perf_counter() - t_ingest, 2)
    champ = registry.champion()
    report["champion_before"] = champ["version"] if champ else None
    if len(splits["train"].frames) == 0:
        report["outcome"] = "skipped: no human labels in the train split"
        return
    if champ and not cfg.force and (champ.get("metrics") or {}).get("manifest_hash") == manifest:
        report["outcome"] = "skipped: labels unchanged since the champion was trained"
        report["champion_after"] = champ["version"]
        return
    model, parent = load_parent(cfg, registry)

    # 2. continued self-supervised pretraining when enough new frames arrived
    due, new_frames = pretrain_due(store, cfg)
    report["pretraining"] = {"due": due, "new_frames": new_frames}
    if due:
        from .pretrain import continue_pretraining, select_backbone

        budget = None if deadline is None else time.time() + 0.4 * (deadline - time.time())
        t_pre = time.perf_counter()
        adapted, info = continue_pretraining(store, model.backbone, cfg, deadline=budget)
        if info["collapsed"]:  # uniform outputs: nothing learnt, not worth a validation fit
            choice = {"kept": False, "val_scores": {"collapsed": True}, "model": model}
        else:
            choice = select_backbone(model, adapted, splits, cfg, manifest, deadline)
        report["pretraining"] |= info | {"kept": choice["kept"], "val_scores": choice["val_scores"]}
        store.record_training_run(
            task="pretrain",
            status="finished",
            params={"total_frames": _total_frames(store, cfg.project), **info},
            metrics={"kept": choice["kept"], "val_scores": choice["val_scores"]},
            project=cfg.project,
        )
        model = choice["model"]
        report["timings_s"]["pretraining_and_backbone_gate"] = round(time.perf_counter() - t_pre, 2)

    # 3.-4. fine-tune and evaluate the candidate, register it
    with _timed(report, "finetune_evaluate_register"):
        result = train_candidate(store, cfg, deadline=deadline, splits=splits, model=model, parent=parent)
    report["candidate"] = result["version"]
    report["candidate_primary"] = result["test"]["primary"]
    report["finetune"] = {
        "steps": result["history"].steps,
        "resumed_from_step": result["history"].resumed_from_step,
        "stopped_early_by_budget": result["history"].stopped_early,
        "images_per_second": result["history"].images_per_second,
    }
    report["_history"], report["_test"] = result["history"], result["test"]

    # 5. the champion on the same frozen test data, then the gate
    t_champ = time.perf_counter()
    decision, champ_primary = judge_candidate(result, champ, splits, cfg)
    report["champion_primary"] = champ_primary
    report["timings_s"]["champion_evaluation"] = round(time.perf_counter() - t_champ, 2)
    report["gate"] = decision.to_dict()
    if decision.promote:
        registry.promote(result["version"])
        report["outcome"] = f"promoted {result['version']}"
    else:
        registry.set_status(result["version"], REJECTED)
        report["outcome"] = f"rejected {result['version']}; champion {report['champion_before']} kept"
    after = registry.champion()
    report["champion_after"] = after["version"] if after else None
    with _timed(report, "final_split"):
        report["final_split"] = final_split_report(result, champ, after, splits, cfg)

    # 6. active learning: re-score unlabeled frames with the serving model
    if after is not None:
        with _timed(report, "rescore"):
            report["acquisition_scores"] = rescore(store, after["bundle_path"], after["version"], cfg)
    report["annotation_efficiency"] = annotation_efficiency(store, cfg.project)
    report["overall"] = {
        "candidate": overall_score(result["test"]["primary"]),
        "champion": None if champ_primary is None else overall_score(champ_primary),
    }


def click_stage(store: LabelStore, cfg: NightlyConfig, deadline: float | None) -> dict[str, Any]:
    """The learned click head: trained on the serving champion's backbone (that is where the click engine
    reads its features), gated by NoC on validation against day one and the interactive champion. Its
    failure is reported, not raised: the whole-frame model's outcome of this cycle stands."""
    import logging

    from .click_training import click_backbone, run_click_stage

    try:
        backbone = click_backbone(store, cfg.project, name=cfg.backbone, random_init=cfg.random_init)
        return run_click_stage(
            store, backbone, project=cfg.project, config=cfg.click, size=cfg.frame_size,
            split_fractions=cfg.split_fractions, deadline=deadline, force=cfg.force, progress=cfg.progress,
        )
    except Exception as exc:  # noqa: BLE001 - see the docstring
        logging.getLogger("surgenet_assist.nightly").exception("click head stage failed")
        return {"outcome": f"failed: {getattr(exc, 'message', exc)!s}"}


def _interactive_lines(section: dict[str, Any]) -> list[str]:
    """The report's "interactive" section: both levels' NoC on validation and the gate's decision."""
    lines = ["", "## Interactive click head (validation NoC, lower is better)", ""]
    lines.append(f"Outcome: {section['outcome']}")
    lines += [f"- {r}" for r in (section.get("gate") or {}).get("reasons", [])]
    val = section.get("val") or {}
    if val:
        lines += ["", "| level | NoC@85 | NoC@90 | IoU@1 | IoU@3 | IoU@5 | objects |", "|---" * 7 + "|"]
        for level, m in val.items():
            cells = [f"{m.get(k, float('nan')):.2f}" for k in ("noc85", "noc90", "iou@1", "iou@3", "iou@5")]
            lines.append(f"| {level} | {' | '.join(cells)} | {m.get('objects', 0)} |")
    return lines


def judge_candidate(
    result: dict[str, Any], champ: dict[str, Any] | None, splits: dict[str, SplitData], cfg: NightlyConfig
) -> tuple[GateDecision, dict[str, float] | None]:
    """The promotion gate for a trained candidate (``train_candidate``'s result): the champion re-evaluated
    on the same frozen test frames at its own recorded preprocessing, both scored per test video for the
    paired bootstrap. Returns the decision and the champion's whole-split headline metrics."""
    champ_primary, per_video = None, None
    if champ is not None:
        champ_model, _ = load_bundle(champ["bundle_path"], allow_download=not cfg.random_init)
        thresholds = (champ.get("metrics") or {}).get("params", {}).get("cvs_thresholds")
        champ_test = evaluate_model(
            champ_model, splits["test"].frames, cvs_thresholds=thresholds, per_video=True
        )
        champ_primary = champ_test["primary"]
        per_video = list(
            zip(result["test"]["per_video_primary"], champ_test["per_video_primary"], strict=True)
        )
    decision = gate(result["test"]["primary"], champ_primary, cfg.margin, cfg.tolerance, per_video=per_video)
    return decision, champ_primary


def final_split_report(
    result: dict[str, Any],
    champ_before: dict[str, Any] | None,
    after: dict[str, Any] | None,
    splits: dict[str, SplitData],
    cfg: NightlyConfig,
) -> dict[str, Any]:
    """The candidate and the serving champion on the ``final`` split, which no decision reads: an estimate
    that promotions on the ``test`` split cannot have tuned. Reported, never used to decide."""
    final = splits.get("final")
    if final is None or len(final.frames) == 0:
        return {"frames": 0, "note": "no final-split video yet (it gets one as the store grows)"}
    out: dict[str, Any] = {"frames": len(final.frames), "videos": len(final.video_paths)}
    out["candidate"] = evaluate_model(
        result["model"], final.frames, short_side=cfg.finetune.short_side,
        cvs_thresholds=result["cvs_thresholds"], surface_distance=False,
    )["primary"]
    if after is not None and after["version"] != result["version"] and champ_before is not None:
        model, _ = load_bundle(after["bundle_path"], allow_download=not cfg.random_init)
        thresholds = (after.get("metrics") or {}).get("params", {}).get("cvs_thresholds")
        out["champion"] = evaluate_model(
            model, final.frames, cvs_thresholds=thresholds, surface_distance=False
        )["primary"]
    return out


def run_all_projects(cfg: NightlyConfig, from_queue: bool = False) -> dict[str, dict[str, Any]]:
    """One cycle per project (``from_queue``: per project with a queued run; else: per project with live
    human labels), one after the other, each under its own lock; returns project -> report. A project whose
    cycle fails (or is locked) gets ``{"outcome": "failed: ..."}`` (``"locked: ..."``) and the others still
    run."""
    with LabelStore(cfg.db, migrate=True) as store:
        projects = store.queued_run_projects() if from_queue else store.projects(with_human_labels=True)
    reports: dict[str, dict[str, Any]] = {}
    for project in projects:
        try:
            reports[project] = run_cycle(dataclasses.replace(cfg, project=project), from_queue=from_queue)
        except CycleLocked as exc:
            reports[project] = {"outcome": f"locked: {exc.message}", "project": project}
        except Exception as exc:  # noqa: BLE001 - one project's failure must not stop the others
            reports[project] = {"outcome": f"failed: {getattr(exc, 'message', exc)!s}", "project": project}
    return reports


def _has_queued_runs(cfg: NightlyConfig) -> bool:
    with LabelStore(cfg.db, migrate=True) as store:
        return bool(store.queued_run_projects())


def trainer_loop(
    cfg: NightlyConfig,
    at: str | None = "02:00",
    poll_s: float = 60.0,
    max_loops: int | None = None,
    all_projects: bool | None = None,
    before_cycle: Callable[[], object] | None = None,
) -> None:
    """The ``trainer`` service: a full cycle once a day at ``at`` (local HH:MM) and a cycle whenever Label
    Studio queued one (START_TRAINING). A failed cycle is logged and retried at the next occasion.

    ``all_projects`` (default: when ``cfg.project`` is None) serves every project: the daily cycle of each
    project that has human labels, and the queued runs of any project (the webhook queues a run in the
    Label Studio project's store project), each project under its own lock. ``before_cycle`` runs first
    whenever a cycle is about to run (the CLI passes the Label Studio reconciliation, so training sees every
    label even when webhooks were lost); its failure is logged and the cycle still runs."""
    import logging

    log = logging.getLogger("surgenet_assist.trainer")
    every = cfg.project is None if all_projects is None else all_projects
    hour, minute = parse_daily_time(at) if at else (99, 0)  # None: queued cycles only
    last_day = None
    loops = 0
    while max_loops is None or loops < max_loops:
        loops += 1
        now = dt.datetime.now()
        due = (now.hour, now.minute) >= (hour, minute) and last_day != now.date()
        if due:
            last_day = now.date()
        kind = "scheduled" if due else "queued"
        if before_cycle is not None and (due or _has_queued_runs(cfg)):
            try:
                before_cycle()
            except Exception:  # noqa: BLE001 - a failed reconciliation must not stop training
                log.exception("before the %s cycle", kind)
        try:
            if every:
                reports = run_all_projects(cfg, from_queue=not due)
            else:
                reports = {cfg.project or DEFAULT_PROJECT: run_cycle(cfg, from_queue=not due)}
            for project, report in reports.items():
                outcome = report.get("outcome")
                if outcome == "nothing queued" or str(outcome).startswith("locked:"):
                    continue
                if str(outcome).startswith("failed:"):
                    log.error("%s cycle of project %s: %s", kind, project, outcome)
                else:
                    log.warning("%s cycle of project %s: %s", kind, project, outcome)
        except CycleLocked:
            pass
        except Exception:  # noqa: BLE001 - the service keeps running; the run row says what failed
            log.exception("training cycle failed")
        if max_loops is None or loops < max_loops:
            time.sleep(poll_s)
