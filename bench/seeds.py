"""Pre-registered seeds: every benchmark reads its seed lists here, and nowhere else.

The lists live in one YAML block of ``bench/README.md`` (the pre-registration, written before any report run,
next to each benchmark's metrics, regime checks and decision rule). This helper

- reads a benchmark's calibration seeds (for tuning and development) or report seeds (for published figures,
  never used while developing), with the synthetic world they are registered for;
- refuses to run when the registry is inconsistent: a seed repeated in a list, or any two lists (calibration,
  report, or a shared list such as training videos; in one benchmark or across benchmarks) that could
  produce the same video;
- refuses to run when the registry was edited without recording its new digest here (changing report seeds
  after seeing results is exactly what pre-registration forbids; a new registration, e.g. for a new world,
  is a deliberate, reviewed change of :data:`REGISTRY_SHA256` with a line in the README's change log);
- stamps results with the world version and the seed set, so a published number says what it was run on.

What one seed means is per benchmark (``unit``): ``video`` (the seed of one synthetic clip) or ``replicate``
(one repetition of the whole experiment; replicate ``r`` owns the video seeds ``r * 1000 .. r * 1000 + 999``,
handed out by :meth:`SeedSet.video_seeds`).

Usage in a benchmark script (run as ``python bench/x.py``, so ``bench/`` is on ``sys.path``)::

    import seeds
    seeds.add_argument(parser)                      # --seed-set calibration|report
    seed_set = seeds.load("active_learning", args.seed_set)
    for replicate in seed_set.seeds:
        pool = seed_set.video_seeds(replicate, "pool", 4)
        clips = [generate_clip(s, ..., world=seed_set.world) for s in pool]
    result = seed_set.stamp(result)                 # adds "world" and "seed_set"
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from surgenet_assist.core.errors import SurgenetAssistError
from surgenet_assist.core.synthetic import WORLDS

README = Path(__file__).resolve().parent / "README.md"
START, END = "<!-- seeds:start -->", "<!-- seeds:end -->"
ROLES = ("calibration", "report")
UNITS = ("video", "replicate")
#: Videos a replicate owns: replicate r -> video seeds r * VIDEOS_PER_REPLICATE + 0 .. + 999.
VIDEOS_PER_REPLICATE = 1000
#: Offsets of the roles a replicate's videos play (pool/validation/test of an experiment, unlabelled videos).
VIDEO_ROLES = {"pool": 0, "train": 0, "val": 300, "test": 500, "unlabelled": 700, "probe": 800}
#: sha256 of the registry block as registered. Change only together with the README's change log.
REGISTRY_SHA256 = "04e855075cad41e7e419587aa9285dfd6f76b562b7334fc6b2ad8e8b7455b82f"


class SeedRegistryError(SurgenetAssistError):
    """The pre-registered seed lists are missing, inconsistent, overlapping or were changed unrecorded."""


@dataclass(frozen=True)
class SeedSet:
    """The seeds one benchmark runs on in one role, and the world they are registered for."""

    benchmark: str
    role: str
    world: str
    unit: str
    seeds: tuple[int, ...]
    shared: dict[str, tuple[int, ...]]
    registry_sha256: str

    def video_seeds(self, replicate: int, role: str, count: int) -> list[int]:
        """Video seeds of one replicate for one purpose (``VIDEO_ROLES``): disjoint across purposes and
        replicates, so calibration and report replicates never share a video."""
        if self.unit != "replicate":
            raise SeedRegistryError(
                f"{self.benchmark}'s seeds are videos, not replicates",
                "use the seeds themselves as video seeds",
            )
        if replicate not in self.seeds and replicate not in itertools.chain(*self.shared.values()):
            raise SeedRegistryError(
                f"replicate {replicate} is not in {self.benchmark}'s {self.role} seeds {list(self.seeds)}",
                "take replicates from SeedSet.seeds",
            )
        if role not in VIDEO_ROLES:
            raise SeedRegistryError(f"unknown video role {role!r}", f"use one of {sorted(VIDEO_ROLES)}")
        room = sorted(set(VIDEO_ROLES.values()) | {VIDEOS_PER_REPLICATE})
        limit = room[room.index(VIDEO_ROLES[role]) + 1] - VIDEO_ROLES[role]
        if not 0 < count <= limit:
            raise SeedRegistryError(
                f"{count} {role} videos do not fit in a replicate's block ({limit} at most)",
                "use fewer videos per replicate",
            )
        base = replicate * VIDEOS_PER_REPLICATE + VIDEO_ROLES[role]
        return list(range(base, base + count))

    def stamp(self, result: dict[str, Any]) -> dict[str, Any]:
        """``result`` plus the world and the seed set it was computed on (for JSON results and docs)."""
        return {
            **result,
            "world": self.world,
            "seed_set": {
                "benchmark": self.benchmark,
                "role": self.role,
                "unit": self.unit,
                "seeds": list(self.seeds),
                "shared": {k: list(v) for k, v in self.shared.items()},
                "registry_sha256": self.registry_sha256,
            },
        }

    def describe(self) -> str:
        """One line for logs and result tables."""
        return (
            f"world {self.world}, {self.benchmark} {self.role} seeds ({self.unit}s) {_ranges(self.seeds)} "
            f"[registry {self.registry_sha256[:12]}]"
        )


def _ranges(seeds: tuple[int, ...]) -> str:
    parts, run = [], [seeds[0]] if seeds else []
    for s in seeds[1:]:
        if s == run[-1] + 1:
            run.append(s)
        else:
            parts.append(run)
            run = [s]
    if run:
        parts.append(run)
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in parts)


def registry_text(readme: Path = README) -> str:
    """The YAML between the registry markers of ``bench/README.md``."""
    try:
        text = readme.read_text(encoding="utf-8")
    except OSError as exc:
        raise SeedRegistryError(
            f"cannot read the seed registry {readme}: {exc.strerror}", "restore it"
        ) from None
    if START not in text or END not in text:
        raise SeedRegistryError(
            f"{readme} has no seed registry block", f"put the YAML registry between {START} and {END}"
        )
    block = text[text.index(START) + len(START) : text.index(END)]
    match = re.search(r"```yaml\n(.*?)```", block, re.S)
    if not match:
        raise SeedRegistryError(
            "the seed registry block holds no ```yaml fence", "write the registry as YAML"
        )
    return match.group(1)


def _expand(unit: str, seeds: tuple[int, ...]) -> set[int]:
    """Every video seed a list can produce (a replicate owns a whole block)."""
    if unit == "video":
        return set(seeds)
    return {v for r in seeds for v in range(r * VIDEOS_PER_REPLICATE, (r + 1) * VIDEOS_PER_REPLICATE)}


def parse_registry(text: str) -> dict[str, dict[str, Any]]:
    """Validate the registry: known worlds and units, integer seed lists without repeats, disjoint lists."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SeedRegistryError(f"the seed registry is not valid YAML: {exc}", "fix the YAML block") from None
    if not isinstance(data, dict) or not data:
        raise SeedRegistryError("the seed registry is empty", "register each benchmark's seeds")
    lists: list[tuple[str, set[int]]] = []
    out = {}
    for name, entry in data.items():
        if not isinstance(entry, dict):
            raise SeedRegistryError(
                f"registry entry {name!r} is not a mapping", "see the format in bench/README.md"
            )
        world, unit = entry.get("world"), entry.get("unit")
        if world not in WORLDS:
            raise SeedRegistryError(
                f"{name}: unknown synthetic world {world!r}", f"register one of {list(WORLDS)}"
            )
        if unit not in UNITS:
            raise SeedRegistryError(f"{name}: unknown unit {unit!r}", f"use one of {list(UNITS)}")
        named = {role: entry.get(role) for role in ROLES}
        shared = entry.get("shared") or {}
        if not isinstance(shared, dict):
            raise SeedRegistryError(f"{name}: 'shared' must map names to seed lists", "fix the registry")
        parsed = {}
        for label, seeds in [*named.items(), *((f"shared.{k}", v) for k, v in shared.items())]:
            if (
                not isinstance(seeds, list)
                or not seeds
                or not all(isinstance(s, int) and s >= 0 for s in seeds)
            ):
                raise SeedRegistryError(
                    f"{name}.{label} must be a non-empty list of non-negative integers, got {seeds!r}",
                    "fix the registry",
                )
            if len(set(seeds)) != len(seeds):
                raise SeedRegistryError(f"{name}.{label} repeats a seed: {seeds}", "list every seed once")
            parsed[label] = tuple(seeds)
            lists.append((f"{name}.{label}", _expand(unit, tuple(seeds))))
        out[name] = {
            "world": world,
            "unit": unit,
            **{role: parsed[role] for role in ROLES},
            "shared": {k: parsed[f"shared.{k}"] for k in shared},
        }
    for (a, sa), (b, sb) in itertools.combinations(lists, 2):
        common = sa & sb
        if common:
            raise SeedRegistryError(
                f"seed lists {a} and {b} overlap (video seeds {sorted(common)[:5]}...)",
                "calibration, report and shared seeds must never produce the same video: pick disjoint seeds",
            )
    return out


def load(benchmark: str, role: str, readme: Path = README, expected_sha256: str | None = None) -> SeedSet:
    """The registered seeds of ``benchmark`` in ``role`` ('calibration' or 'report'), checked."""
    if role not in ROLES:
        raise SeedRegistryError(f"unknown seed set {role!r}", f"use one of {list(ROLES)}")
    text = registry_text(readme)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    expected = REGISTRY_SHA256 if expected_sha256 is None else expected_sha256
    if digest != expected:
        raise SeedRegistryError(
            f"the seed registry in {readme.name} changed (sha256 {digest[:12]}, registered {expected[:12]})",
            "pre-registered seeds do not change after report runs; for a new registration (e.g. a new world) "
            "set REGISTRY_SHA256 in bench/seeds.py and add a line to the change log in bench/README.md",
        )
    registry = parse_registry(text)
    if benchmark not in registry:
        raise SeedRegistryError(
            f"no seeds registered for benchmark {benchmark!r}", f"registered: {sorted(registry)}"
        )
    entry = registry[benchmark]
    return SeedSet(
        benchmark=benchmark,
        role=role,
        world=entry["world"],
        unit=entry["unit"],
        seeds=entry[role],
        shared=entry["shared"],
        registry_sha256=digest,
    )


def add_argument(parser: argparse.ArgumentParser) -> None:
    """``--seed-set calibration|report`` (default calibration: report runs are deliberate)."""
    parser.add_argument(
        "--seed-set",
        choices=ROLES,
        default="calibration",
        help="pre-registered seeds (bench/README.md): 'calibration' for development and tuning, 'report' "
        "for published figures only",
    )
