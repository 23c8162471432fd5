"""Label schema: which segmentation classes, surgical phases and CVS criteria a model speaks.

The schema travels inside every model bundle and every export, so a mask id or phase index always means
the same thing. Defaults: CholecSeg8k's 13 classes, Cholec80's 7 phases and the three Endoscapes CVS
criteria. Other procedures come from a YAML or JSON file (see :meth:`LabelSchema.from_file`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import SchemaError

#: Pixel value of "not labelled / ignore" in class-id masks (CholecSeg8k's white border, unlabelled pixels).
IGNORE_INDEX = 255
# The three kinds of label the system predicts, stores and trains on (one name each, everywhere).
TASKS = ("segmentation", "phase", "cvs")
#: ``LabelSchema.phase_protocol`` values: a dataset with its own phase-evaluation rules, or None.
PHASE_PROTOCOLS = (None, "cholec80")


@dataclass(frozen=True)
class SegClass:
    """One segmentation class: id (= pixel value), name, display colour and dataset-specific codes."""

    id: int
    name: str
    color: tuple[int, int, int]
    watershed: int | None = None


@dataclass(frozen=True)
class Phase:
    """One surgical phase; ``aliases`` are other spellings accepted on import (case-insensitive)."""

    id: int
    name: str
    color: tuple[int, int, int]
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class CVSCriterion:
    id: int
    key: str
    name: str


CHOLECSEG8K_CLASSES: tuple[SegClass, ...] = (
    SegClass(0, "Black Background", (127, 127, 127), 50),
    SegClass(1, "Abdominal Wall", (210, 140, 140), 11),
    SegClass(2, "Liver", (255, 114, 114), 21),
    SegClass(3, "Gastrointestinal Tract", (231, 70, 156), 13),
    SegClass(4, "Fat", (186, 183, 75), 12),
    SegClass(5, "Grasper", (170, 255, 0), 31),
    SegClass(6, "Connective Tissue", (255, 85, 0), 23),
    SegClass(7, "Blood", (255, 0, 0), 24),
    SegClass(8, "Cystic Duct", (255, 255, 0), 25),
    SegClass(9, "L-hook Electrocautery", (169, 255, 184), 32),
    SegClass(10, "Gallbladder", (255, 160, 165), 22),
    SegClass(11, "Hepatic Vein", (0, 50, 128), 33),
    SegClass(12, "Liver Ligament", (111, 74, 0), 5),
)

CHOLEC80_PHASES: tuple[Phase, ...] = (
    Phase(0, "Preparation", (31, 119, 180)),
    Phase(1, "CalotTriangleDissection", (255, 127, 14), ("Calot Triangle Dissection",)),
    Phase(2, "ClippingCutting", (44, 160, 44), ("Clipping Cutting", "Clipping and Cutting")),
    Phase(3, "GallbladderDissection", (214, 39, 40), ("Gallbladder Dissection",)),
    Phase(4, "GallbladderPackaging", (148, 103, 189), ("Gallbladder Packaging",)),
    Phase(5, "CleaningCoagulation", (140, 86, 75), ("Cleaning Coagulation", "Cleaning and Coagulation")),
    Phase(6, "GallbladderRetraction", (227, 119, 194), ("Gallbladder Retraction",)),
)

CVS_CRITERIA: tuple[CVSCriterion, ...] = (
    CVSCriterion(0, "C1", "Two structures"),
    CVSCriterion(1, "C2", "Hepatocystic triangle cleared"),
    CVSCriterion(2, "C3", "Cystic plate"),
)

_PHASE_PALETTE = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
    (174, 199, 232),
    (255, 187, 120),
    (152, 223, 138),
    (255, 152, 150),
    (197, 176, 213),
]


def _norm(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


@dataclass(frozen=True)
class LabelSchema:
    """The label sets of one procedure. Immutable; compare schemas with ``==``."""

    name: str = "cholecystectomy"
    classes: tuple[SegClass, ...] = CHOLECSEG8K_CLASSES
    phases: tuple[Phase, ...] = CHOLEC80_PHASES
    cvs: tuple[CVSCriterion, ...] = CVS_CRITERIA
    ignore_index: int = IGNORE_INDEX
    #: Which dataset's phase-evaluation rules apply: "cholec80" (its relaxed-boundary phase-specific rules)
    #: or None (the general rule). Chosen per dataset, never inferred from the number of phases.
    phase_protocol: str | None = "cholec80"
    _lookup: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for kind, items in (("class", self.classes), ("phase", self.phases), ("cvs", self.cvs)):
            ids = [item.id for item in items]
            if ids != list(range(len(ids))):
                raise SchemaError(
                    f"{kind} ids must be 0..{len(ids) - 1} in order, got {ids}",
                    "number the entries consecutively from 0 in the schema file",
                )
        if self.phase_protocol not in PHASE_PROTOCOLS:
            raise SchemaError(
                f"unknown phase_protocol {self.phase_protocol!r}",
                f"use one of {list(PHASE_PROTOCOLS)} (null: the general relaxed-boundary rule)",
            )
        if len(self.classes) >= self.ignore_index:
            raise SchemaError(f"{len(self.classes)} classes collide with ignore index {self.ignore_index}")
        lookup = {
            "class": {_norm(c.name): c.id for c in self.classes},
            "phase": {_norm(a): p.id for p in self.phases for a in (p.name, *p.aliases)},
            "cvs": {_norm(a): c.id for c in self.cvs for a in (c.key, c.name)},
        }
        object.__setattr__(self, "_lookup", lookup)

    # --- counts and names -------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_phases(self) -> int:
        return len(self.phases)

    @property
    def num_cvs(self) -> int:
        return len(self.cvs)

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def phase_names(self) -> list[str]:
        return [p.name for p in self.phases]

    @property
    def cvs_keys(self) -> list[str]:
        return [c.key for c in self.cvs]

    # --- lookups that fail loudly ---------------------------------------------------------------
    def _find(self, kind: str, name: str) -> int:
        try:
            return self._lookup[kind][_norm(name)]
        except KeyError:
            known = {"class": self.class_names, "phase": self.phase_names, "cvs": self.cvs_keys}[kind]
            raise SchemaError(
                f"unknown {kind} {name!r} for schema {self.name!r}",
                f"use one of {known}, or load a schema file that defines it",
            ) from None

    def class_id(self, name: str) -> int:
        return self._find("class", name)

    def phase_id(self, name: str) -> int:
        return self._find("phase", name)

    def cvs_id(self, name: str) -> int:
        return self._find("cvs", name)

    def has_class(self, name: str) -> bool:
        return _norm(name) in self._lookup["class"]

    def has_phase(self, name: str) -> bool:
        return _norm(name) in self._lookup["phase"]

    def has_cvs(self, name: str) -> bool:
        """Is ``name`` a CVS criterion (its key such as ``C1``, or its name)? Asked here and nowhere else."""
        return _norm(name) in self._lookup["cvs"]

    def class_colors(self) -> dict[int, tuple[int, int, int]]:
        return {c.id: c.color for c in self.classes}

    def palette(self) -> numpy.ndarray:  # noqa: F821 - numpy imported lazily for light import
        """(256, 3) uint8 lookup table: class id -> colour; ignore and unused ids are black."""
        import numpy as np

        lut = np.zeros((256, 3), dtype=np.uint8)
        for c in self.classes:
            lut[c.id] = c.color
        return lut

    # --- (de)serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ignore_index": self.ignore_index,
            "classes": [asdict(c) | {"color": list(c.color)} for c in self.classes],
            "phases": [asdict(p) | {"color": list(p.color), "aliases": list(p.aliases)} for p in self.phases],
            "cvs": [asdict(c) for c in self.cvs],
            "phase_protocol": self.phase_protocol,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LabelSchema:
        """Build from a dict; entries may omit ``id`` (then their position is used) and colours.

        Without ``phase_protocol`` (files and bundles written before it existed) the protocol is "cholec80"
        when the phases are Cholec80's seven, in order, and None otherwise.
        """
        if not isinstance(data, dict):
            raise SchemaError("a label schema must be a mapping", "see docs/architecture.md for the format")
        try:
            classes = tuple(
                SegClass(
                    int(c.get("id", i)),
                    str(c["name"]),
                    tuple(c.get("color", _PHASE_PALETTE[i % len(_PHASE_PALETTE)])),
                    c.get("watershed"),
                )
                for i, c in enumerate(data.get("classes", [asdict(c) for c in CHOLECSEG8K_CLASSES]))
            )
            phases = tuple(
                Phase(
                    int(p.get("id", i)) if isinstance(p, dict) else i,
                    str(p["name"]) if isinstance(p, dict) else str(p),
                    tuple(p.get("color", _PHASE_PALETTE[i % len(_PHASE_PALETTE)]))
                    if isinstance(p, dict)
                    else _PHASE_PALETTE[i % len(_PHASE_PALETTE)],
                    tuple(p.get("aliases", ())) if isinstance(p, dict) else (),
                )
                for i, p in enumerate(data.get("phases", [asdict(p) for p in CHOLEC80_PHASES]))
            )
            cvs = tuple(
                CVSCriterion(int(c.get("id", i)), str(c["key"]), str(c.get("name", c["key"])))
                for i, c in enumerate(data.get("cvs", [asdict(c) for c in CVS_CRITERIA]))
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SchemaError(
                f"malformed label schema: {exc!r}",
                "every class needs 'name' (and optional 'id', 'color' [r,g,b]); phases need 'name'",
            ) from None
        if "phase_protocol" in data:
            protocol = data["phase_protocol"]
        else:
            same = [_norm(p.name) for p in phases] == [_norm(p.name) for p in CHOLEC80_PHASES]
            protocol = "cholec80" if same else None
        return cls(
            name=str(data.get("name", "custom")),
            classes=classes,
            phases=phases,
            cvs=cvs,
            ignore_index=int(data.get("ignore_index", IGNORE_INDEX)),
            phase_protocol=protocol,
        )

    @classmethod
    def from_file(cls, path: str | Path) -> LabelSchema:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise SchemaError(f"cannot read label schema {path}: {exc.strerror}", "check the path") from None
        try:
            data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise SchemaError(
                f"label schema {path} is not valid YAML/JSON: {exc}", "fix the syntax"
            ) from None
        return cls.from_dict(data)

    def to_file(self, path: str | Path) -> None:
        path = Path(path)
        text = (
            json.dumps(self.to_dict(), indent=2) if path.suffix == ".json" else yaml.safe_dump(self.to_dict())
        )
        path.write_text(text, encoding="utf-8")


DEFAULT_SCHEMA = LabelSchema()

AUTOLAPARO_SCHEMA = LabelSchema(
    name="hysterectomy-autolaparo",
    phase_protocol=None,  # 7 phases too, but not Cholec80's: general relaxed-boundary rule
    phases=tuple(
        Phase(i, n, _PHASE_PALETTE[i])
        for i, n in enumerate(
            [
                "Preparation",
                "Dividing Ligament and Peritoneum",
                "Dividing Uterine Vessels and Ligament",
                "Transecting the Vagina",
                "Specimen Removal",
                "Suturing",
                "Washing",
            ]
        )
    ),
)
