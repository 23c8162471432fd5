"""Model registry: immutable bundles under ``data_home()/registry/<version>/`` plus rows in the label store.

One registry per store project (one store project per Label Studio project): a :class:`Registry` reads and
promotes the versions of its project only, so each project has its own champion; version names stay unique
across projects (they name the bundle directories, which all projects share).

A version is written once (``save_bundle`` writes a temp dir and renames it) and then registered as a
``candidate`` row with its metrics and lineage (training-manifest hash, code version, seeds, parent). Only
the promotion gate (or an explicit ``promote``) makes it ``champion``; the store demotes the old champion
to ``previous-champion`` in the same transaction, which is what ``rollback`` moves back. The backend
reads the row with status ``champion`` and its ``bundle_path``, so serving follows the registry without a
restart. A ``CHAMPION`` pointer file (written atomically; ``CHAMPION-<project>`` for a project other than
``default``) mirrors the project's current champion for file readers.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from surgenet_assist.core.bundle import read_bundle_info, save_bundle
from surgenet_assist.core.errors import SurgenetAssistError
from surgenet_assist.core.model import SurgeNetAssistModel
from surgenet_assist.core.paths import data_home
from surgenet_assist.core.store import (
    CHAMPION,
    DEFAULT_PROJECT,
    PREVIOUS_CHAMPION,
    LabelStore,
    is_frame_model,
)

from .evaluate import overall_score


class RegistryError(SurgenetAssistError):
    """A registry operation cannot be done (unknown version, nothing to roll back to, ...)."""


def registry_root() -> Path:
    return data_home() / "registry"


def code_version() -> str:
    """Git commit of the source tree if available, else the installed package version."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--", "."],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return "surgenet-assist " + version("surgenet-assist")
        except PackageNotFoundError:
            return "unknown"


def new_version(prefix: str = "v") -> str:
    """Sortable, unique: ``v20250101-120000-a1b2``."""
    return f"{prefix}{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def bundle_hash(path: str | Path) -> str:
    """Hash of the bundle's recorded file hashes and backbone hash (what defines its behaviour)."""
    info = read_bundle_info(path)
    blob = json.dumps({"files": info.files, "backbone": info.backbone.get("weights_sha256")}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


#: Fewer test videos than this and the gate does not decide: the verdict is "insufficient evidence" and the
#: champion stays. With two videos a t-interval has one degree of freedom (its 97.5% quantile is 12.7) and a
#: gain "carried by two videos" is all the evidence there is; three is the smallest split where a consistent
#: gain can clear the margin and no single video decides. A 20-video store (15% test) has three.
MIN_TEST_VIDEOS = 3

#: Two-sided confidence of every promotion interval; the gate promotes when the LOWER bound clears the
#: margin, a one-sided test at (1 - CONFIDENCE) / 2 = 2.5%: the nominal false-promotion rate at true gain =
#: margin.
CONFIDENCE = 0.95

PAIRED_TEST = "paired t-interval over videos"

#: Outcomes of :func:`paired_test`.
BETTER, NOT_BETTER, INSUFFICIENT = "better", "not better", "insufficient evidence"


def paired_interval(deltas: Any, level: float = CONFIDENCE) -> tuple[np.ndarray, np.ndarray]:
    """Student-t interval of the mean of paired differences (one per video), along the last axis.

    Why t and not a bootstrap: with the few test videos a store has, the percentile bootstrap's interval is
    too narrow (it resamples 2 or 3 numbers), so it promoted 24% of the time with 2 videos and 11% with 3 at
    true gain = margin, where 2.5% was intended. The t-interval has the nominal coverage for normal per-video
    differences at every n >= 2, and is conservative for symmetric heavier tails. Vectorised (``deltas`` of
    shape (..., n)) so the false-promotion simulation runs this very function. Zero spread gives a zero-width
    interval at the mean.
    """
    d = np.asarray(deltas, np.float64)
    n = d.shape[-1]
    if n < 2:
        raise ValueError(f"an interval needs at least 2 paired differences, got {n}")
    mean = d.mean(-1)
    half = stats.t.ppf(0.5 + level / 2, n - 1) * d.std(-1, ddof=1) / np.sqrt(n)
    return mean - half, mean + half


@dataclass(frozen=True)
class PairedTest:
    """Verdict of :func:`paired_test`: ``outcome`` is BETTER, NOT_BETTER or INSUFFICIENT, ``reason`` says
    why in one sentence (it goes into the reports as it is)."""

    outcome: str
    mean: float
    interval: tuple[float, float] | None
    units: int
    reason: str

    @property
    def better(self) -> bool:
        return self.outcome == BETTER

    def to_dict(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome,
            "mean": self.mean,
            "interval": list(self.interval) if self.interval else None,
            "units": self.units,
            "reason": self.reason,
        }


def paired_test(
    deltas: Sequence[float],
    margin: float,
    *,
    min_units: int = MIN_TEST_VIDEOS,
    unit: str = "test videos",
    level: float = CONFIDENCE,
) -> PairedTest:
    """THE promotion test (whole-frame gate, click-head gate, backbone selection): the candidate is better
    when the lower bound of the :func:`paired_interval` of its per-video gains clears ``margin``; with fewer
    than ``min_units`` videos it is not judged at all (INSUFFICIENT: keep what serves now)."""
    d = np.asarray(deltas, np.float64)
    n = len(d)
    mean = float(d.mean()) if n else 0.0
    interval = None
    if n >= 2:
        low, high = paired_interval(d, level)
        interval = (float(low), float(high))
    pct = f"{level:.0%}"
    if n < min_units:
        return PairedTest(
            INSUFFICIENT,
            mean,
            interval,
            n,
            f"insufficient evidence: {n} {unit}, at least {min_units} are needed for a {pct} interval that "
            "no single video decides; what serves now stays",
        )
    assert interval is not None
    text = f"gain {mean:+.4f} ({pct} CI {interval[0]:+.4f}..{interval[1]:+.4f} over {n} {unit})"
    if interval[0] > margin:
        return PairedTest(BETTER, mean, interval, n, f"{text}: the lower bound clears the margin {margin}")
    return PairedTest(
        NOT_BETTER, mean, interval, n, f"{text}: its lower bound does not clear the margin {margin}"
    )


def per_video_gains(per_video: Mapping[Any, tuple[dict[str, float], dict[str, float]]]) -> dict[Any, float]:
    """Video -> improvement of the candidate's mean headline metric over the champion's, over the tasks that
    video measured for both (videos with none are left out)."""
    gains = {}
    for video, (cand, champ) in per_video.items():
        tasks = sorted(set(cand) & set(champ))
        if tasks:
            ours, theirs = ({t: m[t] for t in tasks} for m in (cand, champ))
            gains[video] = overall_score(ours) - overall_score(theirs)
    return gains


@dataclass
class GateDecision:
    """Outcome of comparing a candidate with the champion on the frozen test split.

    ``verdict``: "promoted", "rejected" or "insufficient evidence" (the champion stays). ``reference``: per
    task the score regressions are measured against (the best ever promoted on this test split, with the
    version that set it). ``without_model_started``: the same paired test on the test videos whose labels did
    not start from a model prediction (None when that set was not given)."""

    promote: bool
    reasons: list[str] = field(default_factory=list)
    candidate_score: float = 0.0
    champion_score: float | None = None
    deltas: dict[str, float] = field(default_factory=dict)
    improvement_ci: tuple[float, float] | None = None  # 95% paired t-interval over test videos
    videos: int = 0
    verdict: str = ""
    reference: dict[str, dict[str, Any]] = field(default_factory=dict)
    without_model_started: dict[str, Any] | None = None
    reference_after: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "promote": self.promote,
            "verdict": self.verdict or ("promoted" if self.promote else "rejected"),
            "test": PAIRED_TEST,
            "min_videos": MIN_TEST_VIDEOS,
            "reasons": self.reasons,
            "candidate_score": self.candidate_score,
            "champion_score": self.champion_score,
            "deltas": self.deltas,
            "improvement_ci": list(self.improvement_ci) if self.improvement_ci else None,
            "videos": self.videos,
            "reference": self.reference,
            "reference_after": self.reference_after,
            "without_model_started": self.without_model_started,
        }


def gate(
    candidate: dict[str, float],
    champion: dict[str, float] | None,
    margin: float = 0.005,
    tolerance: float = 0.02,
    *,
    per_video: Mapping[Any, tuple[dict[str, float], dict[str, float]]]
    | Sequence[tuple[dict[str, float], dict[str, float]]]
    | None = None,
    reference: Mapping[str, Mapping[str, Any]] | None = None,
    model_started_videos: Collection[Any] | None = None,
    min_videos: int = MIN_TEST_VIDEOS,
) -> GateDecision:
    """Promote only if the candidate is better by ``margin`` with confidence and no task regresses.

    ``candidate`` / ``champion`` map task -> headline metric on the same test split (no champion: promote).
    ``per_video`` (video -> (candidate's, champion's) headline metrics; a list counts its positions as
    videos) feeds :func:`paired_test`: the lower bound of the 95% t-interval of the per-video gains must
    clear ``margin``, and with fewer than ``min_videos`` test videos the verdict is "insufficient evidence"
    (not promoted; without ``per_video`` there are none). No task may fall more than ``tolerance`` below its
    ``reference`` score (task -> {"score", "version"}: the best score ever promoted on this test split, so
    losses cannot add up promotion after promotion; default: the champion's). ``model_started_videos``
    (videos whose test labels started from a model prediction) adds the same test without them, reported
    next to the verdict (``without_model_started``), not deciding it.
    """
    cand = overall_score(candidate)
    if champion is None:
        return GateDecision(True, ["no champion yet"], cand, None, verdict="promoted")
    tasks = sorted(set(candidate) & set(champion))
    if not tasks:
        return GateDecision(
            False, ["no task measured for both models on the test split"], cand, None, verdict="rejected"
        )
    cand = overall_score({t: candidate[t] for t in tasks})
    champ = overall_score({t: champion[t] for t in tasks})
    deltas = {t: candidate[t] - champion[t] for t in tasks}
    if per_video is None:
        per_video = {}
    elif not isinstance(per_video, Mapping):
        per_video = dict(enumerate(per_video))
    gains = per_video_gains(per_video)
    test = paired_test(list(gains.values()), margin, min_units=min_videos)
    refs = {t: {"score": champion[t], "version": "champion"} for t in tasks}
    refs |= {t: dict(r) for t, r in (reference or {}).items() if t in tasks}
    reasons = [] if test.better else [test.reason]
    for t in tasks:
        floor = refs[t]["score"] - tolerance
        if candidate[t] < floor:
            reasons.append(
                f"{t} {candidate[t]:.4f} is more than {tolerance} below its reference {refs[t]['score']:.4f} "
                f"(the best promoted on this test split, {refs[t]['version']})"
            )
    without = None
    if model_started_videos is not None:
        independent = [g for v, g in gains.items() if v not in set(model_started_videos)]
        without = paired_test(independent, margin, min_units=min_videos).to_dict()
    verdict = INSUFFICIENT if test.outcome == INSUFFICIENT else ("rejected" if reasons else "promoted")
    decision = GateDecision(
        not reasons, reasons, cand, champ, deltas, test.interval, test.units, verdict, refs, without
    )
    if not reasons:
        decision.reasons = [f"{test.reason}; no task more than {tolerance} below its reference"]
    return decision


def next_reference(
    reference: Mapping[str, Mapping[str, Any]], promoted: Mapping[str, float], version: str
) -> dict[str, dict[str, Any]]:
    """The regression reference after ``version`` (headline metrics ``promoted``) was promoted: per task the
    higher of the old reference and the new champion's score. A promotion may lose up to the tolerance on a
    task, but it never lowers that task's reference, so three promotions that each lose 0.015 cannot add up
    to 0.045: the third is measured against the first one's score."""
    out = {t: dict(r) for t, r in reference.items()}
    for task, score in promoted.items():
        if task not in out or score > out[task]["score"]:
            out[task] = {"score": float(score), "version": version}
    return out


def gap_interval(
    test_scores: Sequence[float], final_scores: Sequence[float], level: float = CONFIDENCE
) -> tuple[float, tuple[float, float] | None]:
    """Test-minus-final gap of per-video scores and its Welch t-interval (two independent sets of videos).

    The final split decides nothing, so a test split worn out by reuse shows as a gap that grows beyond what
    two samples of videos differ by; ``None`` interval with fewer than two videos on either side."""
    a, b = np.asarray(test_scores, np.float64), np.asarray(final_scores, np.float64)
    gap = float(a.mean() - b.mean()) if len(a) and len(b) else 0.0
    if len(a) < 2 or len(b) < 2:
        return gap, None
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = float(np.sqrt(va + vb))
    if se == 0.0:
        return gap, (gap, gap)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = float(stats.t.ppf(0.5 + level / 2, df)) * se
    return gap, (gap - half, gap + half)


def pointer_name(project: str) -> str:
    """File name of a project's champion pointer under the registry root."""
    if project == DEFAULT_PROJECT:
        return "CHAMPION"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in project)
    return f"CHAMPION-{safe}"


class Registry:
    """Model versions of one project of a label store (``project``, default: the store's project); bundles
    under ``root`` (default ``data_home()/registry``)."""

    def __init__(self, store: LabelStore, root: str | Path | None = None, project: str | None = None) -> None:
        self.store = store
        self.root = Path(root) if root else registry_root()
        self.project = project or store.project

    # --- reading ----------------------------------------------------------------------------------------
    def versions(self) -> list[dict[str, Any]]:
        """Every row of the project, learned click heads (task ``interactive``) included: what ``models list``
        shows. Promotion and rollback act on whole-frame models only (:meth:`frame_versions`)."""
        return self.store.model_versions(project=self.project)

    def frame_versions(self, status: str | None = None) -> list[dict[str, Any]]:
        """The project's whole-frame model rows (no click heads), optionally of one status."""
        return self.store.frame_model_versions(status=status, project=self.project)

    def get(self, version: str) -> dict[str, Any]:
        rows = [r for r in self.versions() if r["version"] == version]
        if not rows:
            known = [r["version"] for r in self.versions()][-5:]
            raise RegistryError(
                f"no model version {version!r} in project {self.project!r}",
                f"use `models list --project {self.project}`; latest: {known}",
            )
        return rows[0]

    def champion(self) -> dict[str, Any] | None:
        return self.store.serving_champion(self.project)

    # --- writing ----------------------------------------------------------------------------------------
    def register_candidate(
        self,
        model: SurgeNetAssistModel,
        *,
        metrics: dict[str, Any],
        manifest_hash: str,
        seeds: dict[str, int],
        parent: str | None,
        params: dict[str, Any] | None = None,
        version: str | None = None,
    ) -> str:
        """Write the bundle (atomic), register it as ``candidate`` with its lineage; return the version."""
        version = version or new_version()
        lineage = {
            "manifest_hash": manifest_hash,
            "code_version": code_version(),
            "seeds": seeds,
            "parent": parent,
            "params": params or {},
        }
        path = save_bundle(
            model, self.root / version, version=version, training=lineage | {"metrics": metrics}
        )
        self.store.register_model_version(
            version,
            task=None,
            bundle_path=str(path),
            bundle_hash=bundle_hash(path),
            metrics={"test": metrics, **lineage},
            status="candidate",
            project=self.project,
        )
        return version

    def set_status(self, version: str, status: str) -> None:
        self._refuse_click_head(self.get(version))
        self.store.set_model_status(version, status, project=self.project)
        self.write_pointer()

    def _refuse_click_head(self, row: dict[str, Any]) -> None:
        if not is_frame_model(row):
            raise RegistryError(
                f"version {row['version']} is a learned click head (task {row.get('task')!r}), not a model "
                "bundle: this registry promotes and rolls back whole-frame models only",
                "click heads are promoted by the click gate, not by hand: run `surgenet-assist train-clicks` "
                "(or the nightly cycle's interactive stage); it promotes a head that beats the current one",
            )

    def promote(self, version: str) -> None:
        """Make ``version`` the champion (the old one becomes previous-champion); a whole-frame model only."""
        row = self.get(version)
        self._refuse_click_head(row)
        if not row.get("bundle_path") or not Path(row["bundle_path"], "bundle.json").exists():
            raise RegistryError(
                f"version {version} has no bundle on disk ({row.get('bundle_path')})",
                "promote a version whose bundle directory exists",
            )
        self.store.set_model_status(version, CHAMPION, project=self.project)
        self.write_pointer()

    def rollback(self) -> str:
        """Reinstate the previous whole-frame champion; returns its version. Click heads have their own
        champion (``task = "interactive"``) and are never brought back here."""
        prev = [r for r in self.frame_versions(status=PREVIOUS_CHAMPION) if r.get("bundle_path")]
        if not prev:
            raise RegistryError(
                "there is no previous champion to roll back to",
                "promote a specific version with `models promote VERSION`",
            )
        target = max(prev, key=lambda r: r["updated_at"])
        current = self.champion()
        self.store.set_model_status(target["version"], CHAMPION, project=self.project)
        if current is not None:  # the rolled-back model should not come back by the next rollback
            self.store.set_model_status(current["version"], "rolled-back", project=self.project)
        self.write_pointer()
        return target["version"]

    def write_pointer(self) -> None:
        """``registry/CHAMPION`` (``CHAMPION-<project>`` outside the default project) = JSON of the project's
        champion row, replaced atomically."""
        champ = self.champion()
        self.root.mkdir(parents=True, exist_ok=True)
        name = pointer_name(self.project)
        tmp = self.root / f".{name}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(champ, default=str, indent=2))
        os.replace(tmp, self.root / name)

    def remove_orphans(self, min_age_s: float = 3600.0) -> list[str]:
        """Delete bundle dirs (and temp dirs) that no registry row points to: left by a killed run.

        Only those older than ``min_age_s``, so a ``train`` running outside the nightly lock keeps the bundle
        it is writing right now. Every project's rows count: the bundle directories are shared."""
        if not self.root.exists():
            return []
        rows = self.store.model_versions(all_projects=True)
        known = {Path(r["bundle_path"]).name for r in rows if r.get("bundle_path")}
        removed = []
        for child in self.root.iterdir():
            if child.is_dir() and child.name not in known and time.time() - child.stat().st_mtime > min_age_s:
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child.name)
        return removed

