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
from surgenet_assist.core.store import (
    ARCHIVED,
    CHAMPION,
    DEFAULT_PROJECT,
    PREVIOUS_CHAMPION,
    REJECTED,
    RUN_FINISHED,
    RUN_RUNNING,
    LabelStore,
)
from surgenet_assist.core.zoo import DEFAULT_BACKBONE

from . import distributed as ddp
from .click_training import ClickTrainConfig
from .datasets import (
    SPLITS,
    SplitData,
    assign_splits,
    combined_manifest_hash,
    label_origins,
    load_split,
    videos_started_from,
)
from .evaluate import (
    annotation_efficiency,
    cvs_thresholds_on,
    evaluate_model,
    overall_score,
    paired_per_video,
)
from .finetune import FinetuneConfig, FinetuneHistory
from .fitting import fit
from .registry import (
    MIN_TEST_VIDEOS,
    GateDecision,
    Registry,
    gap_interval,
    gate,
    next_reference,
)


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
    out_dim: int = 512  # prototypes sized for the batch (training_loop/pretrain.py)


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
    tolerance: float = 0.02  # per task, below the best score ever promoted on the current test split
    rotate_after_reads: int = 10  # candidates judged on one test split before it rotates (docs/nightly.md)
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
    champion: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Fine-tune, evaluate, register a candidate (rank 0). Returns what the cycle reports.

    With ``champion`` (its registry row) the candidate reaches the test split only after beating it on
    validation (:func:`validation_screen`); one that does not is registered with its validation numbers
    only (``test`` None) and the test split is not read. Without it (``surgenet-assist train``) the test
    split is evaluated and :func:`judge_candidate` screens before deciding."""
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
    scorer = SplitScorer(store, cfg, splits)
    result: dict[str, Any] = {"val": val, "scorer": scorer, "test": None}
    if champion is not None:
        result["champion_model"], _ = load_bundle(champion["bundle_path"], allow_download=not cfg.random_init)
        result["val_screen"] = validation_screen(val, result["champion_model"], scorer)
    if result.get("val_screen", {}).get("passed", True):
        result["test"] = scorer.evaluate(model, "test", thresholds)  # per video: the gate's paired test
    test = result["test"]
    version = None
    if ddp.is_main():
        version = registry.register_candidate(
            model,
            metrics=_slim(test) if test is not None else {"not_evaluated": result["val_screen"]["reason"]},
            manifest_hash=manifest,
            seeds={"finetune": cfg.finetune.seed},
            parent=parent,
            params={
                "finetune": dataclasses.asdict(cfg.finetune),
                "frame_size": cfg.frame_size,
                "counts": {s: d.counts() for s, d in splits.items()},
                "val": _slim(val),
                "val_screen": result.get("val_screen"),
                "cvs_thresholds": thresholds,
            },
        )
    version = ddp.broadcast_object(version)
    return result | {
        "version": version,
        "model": model,
        "history": history,
        "manifest": manifest,
        "parent": parent,
        "splits": splits,
        "cvs_thresholds": thresholds,
    }


class SplitScorer:
    """Scores a model on a split of the cycle at the model's own recorded preprocessing (frame size, short
    side, temporal rate), per video, with whole-video temporal context. The candidate is trained at the
    config's, so its frames are the cycle's; a champion trained at another frame size or temporal rate gets
    the split's frames loaded again at its own (once per cycle)."""

    def __init__(self, store: LabelStore, cfg: NightlyConfig, splits: dict[str, SplitData]) -> None:
        self.store, self.cfg, self.splits = store, cfg, splits
        self._loaded: dict[tuple[str, tuple[int, int], float], SplitData] = {}

    def frames(self, model: SurgeNetAssistModel, split: str) -> SplitData:
        contract = model.preprocessing_contract()
        size = tuple(contract.frame_size or self.cfg.frame_size)
        key = (split, size, float(contract.temporal_fps))
        if key == (split, tuple(self.cfg.frame_size), float(self.cfg.finetune.temporal_fps)):
            return self.splits[split]
        if key not in self._loaded:
            self._loaded[key] = load_split(
                self.store, split, project=self.cfg.project, size=size, temporal_fps=key[2]
            )
        return self._loaded[key]

    def evaluate(
        self, model: SurgeNetAssistModel, split: str, thresholds: list[float] | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        data = self.frames(model, split)
        return evaluate_model(
            model, data.frames, short_side=model.preprocessing_contract().short_side,
            cvs_thresholds=thresholds, per_video=True, video_paths=data.video_paths, **kwargs,
        )


def validation_screen(
    val: dict[str, Any], champion: SurgeNetAssistModel, scorer: SplitScorer
) -> dict[str, Any]:
    """Test-reuse policy, first step: the candidate must beat the champion on validation (mean headline
    metric over the tasks both have, the champion scored at its own preprocessing) before the test split is
    read at all. Every read of the test split spends some of its independence; a candidate already worse on
    validation would only spend it."""
    theirs = scorer.evaluate(champion, "val", surface_distance=False)["primary"]
    tasks = sorted(set(val["primary"]) & set(theirs))
    if not tasks:
        why = "no validation labels both models are scored on: the test split is not read (label a val video)"
        return {"passed": False, "reason": why, "candidate": None, "champion": None}
    cand = overall_score({t: val["primary"][t] for t in tasks})
    champ = overall_score({t: theirs[t] for t in tasks})
    passed = cand > champ
    verb = "beats" if passed else "does not beat"
    why = "" if passed else ": the test split is not read"
    reason = f"on validation the candidate ({cand:.4f}) {verb} the champion ({champ:.4f}){why}"
    return {"passed": passed, "reason": reason, "candidate": cand, "champion": champ}


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
        lines += _gate_lines(report)
    if "test_reuse" in report:
        lines += _test_reuse_lines(report["test_reuse"])
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
                k: report.get(k)
                for k in ("outcome", "gate", "candidate_primary", "seconds", "interactive", "test_reuse")
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
    # 1. ingest: rotate the test split when due, split new videos, read the labels
    t_ingest = time.perf_counter()
    report["label_version"] = store.label_version()
    rotation = rotate_test_split(store, cfg, report.get("training_run"))
    if rotation is not None:
        report["test_rotation"] = rotation
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
        result = train_candidate(
            store, cfg, deadline=deadline, splits=splits, model=model, parent=parent, champion=champ
        )
    report["candidate"] = result["version"]
    report["candidate_primary"] = (result["test"] or {}).get("primary")
    report["validation_screen"] = result.get("val_screen")
    report["finetune"] = {
        "steps": result["history"].steps,
        "resumed_from_step": result["history"].resumed_from_step,
        "stopped_early_by_budget": result["history"].stopped_early,
        "images_per_second": result["history"].images_per_second,
    }
    report["_history"], report["_test"] = result["history"], result["test"]

    # 5. the champion on the same test videos, then the gate (also without the test videos whose labels
    # started from a model's pre-annotation: docs/store.md, "Independent test labels")
    t_champ = time.perf_counter()
    origins = label_origins(store, "test", project=cfg.project, unreviewed=cfg.unreviewed_labels)
    decision, champ_primary = judge_candidate(
        result, champ, splits, cfg, store, model_started_videos=videos_started_from(origins)
    )
    report["champion_primary"] = champ_primary
    report["timings_s"]["champion_evaluation"] = round(time.perf_counter() - t_champ, 2)
    report["gate"] = decision.to_dict()
    if decision.promote:
        registry.promote(result["version"])
        report["outcome"] = f"promoted {result['version']}"
    else:
        registry.set_status(result["version"], REJECTED)
        kept = f"champion {report['champion_before']} kept"
        verdict = report["gate"]["verdict"]
        why = "" if verdict == "rejected" else f" ({verdict})"
        report["outcome"] = f"rejected {result['version']}{why}; {kept}"
    after = registry.champion()
    report["champion_after"] = after["version"] if after else None
    with _timed(report, "final_split"):
        report["final_split"] = final_split_report(result, champ, after, splits, cfg)
    report["test_reuse"] = test_reuse_report(
        store, cfg, report.get("training_run"), result, decision, report["final_split"], rotation
    )

    # 6. active learning: re-score unlabeled frames with the serving model
    if after is not None:
        with _timed(report, "rescore"):
            report["acquisition_scores"] = rescore(store, after["bundle_path"], after["version"], cfg)
    report["annotation_efficiency"] = annotation_efficiency(store, cfg.project)
    report["overall"] = {
        "candidate": None if result["test"] is None else overall_score(result["test"]["primary"]),
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


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _gate_lines(report: dict[str, Any]) -> list[str]:
    """The report's gate section: verdict and reasons, the test used, each task against its reference, and
    the place for the verdict without the test videos whose labels started from a model."""
    gate_ = report["gate"]
    lines = ["", "## Promotion gate (test split)", "", f"Verdict: **{gate_.get('verdict', '')}** "]
    lines[-1] += f"({gate_.get('test', '')}, at least {gate_.get('min_videos', '')} test videos)"
    lines += ["", *[f"- {r}" for r in gate_["reasons"]]]
    without = gate_.get("without_model_started")
    lines.append(
        "- without the test videos whose labels started from a model: "
        + (without["reason"] if without else "not measured (the store did not say which those are)")
    )
    lines += ["", "| task | candidate | champion | reference (best promoted on this test split) |"]
    lines.append("|---" * 4 + "|")
    cand, champ = report.get("candidate_primary") or {}, report.get("champion_primary") or {}
    refs = gate_.get("reference") or {}
    for t in sorted(set(cand) | set(champ)):
        ref = refs.get(t)
        ref_text = f"{ref['score']:.4f} ({ref['version']})" if ref else ""
        lines.append(f"| {t} | {_number(cand.get(t))} | {_number(champ.get(t))} | {ref_text} |")
    return lines


def _test_reuse_lines(reuse: dict[str, Any]) -> list[str]:
    """The report's test-reuse section: reads since the last rotation, the gap, the alarm, the rotation."""
    lines = ["", "## Test-split reuse", ""]
    read = "yes" if reuse["read"] else "no (it did not beat the champion on validation)"
    lines.append(
        f"- read by this candidate: {read}; reads since the last rotation: {reuse['reads_since_rotation']} "
        f"of {reuse['rotate_after_reads']}"
    )
    gap = reuse.get("gap") or {}
    if "value" in gap:
        interval = gap["interval"]
        ci = f" (95% CI {interval[0]:+.4f}..{interval[1]:+.4f})" if interval else " (no interval: < 2 videos)"
        lines.append(f"- test-minus-final gap of {gap['version']}: {gap['value']:+.4f}{ci}")
    else:
        lines.append(f"- {gap.get('note', 'no gap')}")
    ref = reuse.get("reference_gap")
    if ref:
        lines.append(f"- reference gap (run {ref['run']}): {ref['value']:+.4f}, interval {ref['interval']}")
    if reuse.get("alarm"):
        lines.append(f"- **alarm**: {reuse['alarm_reason']}")
    if reuse.get("rotation"):
        lines.append(f"- rotation this cycle: {json.dumps(reuse['rotation'])}")
    lines.append(f"- rotation due next cycle: {'yes' if reuse['rotation_due'] else 'no'}")
    return lines


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
    result: dict[str, Any],
    champ: dict[str, Any] | None,
    splits: dict[str, SplitData],
    cfg: NightlyConfig,
    store: LabelStore,
    *,
    model_started_videos: set[int] | None = None,
) -> tuple[GateDecision, dict[str, float] | None]:
    """The promotion gate for a trained candidate (``train_candidate``'s result): the validation screen
    (when ``train_candidate`` did not run it), then the champion re-evaluated on the same test videos at its
    own recorded preprocessing, both scored per test video for the paired test, with each task's regression
    measured against the best score ever promoted on this test split (:func:`regression_reference`).
    ``model_started_videos``: test videos whose labels started from a model prediction; the verdict without
    them is reported next to the decision. Returns the decision (``reference_after`` set) and the champion's
    whole-split headline metrics (its full evaluation goes into ``result["champion_test"]``)."""
    version = result["version"]
    if champ is None:
        decision = gate(result["test"]["primary"], None)
        decision.reference_after = next_reference({}, result["test"]["primary"], version)
        return decision, None
    scorer = result.get("scorer") or SplitScorer(store, cfg, splits)
    champ_model = result.get("champion_model")
    if champ_model is None:
        champ_model, _ = load_bundle(champ["bundle_path"], allow_download=not cfg.random_init)
    screen = result.get("val_screen") or validation_screen(result["val"], champ_model, scorer)
    result["val_screen"] = screen
    if not screen["passed"]:
        reference = _last_reference(store, cfg.project)
        rejected = GateDecision(False, [screen["reason"]], verdict="rejected on validation")
        rejected.reference_after = reference
        return rejected, None
    thresholds = (champ.get("metrics") or {}).get("params", {}).get("cvs_thresholds")
    champ_test = result["champion_test"] = scorer.evaluate(champ_model, "test", thresholds)
    reference = regression_reference(store, cfg, champ, champ_test["primary"], scorer)
    decision = gate(
        result["test"]["primary"], champ_test["primary"], cfg.margin, cfg.tolerance,
        per_video=paired_per_video(result["test"], champ_test), reference=reference,
        model_started_videos=model_started_videos,
    )
    decision.reference_after = (
        next_reference(reference, result["test"]["primary"], version) if decision.promote else reference
    )
    return decision, champ_test["primary"]


#: Statuses of versions that were promoted and not rolled back (a rolled-back one sets no reference).
PROMOTED = (CHAMPION, PREVIOUS_CHAMPION, ARCHIVED)


def _last_reference(store: LabelStore, project: str | None) -> dict[str, dict[str, Any]]:
    """The regression reference the newest judged cycle left (task -> {"score", "version"})."""
    for run in reversed(store.training_runs(task="nightly", project=project)):
        ref = ((run.get("metrics") or {}).get("gate") or {}).get("reference_after")
        if ref:
            return ref
    return {}


def regression_reference(
    store: LabelStore,
    cfg: NightlyConfig,
    champ: dict[str, Any],
    champ_primary: dict[str, float],
    scorer: SplitScorer,
) -> dict[str, dict[str, Any]]:
    """Per task the score the candidate may lose at most ``tolerance`` against: the best score ever promoted,
    on the current test split. The version holding each task's best is carried from cycle to cycle (the
    gate's ``reference_after``) and re-scored here on today's test split, so it follows new test labels and
    rotations; the champion's own score counts too. A holder rolled back or deleted since is dropped."""
    refs = {t: {"score": float(v), "version": champ["version"]} for t, v in champ_primary.items()}
    holders: dict[str, list[str]] = {}
    for task, held in _last_reference(store, cfg.project).items():
        if task in refs and held.get("version") != champ["version"]:
            holders.setdefault(held["version"], []).append(task)
    rows = {r["version"]: r for r in Registry(store, project=cfg.project).frame_versions()}
    for version, tasks in holders.items():
        row = rows.get(version)
        gone = row is None or not Path(row["bundle_path"] or "", "bundle.json").exists()
        if gone or row["status"] not in PROMOTED:
            continue
        model, _ = load_bundle(row["bundle_path"], allow_download=not cfg.random_init)
        thresholds = (row.get("metrics") or {}).get("params", {}).get("cvs_thresholds")
        primary = scorer.evaluate(model, "test", thresholds, surface_distance=False)["primary"]
        for task in tasks:
            if task in primary and primary[task] > refs[task]["score"]:
                refs[task] = {"score": float(primary[task]), "version": version}
    return refs


def final_split_report(
    result: dict[str, Any],
    champ_before: dict[str, Any] | None,
    after: dict[str, Any] | None,
    splits: dict[str, SplitData],
    cfg: NightlyConfig,
) -> dict[str, Any]:
    """The candidate and the serving champion on the ``final`` split, which no decision reads: an estimate
    that promotions on the ``test`` split cannot have tuned. Reported, never used to decide; the serving
    model's per-video scores (``serving``) feed the test-minus-final gap of :func:`test_reuse_report`."""
    final = splits.get("final")
    if final is None or len(final.frames) == 0:
        return {"frames": 0, "note": "no final-split video yet (it gets one as the store grows)"}
    out: dict[str, Any] = {"frames": len(final.frames), "videos": len(final.video_paths)}
    scorer = result["scorer"]
    cand = scorer.evaluate(result["model"], "final", result["cvs_thresholds"], surface_distance=False)
    out["candidate"] = cand["primary"]
    serving = cand if after is not None and after["version"] == result["version"] else None
    if after is not None and after["version"] != result["version"] and champ_before is not None:
        model, _ = load_bundle(after["bundle_path"], allow_download=not cfg.random_init)
        thresholds = (after.get("metrics") or {}).get("params", {}).get("cvs_thresholds")
        serving = scorer.evaluate(model, "final", thresholds, surface_distance=False)
        out["champion"] = serving["primary"]
    if serving is not None and after is not None:
        out["serving"] = {"version": after["version"], "per_video": _per_video_overall(serving)}
    return out


def _per_video_overall(evaluation: dict[str, Any]) -> dict[str, float]:
    """Video id (as text: it goes into JSON) -> mean headline metric of one ``evaluate_model`` result."""
    return {
        str(v): overall_score(p)
        for v, p in zip(evaluation["per_video_ids"], evaluation["per_video_primary"], strict=True)
        if p
    }


# --- test-split reuse: reads, the test-minus-final gap, rotation -----------------------------------------
ROTATION_TASK = "test-rotation"  # training_runs rows that record a rotation of the test split


def _reuse_history(
    store: LabelStore, project: str | None, exclude: int | None = None
) -> list[dict[str, Any]]:
    """The ``test_reuse`` records of the finished nightly runs since the last rotation of the test split
    (the run that rotated included), oldest first; ``exclude``: a run id to leave out (the current one)."""
    rotations = store.training_runs(task=ROTATION_TASK, status=RUN_FINISHED, project=project)
    since = int((rotations[-1].get("params") or {}).get("nightly_run", 0)) if rotations else 0
    out = []
    for run in store.training_runs(task="nightly", project=project):
        reuse = (run.get("metrics") or {}).get("test_reuse")
        if run["id"] >= since and run["id"] != exclude and reuse:
            out.append(reuse | {"run": run["id"]})
    return out


def test_reuse_report(
    store: LabelStore,
    cfg: NightlyConfig,
    run_id: int | None,
    result: dict[str, Any],
    decision: GateDecision,
    final: dict[str, Any],
    rotation: dict[str, Any] | None,
) -> dict[str, Any]:
    """How much the current test split has been used and whether it still tells the truth.

    ``read``: this candidate reached the test split (it beat the champion on validation). ``gap``: the
    serving model's test-minus-final gap of per-video mean headline metrics with its 95% Welch interval.
    The reference is the first gap measured since the test split last rotated; the **alarm** fires when a
    later gap leaves the reference's interval (the test split flatters what was chosen on it, or the final
    split drifted). ``rotation_due``: an alarm since the last rotation, or ``rotate_after_reads`` reads of
    this test split; the next cycle then rotates it (:func:`rotate_test_split`)."""
    history = _reuse_history(store, cfg.project, exclude=run_id)
    read = result.get("test") is not None
    reads = sum(1 for h in history if h.get("read")) + int(read)
    out: dict[str, Any] = {
        "read": read,
        "reads_since_rotation": reads,
        "rotate_after_reads": cfg.rotate_after_reads,
        "rotation": rotation,
        "alarm": False,
    }
    serving = final.get("serving")
    test_eval = result.get("test") if decision.promote else result.get("champion_test")
    if serving is None or test_eval is None:
        out["gap"] = {"note": "no gap this cycle: it needs the serving model scored on test and final"}
    else:
        test_scores = list(_per_video_overall(test_eval).values())
        final_scores = list(serving["per_video"].values())
        gap, interval = gap_interval(test_scores, final_scores)
        out["gap"] = {
            "version": serving["version"],
            "value": gap,
            "interval": list(interval) if interval else None,
            "test_videos": len(test_scores),
            "final_videos": len(final_scores),
        }
        measured = [h["gap"] | {"run": h["run"]} for h in history if (h.get("gap") or {}).get("interval")]
        reference = measured[0] if measured else None
        out["reference_gap"] = reference
        if reference is not None:
            low, high = reference["interval"]
            if not low <= gap <= high:
                out["alarm"] = True
                out["alarm_reason"] = (
                    f"test-minus-final gap {gap:+.4f} left the interval {low:+.4f}..{high:+.4f} of the first "
                    f"gap measured on this test split (run {reference['run']}): it rotates next cycle"
                )
    alarmed = out["alarm"] or any(h.get("alarm") for h in history)
    out["rotation_due"] = bool(alarmed or reads >= cfg.rotate_after_reads)
    return out


def rotate_test_split(store: LabelStore, cfg: NightlyConfig, run_id: int | None) -> dict[str, Any] | None:
    """Rotate the test split when the last judged cycle said it is due (:func:`test_reuse_report`): every
    test video joins the train split (its labels now train; it decided too much to judge any more) and
    every final video becomes a test video (never read by any decision); new videos refill final as they
    enter the store (``core.store.splits``). Needs at least ``MIN_TEST_VIDEOS`` final videos, else it waits
    (and says so).

    Crash-safe: the plan is recorded as a ``test-rotation`` run first, applied in one transaction, then
    marked finished; a plan left unfinished by a killed cycle is applied by the next one."""
    project = cfg.project
    for row in store.training_runs(task=ROTATION_TASK, project=project):
        if row["status"] != RUN_FINISHED:  # interrupted between its record and its end
            _apply_rotation(store, row["params"])
            store.update_training_run(row["id"], status=RUN_FINISHED, finished_at=_now())
    history = _reuse_history(store, project, exclude=run_id)
    if not history or not history[-1].get("rotation_due"):
        return None
    last = history[-1]
    why = last.get("alarm_reason") or f"{last['reads_since_rotation']} candidates read this test split"
    videos = store.videos(project)
    test = [v["id"] for v in videos if v["split"] == "test"]
    final = [v["id"] for v in videos if v["split"] == "final"]
    if len(final) < MIN_TEST_VIDEOS:
        wait = f"the final split has {len(final)} videos; it waits until {MIN_TEST_VIDEOS} can become test"
        return {"rotated": False, "reason": f"rotation due ({why}), but {wait}"}
    plan = {"nightly_run": run_id, "retired_to_train": test, "new_test": final, "why": why}
    row_id = store.record_training_run(task=ROTATION_TASK, status=RUN_RUNNING, params=plan, project=project)
    _apply_rotation(store, plan)
    store.update_training_run(row_id, status=RUN_FINISHED, finished_at=_now())
    return {"rotated": True, **plan}


def _apply_rotation(store: LabelStore, plan: dict[str, Any]) -> None:
    """Move a rotation's videos in one transaction (idempotent: applying it twice changes nothing more)."""

    def move(w: Any) -> None:
        for vid in plan["retired_to_train"]:
            w.set_split(int(vid), "train")
        for vid in plan["new_test"]:
            w.set_split(int(vid), "test")

    store.transaction(move)


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
