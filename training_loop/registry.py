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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

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


@dataclass
class GateDecision:
    """Outcome of comparing a candidate with the champion on the frozen test split."""

    promote: bool
    reasons: list[str] = field(default_factory=list)
    candidate_score: float = 0.0
    champion_score: float | None = None
    deltas: dict[str, float] = field(default_factory=dict)
    improvement_ci: tuple[float, float] | None = None  # 95% paired bootstrap interval over test videos
    videos: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "promote": self.promote,
            "reasons": self.reasons,
            "candidate_score": self.candidate_score,
            "champion_score": self.champion_score,
            "deltas": self.deltas,
            "improvement_ci": list(self.improvement_ci) if self.improvement_ci else None,
            "videos": self.videos,
        }


def paired_bootstrap(
    per_video: Sequence[tuple[dict[str, float], dict[str, float]]],
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, tuple[float, float], int]:
    """Mean improvement of candidate over champion across videos and its percentile interval, resampling
    whole videos (frames of one video are not independent). Each video's improvement is the difference of
    the two models' mean headline metric over the tasks that video measured for both. Returns (mean,
    (low, high), videos used)."""
    deltas = []
    for cand, champ in per_video:
        tasks = sorted(set(cand) & set(champ))
        if tasks:
            ours, theirs = ({t: m[t] for t in tasks} for m in (cand, champ))
            deltas.append(overall_score(ours) - overall_score(theirs))
    if not deltas:
        return 0.0, (0.0, 0.0), 0
    return float(np.mean(deltas)), bootstrap_interval(deltas, n_boot, seed, level), len(deltas)


def bootstrap_interval(
    deltas: Sequence[float], n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of paired differences (one per video, or per object for
    the click gate): the same resampling for every promotion decision."""
    d = np.asarray(deltas, np.float64)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(1)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def gate(
    candidate: dict[str, float],
    champion: dict[str, float] | None,
    margin: float = 0.005,
    tolerance: float = 0.02,
    *,
    per_video: Sequence[tuple[dict[str, float], dict[str, float]]] | None = None,
    n_boot: int = 2000,
    seed: int = 0,
) -> GateDecision:
    """Promote only if the candidate is better by ``margin`` with confidence and no task regresses.

    ``candidate`` / ``champion`` map task -> headline metric on the same test split (no champion: promote).
    With ``per_video`` (each test video's headline metrics of both models) the improvement must clear the
    margin with the **lower bound** of its 95% paired bootstrap interval over videos, so a tie or a lucky
    split does not promote; without it (or with a single video) the point estimate must. Either way no task
    may drop by more than ``tolerance`` on the whole split.
    """
    cand = overall_score(candidate)
    if champion is None:
        return GateDecision(True, ["no champion yet"], cand, None)
    tasks = sorted(set(candidate) & set(champion))
    if not tasks:
        return GateDecision(False, ["no task measured for both models on the test split"], cand, None)
    cand = overall_score({t: candidate[t] for t in tasks})
    champ = overall_score({t: champion[t] for t in tasks})
    deltas = {t: candidate[t] - champion[t] for t in tasks}
    reasons: list[str] = []
    ci, videos = None, 0
    if per_video is not None:
        mean, ci, videos = paired_bootstrap(per_video, n_boot=n_boot, seed=seed)
    if ci is not None and videos >= 2:
        if ci[0] < margin:
            reasons.append(
                f"improvement {mean:+.4f} (95% CI {ci[0]:+.4f}..{ci[1]:+.4f} over {videos} test videos): "
                f"its lower bound does not clear the margin {margin}"
            )
    elif cand < champ + margin:
        reasons.append(
            f"mean headline metric {cand:.4f} does not beat the champion's {champ:.4f} by {margin}"
            + (" (one test video: no interval)" if videos == 1 else "")
        )
    for t, d in deltas.items():
        if d < -tolerance:
            reasons.append(f"{t} regresses by {-d:.4f} (> tolerance {tolerance})")
    if reasons:
        return GateDecision(False, reasons, cand, champ, deltas, ci, videos)
    how = (
        f"improvement {cand - champ:+.4f}, 95% CI {ci[0]:+.4f}..{ci[1]:+.4f} over {videos} test videos"
        if ci is not None and videos >= 2
        else f"beats the champion by {cand - champ:.4f}"
    )
    return GateDecision(True, [f"{how}, no task regression > {tolerance}"], cand, champ, deltas, ci, videos)


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
