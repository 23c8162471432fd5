"""World ``v2``: the benchmark world, built so that what a model must learn is visible in the pixels.

Why a second world: in ``v1`` a logistic probe on the renderer's true scene state predicts phase almost
perfectly, yet the active-learning benchmark's phase head stays at chance, because the evidence barely
reaches the pixels: two instruments, neither specific to a phase, an L-hook about one pixel wide at the
benchmark's 96x170. ``v2`` keeps v1's scene model (a gallbladder at the liver edge, the cystic duct, the
hepatocystic triangle, phase progress driving the scene state) and adds what laparoscopic cholecystectomy
video shows:

**Instruments by phase.** Cholec80's seven tools (grasper, bipolar, hook, scissors, clipper, irrigator,
specimen bag; Twinanda et al., "EndoNet: a deep architecture for recognition tasks on laparoscopic videos",
IEEE TMI 36(1):86-97, 2017, arXiv:1602.03012) appear in the phases that use them, following the tool usage
per phase reported with that dataset: grasper and hook through preparation, Calot triangle dissection and
gallbladder dissection; clipper then scissors in clipping and cutting; the specimen bag in packaging and
retraction; irrigator and bipolar in cleaning and coagulation. :data:`TOOL_PHASE_PRESENCE` holds the share
of a phase's frames in which each tool is in view. **These rates are ours**: rounded values chosen to follow
that pattern, not numbers copied from the paper's table (not at hand where this was written); a world with
frequencies counted from Cholec80's ``tool_annotations`` would be a new version. Tools come and go in
episodes (smooth random processes thresholded at the rate), the clipper works before the scissors, clips
appear on the duct and artery only while the clipper is there, and at most three tools are in view.

**The CVS criteria as the protocol defines them** (Strasberg & Brunt, J Am Coll Surg 211(1), 2010; the
Endoscapes annotation, Murali et al., arXiv:2312.12429): C1, two structures (cystic duct and cystic artery)
seen entering the gallbladder: both are drawn, and a fibro-fatty sheath covers the part next to the
gallbladder until it is dissected; C2, the hepatocystic triangle cleared of fat and fibrous tissue: the
connective tissue and fat in the triangle shrink until the liver behind shows through; C3, the lower third
of the gallbladder separated from the liver, exposing the cystic plate: the gallbladder's neck swings away
from its bed and the pale plate appears. Each criterion is a threshold on the very variable that draws it.

**Variation across videos**: lighting (gain, colour temperature, vignetting, hot spot), surgical smoke (from
hook and bipolar use), bleeding tendency, specular highlights (stronger when wet after irrigation), focus,
motion blur (from camera speed), camera motion (wander, shake, quick pans) and zoom (closer during
dissection, wider during packaging), tissue colours, anatomy and tool entry ports.

**Masks keep CholecSeg8k's classes** (Hong et al., arXiv:2012.12453; ``core/schema.py``). What CholecSeg8k
has no class for is ``schema.ignore_index`` (255) unless the schema names it: bipolar, scissors, clipper,
irrigator, specimen bag, metal clips and the cystic artery; the cystic plate and coagulated spots are liver.
A schema with classes such as "Clipper", "Specimen Bag" or "Cystic Artery" gets them labelled.

Frames are 480x854 by default. Labels (phases, CVS, tools, scene state, camera cuts) depend only on the seed
and the number of frames. Once published, this module must not change what it draws: a better world is
``world_v3.py``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np

from ..errors import UsageError
from ..schema import LabelSchema
from ._geometry import ELLIPSE, bezier, place, rot, unit_blob
from ._types import TOOL_NAMES, SceneStates

#: Default frame size (height, width): Cholec80 / Endoscapes frames are 480x854.
DEFAULT_SIZE = (480, 854)

# Share of each phase's frames with the tool in view. Rows: TOOL_NAMES; columns: Cholec80 phases
# (Preparation, CalotTriangleDissection, ClippingCutting, GallbladderDissection, GallbladderPackaging,
# CleaningCoagulation, GallbladderRetraction). Our rounded rates following EndoNet's phase-tool pattern.
TOOL_PHASE_PRESENCE = np.array(
    [
        [0.60, 0.95, 0.75, 0.95, 0.85, 0.45, 0.80],  # Grasper
        [0.00, 0.05, 0.00, 0.05, 0.00, 0.55, 0.05],  # Bipolar
        [0.55, 0.95, 0.05, 0.90, 0.00, 0.15, 0.00],  # Hook
        [0.00, 0.00, 0.45, 0.00, 0.00, 0.00, 0.00],  # Scissors
        [0.00, 0.00, 0.70, 0.00, 0.00, 0.05, 0.00],  # Clipper
        [0.00, 0.00, 0.00, 0.05, 0.00, 0.60, 0.20],  # Irrigator
        [0.00, 0.00, 0.00, 0.00, 0.95, 0.15, 0.90],  # SpecimenBag
    ]
)
GRASPER, BIPOLAR, HOOK, SCISSORS, CLIPPER, IRRIGATOR, BAG = range(len(TOOL_NAMES))

# Phase shares of a clip: flatter than real surgery so that short clips still contain every phase.
_PHASE_WEIGHTS = np.array([0.08, 0.26, 0.11, 0.23, 0.10, 0.12, 0.10])
_PHASE_KEEP_PROB = np.array([0.9, 1.0, 1.0, 1.0, 0.85, 0.8, 0.85])

#: The v2 scene variables in :func:`states` (fractions 0..1; no phase, no progress).
STATE_NAMES = (
    "fat",
    "connective_tissue",
    "duct_exposed",
    "artery_exposed",
    "lift",
    "clips",
    "divided",
    "detached",
    "in_bag",
    "retract",
    "blood",
    "coagulation",
    "smoke",
    "wet",
    "irrigating",
    "zoom",
)

# Materials drawn into the appearance map; the label mask is derived from it (several map to one class).
_MATERIALS = (
    "bg",
    "wall",
    "liver",
    "gi",
    "fat",
    "ct",
    "blood",
    "duct",
    "gb",
    "vein",
    "lig",
    "artery",
    "plate",
    "coag",
    "clip",
    "vessel",
)
M = {name: i for i, name in enumerate(_MATERIALS)}
# class names a material is labelled as (first one the schema has), then what it falls back to
_MATERIAL_CLASSES: dict[str, tuple[tuple[str, ...], str | None]] = {
    "bg": (("Black Background",), None),
    "wall": (("Abdominal Wall",), None),
    "liver": (("Liver",), None),
    "gi": (("Gastrointestinal Tract",), None),
    "fat": (("Fat",), None),
    "ct": (("Connective Tissue",), None),
    "blood": (("Blood",), None),
    "duct": (("Cystic Duct",), None),
    "gb": (("Gallbladder",), None),
    "vein": (("Hepatic Vein",), None),
    "lig": (("Liver Ligament",), None),
    "artery": (("Cystic Artery",), None),
    "plate": (("Cystic Plate",), "liver"),
    "coag": (("Coagulation",), "liver"),
    "clip": (("Clip", "Clips", "Surgical Clip"), None),
    "vessel": (("Abdominal Wall",), None),  # small vessels on the peritoneum are part of the wall
}
_TOOL_CLASSES = {
    GRASPER: ("Grasper",),
    BIPOLAR: ("Bipolar", "Bipolar Forceps"),
    HOOK: ("L-hook Electrocautery", "Hook"),
    SCISSORS: ("Scissors",),
    CLIPPER: ("Clipper", "Clip Applier"),
    IRRIGATOR: ("Irrigator", "Suction Irrigator"),
    BAG: ("Specimen Bag",),
}

_BASE_RGB = {
    "bg": (6, 5, 5),
    "wall": (198, 136, 124),
    "liver": (112, 36, 28),
    "gi": (176, 104, 118),
    "fat": (222, 184, 104),
    "ct": (214, 192, 160),
    "blood": (96, 10, 10),
    "duct": (204, 180, 128),
    "gb": (112, 134, 92),
    "vein": (62, 50, 92),
    "lig": (126, 66, 38),
    "artery": (172, 60, 50),
    "plate": (186, 118, 100),
    "coag": (64, 34, 24),
    "clip": (204, 200, 190),
    "vessel": (150, 48, 48),
}
# luminance texture amplitude (coarse), lobule/fibre amplitude (fine), chroma texture amplitude,
# specular gain, surface height (for relief shading)
_SURFACE = {
    "bg": (0.3, 0.0, 0.0, 0.0, 0.0),
    "wall": (0.14, 0.05, 5.0, 0.35, 0.2),
    "liver": (0.18, 0.03, 5.0, 1.0, 0.7),
    "gi": (0.16, 0.05, 6.0, 0.7, 0.5),
    "fat": (0.12, 0.16, 8.0, 0.6, 0.8),
    "ct": (0.14, 0.14, 6.0, 0.5, 0.75),
    "blood": (0.2, 0.04, 4.0, 1.3, 0.72),
    "duct": (0.08, 0.05, 6.0, 0.8, 0.95),
    "gb": (0.12, 0.04, 6.0, 1.1, 1.0),
    "vein": (0.1, 0.03, 5.0, 0.4, 0.7),
    "lig": (0.16, 0.08, 5.0, 0.6, 0.75),
    "artery": (0.08, 0.04, 5.0, 0.8, 0.9),
    "plate": (0.18, 0.12, 6.0, 0.6, 0.62),
    "coag": (0.22, 0.15, 4.0, 0.3, 0.66),
    "clip": (0.04, 0.0, 1.0, 1.6, 1.1),
    "vessel": (0.1, 0.03, 4.0, 0.3, 0.22),
}

_ASPECT_MARGIN = 1.0  # scene units of texture around the nominal view (camera offsets, zoom-out)


# --------------------------------------------------------------------------------------------------------
# plan: every random draw of a clip, made once from the seed, independent of the frame size
# --------------------------------------------------------------------------------------------------------
@dataclass
class _View:
    """Anatomy and looks of one camera view (the main view, or an unrelated view after a camera cut)."""

    liver_edge: np.ndarray
    liver_right: float
    gi: np.ndarray
    omentum: np.ndarray
    fat: np.ndarray
    fat_cover_unit: np.ndarray
    gb_unit: np.ndarray
    gb_center: np.ndarray
    gb_radii: tuple[float, float]
    gb_angle: float
    duct_ctrl: np.ndarray  # (3, 2) from the gallbladder neck to the common bile duct
    artery_ctrl: np.ndarray  # (3, 2) from the gallbladder to the hepatic artery
    ct_unit: np.ndarray
    ct_strand: np.ndarray
    plate_unit: np.ndarray
    lig_pts: np.ndarray
    vein_pts: np.ndarray | None
    vessels: list[np.ndarray]  # small peritoneal vessels (3 control points each)
    blood_spots: np.ndarray  # (K, 4): along-axis, across-axis, rx, ry in the gallbladder-bed frame
    coag_spots: np.ndarray
    bag_center: np.ndarray
    bag_unit: np.ndarray
    focus: np.ndarray  # (7, 2) where the camera looks in each phase
    zoom: np.ndarray  # (7,) zoom in each phase
    cam_angle: float
    flip: bool
    colors: dict[str, np.ndarray]
    unrelated: bool

    def axis(self) -> tuple[np.ndarray, np.ndarray]:
        axis = np.array([math.cos(self.gb_angle), math.sin(self.gb_angle)])
        return axis, np.array([-axis[1], axis[0]])

    def neck(self) -> np.ndarray:
        axis, _ = self.axis()
        return self.gb_center - axis * self.gb_radii[0] * 0.92

    def triangle(self) -> np.ndarray:
        """Hepatocystic triangle: gallbladder neck, a point down the cystic duct, the liver edge above it."""
        neck = self.neck()
        far = bezier(self.duct_ctrl, 20)[12]
        edge_y = float(np.interp(far[0] + 0.04, self.liver_edge[:, 0], self.liver_edge[:, 1]))
        return np.array([neck, far, [far[0] + 0.04, min(edge_y - 0.03, far[1] - 0.15)]])


def _pear(rng: np.random.Generator) -> np.ndarray:
    """Unit gallbladder outline: narrow neck at x = -1, round fundus at x = +1."""
    unit = unit_blob(rng, n=48, rough=0.05)
    unit[:, 1] *= 0.62 + 0.38 * (unit[:, 0] + 1) / 2
    return unit


def _make_view(rng: np.random.Generator, unrelated: bool) -> _View:
    xs = np.linspace(-2.4, 2.4, 40)
    edge_y = rng.uniform(-0.14, 0.0) + rng.uniform(-0.12, 0.12) * xs
    for k in (1.5, 3.0, 5.0):
        edge_y += 0.05 / k * 2 * np.sin(k * xs + rng.uniform(0, 2 * np.pi))
    gb_center = np.array([rng.uniform(0.0, 0.3), rng.uniform(-0.1, 0.0)])
    gb_angle = rng.uniform(-0.6, -0.25)
    gb_radii = (rng.uniform(0.32, 0.42), rng.uniform(0.13, 0.17))
    axis = np.array([math.cos(gb_angle), math.sin(gb_angle)])
    normal = np.array([-axis[1], axis[0]])
    neck = gb_center - axis * gb_radii[0] * 0.92
    duct_end = neck + np.array([rng.uniform(-0.34, -0.22), rng.uniform(0.2, 0.32)])
    duct_ctrl = np.array(
        [neck, (neck + duct_end) / 2 + np.array([rng.uniform(0.04, 0.12), rng.uniform(-0.08, 0.0)]), duct_end]
    )
    artery_start = neck - normal * 0.05 + axis * 0.03
    artery_end = neck + np.array([rng.uniform(-0.42, -0.3), rng.uniform(-0.06, 0.06)])
    artery_ctrl = np.array(
        [artery_start, (artery_start + artery_end) / 2 + np.array([0.0, rng.uniform(0.0, 0.06)]), artery_end]
    )
    lx = rng.uniform(-0.8, 0.5)
    lig = np.array(
        [[lx - 0.15, -1.6], [lx + rng.uniform(-0.1, 0.1), -0.6], [lx + rng.uniform(0.0, 0.2), -0.1]]
    )
    vein = None
    if rng.random() < 0.6:
        vx = rng.uniform(-1.0, 1.0)
        vein = np.array(
            [[vx, -0.9], [vx + rng.uniform(-0.2, 0.2), -0.45], [vx + rng.uniform(-0.3, 0.3), -0.16]]
        )
    vessels = []
    for _ in range(int(rng.integers(3, 7))):
        p0 = np.array([rng.uniform(-1.6, 1.6), rng.uniform(0.1, 0.9)])
        vessels.append(np.array([p0, p0 + rng.uniform(-0.3, 0.3, 2), p0 + rng.uniform(-0.6, 0.6, 2)]))
    spots = np.column_stack(
        [
            rng.uniform(-0.4, 0.4, 14),
            rng.uniform(-0.1, 0.16, 14),
            rng.uniform(0.02, 0.06, 14),
            rng.uniform(0.012, 0.035, 14),
        ]
    )
    coag = np.column_stack(
        [
            rng.uniform(-0.45, 0.4, 16),
            rng.uniform(-0.1, 0.12, 16),
            rng.uniform(0.012, 0.03, 16),
            rng.uniform(0.008, 0.02, 16),
        ]
    )
    colors = {
        key: np.array(rgb, np.float32) + rng.normal(0, 7, 3).astype(np.float32)
        for key, rgb in _BASE_RGB.items()
    }
    gb_tone = rng.random()  # 0 = green-olive, 1 = bluish-pink gallbladder
    colors["gb"] = (1 - gb_tone) * colors["gb"] + gb_tone * np.array([140, 146, 168], np.float32)
    colors["liver"] *= rng.uniform(0.85, 1.15)
    colors["fat"] *= rng.uniform(0.9, 1.08)
    if unrelated:  # elsewhere in the abdomen the light falls differently
        gain = rng.uniform(0.65, 1.1) * rng.uniform(0.9, 1.1, 3)
        colors = {key: rgb * gain.astype(np.float32) for key, rgb in colors.items()}
    far = bezier(duct_ctrl, 20)[12]
    far_edge = float(np.interp(far[0] + 0.04, xs, edge_y))
    tri_c = np.mean([neck, far, [far[0] + 0.04, min(far_edge - 0.03, far[1] - 0.15)]], axis=0)
    bag_center = gb_center + np.array([rng.uniform(0.3, 0.45), rng.uniform(0.22, 0.34)])
    bed = gb_center + normal * 0.04
    if unrelated:  # a different place in the abdomen: the camera wanders, no phase-specific framing
        centre = np.array([rng.uniform(-0.7, 0.7), rng.uniform(-0.5, 0.4)])
        focus = np.tile(centre, (7, 1))
        zoom = np.full(7, rng.uniform(0.75, 1.5))
    else:
        jitter = rng.uniform(-0.06, 0.06, (7, 2))
        focus = (
            np.array(
                [
                    0.6 * gb_center + 0.4 * tri_c,  # preparation: the whole gallbladder area
                    tri_c,  # Calot triangle dissection
                    0.5 * tri_c + 0.5 * neck + np.array([-0.05, 0.06]),  # clipping and cutting
                    bed,  # gallbladder dissection
                    0.5 * gb_center + 0.5 * bag_center,  # packaging
                    bed + np.array([-0.05, 0.05]),  # cleaning and coagulation
                    bag_center + np.array([0.1, -0.15]),  # retraction
                ]
            )
            + jitter
        )
        zoom = np.array([0.92, 1.3, 1.38, 1.1, 0.88, 1.02, 0.82]) * rng.uniform(0.88, 1.12)
    return _View(
        liver_edge=np.column_stack([xs, edge_y]),
        liver_right=rng.uniform(0.7, 1.8),
        gi=place(
            unit_blob(rng),
            (rng.uniform(-1.0, -0.2), rng.uniform(0.6, 0.85)),
            (0.85, 0.32),
            rng.uniform(-0.3, 0.3),
        ),
        omentum=place(
            unit_blob(rng, rough=0.2),
            (rng.uniform(0.2, 1.0), rng.uniform(0.55, 0.8)),
            (0.8, 0.3),
            rng.uniform(-0.3, 0.3),
        ),
        fat=place(
            unit_blob(rng, rough=0.2),
            duct_end + rng.uniform(-0.05, 0.05, 2),
            (0.3, 0.2),
            rng.uniform(-0.5, 0.5),
        ),
        fat_cover_unit=unit_blob(rng, rough=0.22),
        gb_unit=_pear(rng),
        gb_center=gb_center,
        gb_radii=gb_radii,
        gb_angle=gb_angle,
        duct_ctrl=duct_ctrl,
        artery_ctrl=artery_ctrl,
        ct_unit=unit_blob(rng, rough=0.25),
        ct_strand=place(
            unit_blob(rng, rough=0.3),
            (rng.uniform(0.45, 0.85), rng.uniform(0.25, 0.42)),
            (rng.uniform(0.06, 0.12), 0.04),
            rng.uniform(-1, 1),
        ),
        plate_unit=unit_blob(rng, rough=0.12),
        lig_pts=lig,
        vein_pts=vein,
        vessels=vessels,
        blood_spots=spots,
        coag_spots=coag,
        bag_center=bag_center,
        bag_unit=unit_blob(rng, n=40, rough=0.1),
        focus=focus,
        zoom=zoom,
        cam_angle=rng.uniform(-0.12, 0.12) if not unrelated else rng.uniform(-0.5, 0.5),
        flip=bool(unrelated and rng.random() < 0.5),
        colors=colors,
        unrelated=unrelated,
    )


@dataclass
class _Look:
    """Per-video optics: what differs between operating rooms, cameras and patients."""

    gain: float
    tint: np.ndarray  # RGB multipliers (colour temperature / white balance)
    vignette: float
    hotspot: float
    specular: float
    focus_sigma: float
    noise_sigma: float
    gamma: float
    smoke_color: np.ndarray
    tool_entry: np.ndarray  # (7,) angle on the field-of-view circle where each tool enters


@dataclass
class _Plan:
    num_frames: int
    phases: np.ndarray
    progress: np.ndarray
    tools: np.ndarray  # (n, 7) bool
    insertion: np.ndarray  # (n, 7) 0..1
    state: np.ndarray  # (n, len(STATE_NAMES))
    cvs: np.ndarray  # (n, 3)
    clips_duct: np.ndarray  # (n,) clips on the cystic duct (0..3)
    clips_artery: np.ndarray  # (n,) clips on the cystic artery (0..2)
    cam: np.ndarray  # (n, 5): centre x, centre y, zoom, angle, motion-blur length (scene units)
    blur_dir: np.ndarray  # (n,) direction of motion blur (radians, scene frame)
    tool_wiggle: np.ndarray  # (n, 7, 3): tip offset x, y (scene units), jaw opening
    cut_frames: list[int]
    segment: np.ndarray
    views: list[_View]
    look: _Look

    def value(self, name: str, t: int) -> float:
        return float(self.state[t, STATE_NAMES.index(name)])


def _episodes(rng: np.random.Generator, length: int, rate: float, bias: np.ndarray | None) -> np.ndarray:
    """Frames of one phase in which a tool is in view: ``round(rate * length)`` frames (stochastic
    rounding), chosen where a smooth random process is lowest, so they come in episodes, not flicker.
    ``bias`` (per frame) moves the episodes towards the start (positive late) or the end of the phase."""
    on = np.zeros(length, bool)
    count = int(math.floor(rate * length + rng.random()))
    if count <= 0:
        return on
    if count >= length:
        on[:] = True
        return on
    t = np.arange(length, dtype=np.float64)
    process = np.zeros(length)
    for _ in range(3):
        period = rng.uniform(5.0, 24.0)
        process += rng.normal() * np.sin(2 * np.pi * t / period + rng.uniform(0, 2 * np.pi))
    process += 0.15 * rng.standard_normal(length)
    if bias is not None:
        process += bias
    on[np.argsort(process, kind="stable")[:count]] = True
    return on


def _smooth(targets: np.ndarray, alpha: float) -> np.ndarray:
    """First-order lag along frames: the camera glides to a new framing instead of jumping."""
    out = np.empty_like(targets)
    out[0] = targets[0]
    for t in range(1, len(targets)):
        out[t] = out[t - 1] + alpha * (targets[t] - out[t - 1])
    return out


def _make_plan(seed: int, num_frames: int, camera_cuts: int) -> _Plan:
    if num_frames < 1:
        raise UsageError(
            f"a synthetic clip needs at least 1 frame, got {num_frames}", "ask for 1 or more frames"
        )
    if camera_cuts < 0 or (camera_cuts and num_frames < 4 * camera_cuts + 2):
        raise UsageError(
            f"{camera_cuts} camera cuts need at least {4 * camera_cuts + 2} frames, got {num_frames}",
            "ask for more frames or fewer camera cuts",
        )
    # independent streams, so that one concern's draws never shift another's
    r_time, r_tools, r_state, r_cam, r_view, r_look = (
        np.random.default_rng(s) for s in np.random.SeedSequence([seed, 0x5EED, 2]).spawn(6)
    )
    n = num_frames

    # --- phase timeline ------------------------------------------------------------------------------
    keep = r_time.random(7) < _PHASE_KEEP_PROB
    keep[1:4] = True  # Calot dissection, clipping and gallbladder dissection: the core of every case
    weights = np.where(keep, _PHASE_WEIGHTS * r_time.gamma(8.0, 1 / 8.0, 7), 0.0)
    bounds = np.round(np.concatenate([[0.0], np.cumsum(weights / weights.sum())]) * n).astype(int)
    phases = np.zeros(n, np.int64)
    progress = np.zeros(n, np.float64)
    segments = []
    for ph in range(7):
        a, b = bounds[ph], bounds[ph + 1]
        if b > a:
            phases[a:b] = ph
            progress[a:b] = (np.arange(a, b) - a + 0.5) / (b - a)
            segments.append((ph, int(a), int(b)))

    # --- instruments ---------------------------------------------------------------------------------
    tools = np.zeros((n, len(TOOL_NAMES)), bool)
    for ph, a, b in segments:
        prog = progress[a:b]
        for k in range(len(TOOL_NAMES)):
            bias = None
            if k == CLIPPER:
                bias = 3.0 * prog  # clips go on before anything is cut
            elif k == SCISSORS:
                bias = -3.0 * prog
            elif k == BAG:
                bias = 2.0 * prog if ph == 5 else -0.5 * prog
            tools[a:b, k] = _episodes(r_tools, b - a, float(TOOL_PHASE_PRESENCE[k, ph]), bias)
    for k in (GRASPER, HOOK, CLIPPER, BIPOLAR, IRRIGATOR):  # two hands and an assistant: three tools at most
        too_many = tools.sum(axis=1) > 3
        tools[too_many, k] = False
    insertion = np.zeros((n, len(TOOL_NAMES)), np.float32)
    for k in range(len(TOOL_NAMES)):
        on = tools[:, k]
        first = on & ~np.concatenate([[False], on[:-1]])
        insertion[on, k] = 1.0
        insertion[first, k] = 0.7  # sliding in: the tip is already in view

    # --- scene state ---------------------------------------------------------------------------------
    ct_end, ct_gamma = r_state.uniform(0.7, 0.92), r_state.uniform(0.7, 1.4)
    duct0, duct1 = r_state.uniform(0.05, 0.3), r_state.uniform(0.55, 0.85)
    art0, art1 = r_state.uniform(0.1, 0.4), r_state.uniform(0.6, 0.92)
    lift_start, lift_calot = r_state.uniform(0.35, 0.75), r_state.uniform(0.3, 0.8)
    c1_thr, c2_thr, c3_thr = (
        r_state.uniform(0.8, 0.95),
        r_state.uniform(0.05, 0.2),
        r_state.uniform(0.42, 0.6),
    )
    bleed = r_state.uniform(0.4, 1.4)
    smoke_prone = r_state.uniform(0.15, 1.0)
    activity = r_state.uniform(0.3, 1.0, n)  # how hard the energy device works in each frame
    irrigate = r_state.random(n) < 0.6
    cut_default = r_state.uniform(0.55, 0.8)

    def ramp(x: np.ndarray, a: float, b: float) -> np.ndarray:
        return np.clip((x - a) / (b - a), 0.0, 1.0)

    p = progress
    fat = np.select([phases == 0, phases == 1], [1.0 - 0.85 * p, 0.15 * np.clip(1.0 - p / 0.3, 0, 1)], 0.0)
    ct = np.select([phases == 0, phases == 1], [np.ones(n), np.clip(1.0 - p / ct_end, 0, 1) ** ct_gamma], 0.0)
    duct_exposed = np.select([phases == 0, phases == 1], [np.zeros(n), ramp(p, duct0, duct1)], 1.0)
    artery_exposed = np.select([phases == 0, phases == 1], [np.zeros(n), ramp(p, art0, art1)], 1.0)
    lift = np.select(
        [phases == 0, phases == 1, phases == 2, phases == 3],
        [
            np.zeros(n),
            lift_calot * ramp(p, lift_start, 1.0),
            np.full(n, lift_calot),
            lift_calot + (1 - lift_calot) * p,
        ],
        1.0,
    )
    # clips go on while the clipper is in view during clipping and cutting; then the scissors divide
    clips_duct = np.where(phases > 2, 3, 0)
    clips_artery = np.where(phases > 2, 2, 0)
    divided = phases > 2
    seg_clip = [(a, b) for ph, a, b in segments if ph == 2]
    if seg_clip:
        a, b = seg_clip[0]
        working = np.flatnonzero(tools[a:b, CLIPPER]) + a
        if len(working) == 0:  # clipped while the camera looked elsewhere
            working = np.arange(a, max(a + 1, a + int(0.5 * (b - a))))
        order = np.linspace(0, len(working) - 1, 5).round().astype(int)
        applied = working[order]  # frames at which clips 1..5 go on (duct, artery, duct, artery, duct)
        for i, frame in enumerate(applied):
            target = clips_duct if i % 2 == 0 else clips_artery
            target[frame:b] += 1
        scissors = np.flatnonzero(tools[a:b, SCISSORS]) + a
        scissors = scissors[scissors > applied[-1]]
        cut_at = int(scissors[len(scissors) // 2]) if len(scissors) else int(a + cut_default * (b - a))
        cut_at = max(cut_at, int(applied[-1]) + 1)
        divided = divided | ((phases == 2) & (np.arange(n) >= cut_at))
    detached = (phases >= 4).astype(np.float64)
    in_bag = np.select([phases == 4, phases > 4], [p, np.ones(n)], 0.0)
    retract = np.where(phases == 6, p**1.5, 0.0)
    blood = bleed * np.select(
        [phases == 1, phases == 2, phases == 3, phases == 4, phases == 5, phases == 6],
        [0.1 * p, np.full(n, 0.12), 0.15 + 0.5 * p, np.full(n, 0.6), 0.65 * (1 - 0.85 * p), np.full(n, 0.12)],
        0.0,
    )
    coag = np.select(
        [phases == 1, phases == 2, phases == 3, phases == 4, phases == 5],
        [0.1 * p, np.full(n, 0.12), 0.12 + 0.6 * p, np.full(n, 0.72), 0.72 + 0.28 * p],
        np.where(phases == 6, 1.0, 0.0),
    )
    energy = (tools[:, HOOK] | tools[:, BIPOLAR]) * activity
    smoke = np.zeros(n)
    for t in range(n):
        smoke[t] = (0.55 * smoke[t - 1] if t else 0.0) + 0.45 * energy[t]
    smoke *= smoke_prone
    irrigating = (tools[:, IRRIGATOR] & irrigate).astype(np.float64)
    wet = np.zeros(n)
    for t in range(n):
        wet[t] = max(irrigating[t], 0.85 * wet[t - 1] if t else 0.0)
    # C1 two structures entering the gallbladder; C2 triangle cleared; C3 lower third off the cystic plate
    cvs = np.stack(
        [
            np.minimum(duct_exposed, artery_exposed) >= c1_thr,
            (ct <= c2_thr) & (fat <= 0.02),
            lift >= c3_thr,
        ],
        axis=1,
    ).astype(np.float32)

    # --- camera cuts and views ------------------------------------------------------------------------
    cut_frames: list[int] = []
    if camera_cuts:
        slots = np.sort(r_cam.choice(np.arange(n - 4 * camera_cuts - 1), camera_cuts, replace=False))
        cut_frames = [int(s + 4 * i + 3) for i, s in enumerate(slots)]
    segment = np.zeros(n, np.int64)
    for c in cut_frames:
        segment[c:] += 1
    views = [_make_view(r_view, unrelated=i > 0) for i in range(camera_cuts + 1)]

    # --- camera path: phase framing, glide, wander, shake and quick pans -----------------------------
    shaky = r_cam.uniform(0.5, 1.6)
    targets = np.zeros((n, 3))
    for t in range(n):
        view = views[segment[t]]
        targets[t, :2] = view.focus[phases[t]]
        targets[t, 2] = view.zoom[phases[t]]
    path = np.empty_like(targets)
    start = 0
    for end in [*cut_frames, n]:  # the glide restarts after a cut: a new view is framed at once
        path[start:end] = _smooth(targets[start:end], 0.35)
        start = end
    tt = np.arange(n)[:, None]
    freq, phase0 = r_cam.uniform(1 / 60, 1 / 15, (1, 4)), r_cam.uniform(0, 2 * np.pi, (1, 4))
    wander = np.sin(2 * np.pi * freq * tt + phase0) * np.array([0.06, 0.045, 0.05, 0.03]) * shaky
    shake = r_cam.normal(0, 0.012 * shaky, (n, 2))
    pans = np.zeros((n, 2))
    kick = r_cam.random(n) < 0.07 * shaky
    for t in range(n):
        pans[t] = (0.45 * pans[t - 1] if t else 0.0) + (kick[t] * r_cam.normal(0, 0.14, 2))
    centre = path[:, :2] + wander[:, :2] + shake + pans
    zoom = path[:, 2] * (1 + 0.6 * wander[:, 2])
    angle = np.array([views[segment[t]].cam_angle for t in range(n)]) + wander[:, 3]
    motion = np.zeros(n)
    blur_dir = np.zeros(n)
    step = np.diff(centre, axis=0, prepend=centre[:1])
    step[[c for c in cut_frames]] = 0.0
    motion[:] = 0.12 * np.hypot(step[:, 0], step[:, 1])
    blur_dir[:] = np.arctan2(step[:, 1], step[:, 0])
    cam = np.column_stack([centre, zoom, angle, motion])

    # tool tips wobble a little around their targets; graspers and scissors open and close
    tf, tp = r_tools.uniform(1 / 12, 1 / 3, (1, 7, 3)), r_tools.uniform(0, 2 * np.pi, (1, 7, 3))
    wiggle = np.sin(2 * np.pi * tf * np.arange(n)[:, None, None] + tp) * np.array([0.04, 0.04, 1.0])

    look = _Look(
        gain=float(r_look.uniform(0.78, 1.18)),
        tint=(1 + r_look.uniform(-0.07, 0.07, 3) * np.array([1.0, 0.3, 1.0])).astype(np.float32),
        vignette=float(r_look.uniform(0.3, 0.65)),
        hotspot=float(r_look.uniform(0.0, 0.25)),
        specular=float(r_look.uniform(0.5, 1.5)),
        focus_sigma=float(r_look.uniform(0.6, 1.4)),
        noise_sigma=float(r_look.uniform(1.5, 3.5)),
        gamma=float(r_look.uniform(0.85, 1.15)),
        smoke_color=np.array([212, 206, 200], np.float32) * r_look.uniform(0.9, 1.05),
        tool_entry=np.array(
            [
                r_look.uniform(-1.25, -0.45),  # grasper: right subcostal port, upper right
                r_look.uniform(2.0, 2.7),  # bipolar: lower left
                r_look.uniform(2.7, 3.4),  # hook: epigastric port, left
                r_look.uniform(2.6, 3.3),  # scissors
                r_look.uniform(2.5, 3.2),  # clipper
                r_look.uniform(3.4, 4.0),  # irrigator: upper left
                r_look.uniform(0.3, 0.9),  # specimen bag: lower right
            ]
        ),
    )
    state = np.column_stack(
        [
            fat,
            ct,
            duct_exposed,
            artery_exposed,
            lift,
            (clips_duct + clips_artery) / 5.0,
            divided,
            detached,
            in_bag,
            retract,
            np.clip(blood, 0, 1),
            coag,
            np.clip(smoke, 0, 1),
            wet,
            irrigating,
            zoom / 1.5,
        ]
    ).astype(np.float32)
    return _Plan(
        num_frames=n,
        phases=phases,
        progress=progress,
        tools=tools,
        insertion=insertion,
        state=state,
        cvs=cvs,
        clips_duct=clips_duct.astype(np.int64),
        clips_artery=clips_artery.astype(np.int64),
        cam=cam,
        blur_dir=blur_dir,
        tool_wiggle=wiggle,
        cut_frames=cut_frames,
        segment=segment,
        views=views,
        look=look,
    )


def timeline(seed: int, num_frames: int, camera_cuts: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Phases, CVS and cut indices of a clip without rendering it."""
    plan = _make_plan(seed, num_frames, camera_cuts)
    return plan.phases.copy(), plan.cvs.copy(), list(plan.cut_frames)


def states(seed: int, num_frames: int, camera_cuts: int) -> SceneStates:
    """True scene state (``STATE_NAMES``) and Cholec80 tool presence per frame, without rendering."""
    plan = _make_plan(seed, num_frames, camera_cuts)
    return SceneStates(STATE_NAMES, plan.state.copy(), plan.tools.astype(np.uint8))


# --------------------------------------------------------------------------------------------------------
# renderer: per-clip precomputation (textures, optics, noise) and per-frame drawing
# --------------------------------------------------------------------------------------------------------
_DUCT_CLIPS = (0.58, 0.47, 0.18)  # along the duct from the gallbladder (0) to the bile duct (1), in order
_ARTERY_CLIPS = (0.52, 0.2)
_DUCT_CUT, _ARTERY_CUT, _GAP = 0.32, 0.36, 0.035
_SHAFT_BLACK = ((24, 24, 26), (58, 60, 64), (150, 152, 158))
_SHAFT_METAL = ((84, 86, 90), (160, 163, 168), (236, 237, 240))
_JAW_METAL = (178, 182, 188)


def _class_id(schema: LabelSchema, names: tuple[str, ...], fallback: int) -> int:
    for name in names:
        if schema.has_class(name):
            return schema.class_id(name)
    return fallback


class _Renderer:
    def __init__(self, seed: int, plan: _Plan, height: int, width: int, schema: LabelSchema) -> None:
        if height < 16 or width < 16:
            raise UsageError(
                f"frame size must be at least 16x16, got {height}x{width}", "ask for a larger frame"
            )
        self.plan, self.h, self.w = plan, height, width
        ignore = schema.ignore_index
        self.mat2cls = np.full(256, ignore, np.uint8)
        for name, (names, fallback) in _MATERIAL_CLASSES.items():
            fallback_id = _class_id(schema, _MATERIAL_CLASSES[fallback][0], ignore) if fallback else ignore
            self.mat2cls[M[name]] = _class_id(schema, names, fallback_id)
        self.bg_id = int(self.mat2cls[M["bg"]])
        self.tool_ids = [_class_id(schema, _TOOL_CLASSES[k], ignore) for k in range(len(TOOL_NAMES))]
        rng = np.random.default_rng([seed, 0x7E47, 2, height, width])
        look = plan.look

        # texture canvas in scene units (camera-locked tissue detail), 0.6 px per frame pixel
        aspect = width / height
        self.xr, self.yr = aspect / 2 + _ASPECT_MARGIN + 0.8, 0.5 + _ASPECT_MARGIN + 0.8
        self.res = 0.6 * height
        th, tw = int(2 * self.yr * self.res), int(2 * self.xr * self.res)
        tex = np.empty((th, tw, 4), np.float32)  # coarse luminance, lobules / fibres, chroma, glints
        noise = []
        for cells in (5, 16, 48):
            small = rng.standard_normal((max(2, int(cells * th / tw)), cells)).astype(np.float32)
            layer = cv2.resize(small, (tw, th), interpolation=cv2.INTER_CUBIC)
            noise.append(layer / (layer.std() + 1e-6))
        tex[..., 0] = 0.65 * noise[0] + 0.35 * noise[1]
        tex[..., 1] = noise[2]
        tex[..., 2] = noise[1]
        # specular reflections: small soft-edged patches, a few elongated, densest where the noise peaks
        spots = cv2.resize(
            rng.standard_normal((max(2, th // 8), max(2, tw // 8))).astype(np.float32),
            (tw, th),
            interpolation=cv2.INTER_CUBIC,
        )
        spots = cv2.GaussianBlur(spots, (0, 0), sigmaX=2.0, sigmaY=1.0)
        tex[..., 3] = np.clip((spots / (spots.std() + 1e-6) - 2.3) * 0.9, 0, 1) ** 1.5
        self.tex = tex
        self.tex_to_scene = np.array([[1 / self.res, 0, -self.xr], [0, 1 / self.res, -self.yr], [0, 0, 1]])

        # endoscope optics: circular field of view, vignetting, a hot spot, white balance and gain
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        self.fov_c = np.array(
            [width / 2 + rng.uniform(-0.02, 0.02) * width, height / 2 + rng.uniform(-0.02, 0.02) * height]
        )
        self.fov_r = rng.uniform(0.44, 0.5) * width
        dist = np.sqrt((xx - self.fov_c[0]) ** 2 + (yy - self.fov_c[1]) ** 2) / self.fov_r
        self.outside = dist >= 1.0
        rim = np.clip((1.0 - dist) * self.fov_r / 3.0, 0, 1)
        hot = 1.0 + look.hotspot * np.exp(-((dist / 0.45) ** 2))
        light = (1.0 - look.vignette * np.clip(dist, 0, 1) ** 2) * rim * hot * look.gain
        self.light = (light[..., None] * look.tint[None, None, :]).astype(np.float32)
        self.noise = [
            rng.normal(0, look.noise_sigma, (height, width, 3)).astype(np.float32) for _ in range(3)
        ]
        gamma = (np.arange(256) / 255.0) ** look.gamma * 255.0
        self.gamma_lut = np.clip(np.round(gamma), 0, 255).astype(np.uint8)
        sh, sw = max(4, height // 8), max(4, width // 8)
        smoke = cv2.resize(
            rng.random((6, 24)).astype(np.float32), (2 * sw, sh), interpolation=cv2.INTER_CUBIC
        )
        self.smoke_canvas = np.clip(smoke, 0, 1)

        # what does not move within a view, drawn back to front: peritoneum, organs, the gallbladder bed
        self.layers, self.spots = [], []
        for view in plan.views:
            axis, normal = view.axis()
            edge = view.liver_edge[view.liver_edge[:, 0] <= view.liver_right]
            tri = view.triangle()
            r_in = _inradius(tri)
            spread = tri[1] - tri[0]
            layers = [("line", bezier(v, 10), M["vessel"], 0.008) for v in view.vessels]
            layers += [
                ("fill", view.omentum, M["fat"], 0.0),
                ("fill", view.gi, M["gi"], 0.0),
                ("fill", np.vstack([edge, [[edge[-1, 0] + 0.3, -3.0], [edge[0, 0], -3.0]]]), M["liver"], 0.0),
                ("line", bezier(view.lig_pts, 12), M["lig"], 0.07),
            ]
            if view.vein_pts is not None:
                layers.append(("line", bezier(view.vein_pts, 12), M["vein"], 0.024))
            layers += [
                ("fill", view.fat, M["fat"], 0.0),
                # the liver under the gallbladder, and seen through the hepatocystic triangle once cleared
                ("fill", place(view.gb_unit, view.gb_center, view.gb_radii, view.gb_angle), M["liver"], 0.0),
                (
                    "fill",
                    place(
                        view.ct_unit,
                        tri.mean(axis=0),
                        (2.2 * r_in, 1.6 * r_in),
                        math.atan2(spread[1], spread[0]),
                    ),
                    M["liver"],
                    0.0,
                ),
                (
                    "fill",
                    place(
                        view.plate_unit,
                        view.gb_center - axis * view.gb_radii[0] * 0.5,
                        (view.gb_radii[0] * 0.5, view.gb_radii[1] * 0.8),
                        view.gb_angle,
                    ),
                    M["plate"],
                    0.0,
                ),
            ]
            self.layers.append(layers)
            self.spots.append(
                [
                    [
                        place(
                            ELLIPSE, view.gb_center + axis * x + normal * y, (rx, ry), view.gb_angle + 3 * x
                        )
                        for x, y, rx, ry in spots
                    ]
                    for spots in (view.coag_spots, view.blood_spots)
                ]
            )

        # lookup tables by material, one set per view (tissue colours differ between unrelated views)
        self.luts = []
        for view in plan.views:
            col = np.zeros((256, 1, 3), np.float32)  # cv2.LUT tables: 256 entries, by material id
            amp = np.zeros(256, np.float32)
            fine = np.zeros(256, np.float32)
            chroma = np.zeros((256, 1, 3), np.float32)
            spec = np.zeros(256, np.float32)
            elevation = np.zeros(256, np.float32)
            for key, i in M.items():
                col[i, 0] = view.colors[key]
                a, f, c, s, e = _SURFACE[key]
                amp[i], fine[i], spec[i], elevation[i] = a, f, s * look.specular, e
                chroma[i, 0] = c * np.array([1.0, -0.6, -0.4], np.float32) if key != "bg" else 0
            self.luts.append((col, amp, fine, chroma, spec, elevation))

    # --- geometry helpers -----------------------------------------------------------------------------
    def camera(self, t: int) -> np.ndarray:
        """2x3 affine scene -> frame pixels."""
        cx, cy, zoom, angle, _ = self.plan.cam[t]
        lin = rot(angle) * zoom * self.h
        if self.plan.views[self.plan.segment[t]].flip:
            lin = lin @ np.diag([-1.0, 1.0])
        off = np.array([self.w / 2, self.h / 2]) - lin @ np.array([cx, cy])
        return np.hstack([lin, off[:, None]])

    @staticmethod
    def _px(pts: np.ndarray, cam: np.ndarray) -> np.ndarray:
        return np.round((pts @ cam[:, :2].T + cam[:, 2]) * 16).astype(np.int32)

    def fill(self, canvas: np.ndarray, pts: np.ndarray, cam: np.ndarray, value: int) -> None:
        cv2.fillPoly(canvas, [self._px(pts, cam)], int(value), cv2.LINE_8, 4)

    def line(self, canvas: np.ndarray, pts: np.ndarray, cam: np.ndarray, value: int, width: float) -> None:
        thick = max(1, int(round(width * abs(np.linalg.det(cam[:, :2])) ** 0.5)))
        cv2.polylines(canvas, [self._px(pts, cam)], False, int(value), thick, cv2.LINE_8, 4)

    def _blend(self, img: np.ndarray, poly_px: np.ndarray, color: np.ndarray, alpha: float) -> None:
        """Alpha-blend a filled polygon (pixel coordinates with 4 fractional bits) inside its bounding box."""
        x, y, bw, bh = cv2.boundingRect(poly_px >> 4)
        x0, y0, x1, y1 = max(0, x - 1), max(0, y - 1), min(self.w, x + bw + 2), min(self.h, y + bh + 2)
        if x1 <= x0 or y1 <= y0:
            return
        a = np.zeros((y1 - y0, x1 - x0), np.uint8)
        cv2.fillPoly(a, [poly_px - np.array([x0 * 16, y0 * 16], np.int32)], 255, cv2.LINE_AA, 4)
        roi = img[y0:y1, x0:x1]
        roi += (np.asarray(color, np.float32) - roi) * (a.astype(np.float32) * (alpha / 255.0))[..., None]

    # --- the scene at frame t --------------------------------------------------------------------------
    def _gallbladder_pose(self, view: _View, t: int) -> tuple[np.ndarray, float, float]:
        """Centre, angle and scale of the gallbladder: its neck swings off the cystic plate as it is lifted,
        then it travels into the specimen bag."""
        plan = self.plan
        lift, in_bag = plan.value("lift", t), plan.value("in_bag", t)
        axis, normal = view.axis()
        fundus = view.gb_center + axis * view.gb_radii[0] * 0.9
        theta = -0.5 * lift
        center = fundus + rot(theta) @ (view.gb_center - fundus) + normal * 0.05 * lift
        angle, scale = view.gb_angle + theta, 1.0
        if in_bag > 0:
            bag_c = self._bag_center(view, t)
            center = (1 - in_bag) * center + in_bag * bag_c
            angle = angle + 0.6 * in_bag
            scale = 1.0 - 0.45 * in_bag
        return center, angle, scale

    def _bag_center(self, view: _View, t: int) -> np.ndarray:
        retract = self.plan.value("retract", t)
        return view.bag_center + np.array([0.55, -1.0]) * retract

    def _structure(self, ctrl: np.ndarray, neck: np.ndarray, n: int = 32) -> np.ndarray:
        return bezier(np.array([neck, ctrl[1], ctrl[2]]), n)

    def render(self, t: int) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
        plan = self.plan
        value = plan.value
        seg = int(plan.segment[t])
        view = plan.views[seg]
        phase = int(plan.phases[t])
        cam = self.camera(t)
        axis, normal = view.axis()
        mat = np.full((self.h, self.w), M["wall"], np.uint8)
        for kind, pts, material, width in self.layers[seg]:
            if kind == "fill":
                self.fill(mat, pts, cam, material)
            else:
                self.line(mat, pts, cam, material, width)
        tri = view.triangle()
        tri_c = tri.mean(axis=0)
        r_in = _inradius(tri)
        for polys, amount, material in (
            (self.spots[seg][0], value("coagulation", t), M["coag"]),
            (self.spots[seg][1], value("blood", t), M["blood"]),
        ):
            count = int(round(amount * len(polys)))
            if count:
                cv2.fillPoly(mat, [self._px(poly, cam) for poly in polys[:count]], material, cv2.LINE_8, 4)

        # gallbladder (not drawn once it lies in the bag out of view), cystic duct and artery with clips
        center, angle, scale = self._gallbladder_pose(view, t)
        gb = place(view.gb_unit, center, (view.gb_radii[0] * scale, view.gb_radii[1] * scale), angle)
        detached = value("detached", t) > 0.5
        bag_in_view = bool(plan.tools[t, BAG])
        if not detached or bag_in_view or phase == 4:
            self.fill(mat, gb, cam, M["gb"])
        gb_axis = np.array([math.cos(angle), math.sin(angle)])
        neck = center - gb_axis * view.gb_radii[0] * scale * 0.92
        divided = value("divided", t) > 0.5
        for ctrl, width, material, clip_at, cut, n_clips, exposed in (
            (
                view.duct_ctrl,
                0.042,
                "duct",
                _DUCT_CLIPS,
                _DUCT_CUT,
                plan.clips_duct[t],
                value("duct_exposed", t),
            ),
            (
                view.artery_ctrl,
                0.026,
                "artery",
                _ARTERY_CLIPS,
                _ARTERY_CUT,
                plan.clips_artery[t],
                value("artery_exposed", t),
            ),
        ):
            start = neck if not detached else ctrl[0]
            if material == "artery" and not detached:
                start = neck - np.array([-gb_axis[1], gb_axis[0]]) * 0.05 + gb_axis * 0.03
            curve = self._structure(ctrl, start, 64)
            s = np.linspace(0, 1, len(curve))
            if not divided:
                pieces = [curve]
            elif not detached:
                pieces = [curve[s <= cut - _GAP], curve[s >= cut + _GAP]]
            else:
                pieces = [curve[s >= cut + _GAP]]
            for piece in pieces:
                if len(piece) > 1:
                    self.line(mat, piece, cam, M[material], width)
            for k, at in enumerate(clip_at[: int(n_clips)]):
                if detached and at < cut:
                    continue  # that clip left with the gallbladder
                i = min(len(curve) - 2, int(at * (len(curve) - 1)))
                tangent = curve[i + 1] - curve[i]
                tangent /= np.linalg.norm(tangent) + 1e-9
                across = np.array([-tangent[1], tangent[0]])
                half_len, half_w = width * 1.5, 0.012
                quad = np.array(
                    [
                        curve[i] + across * half_len + tangent * half_w,
                        curve[i] + across * half_len - tangent * half_w,
                        curve[i] - across * half_len - tangent * half_w,
                        curve[i] - across * half_len + tangent * half_w,
                    ]
                )
                self.fill(mat, quad, cam, M["clip"])
                del k
            covered = 0.85 * (1.0 - exposed)  # fibro-fatty sheath next to the gallbladder, until dissected
            if covered > 0.02:
                self.line(mat, curve[s <= covered], cam, M["ct"], width * 2.4)

        # hepatocystic triangle: connective tissue and fat shrink as it is cleared; a strand always remains
        ct = value("connective_tissue", t)
        if ct > 0.01:
            r = 0.5 * r_in + 0.05
            self.fill(
                mat, place(view.ct_unit, tri_c, (1.7 * r * ct**0.5, 1.3 * r * ct**0.5), 0.5), cam, M["ct"]
            )
        self.fill(mat, view.ct_strand, cam, M["ct"])
        fat = value("fat", t)
        if fat > 0.01:  # omental fat over the gallbladder and the triangle during preparation
            cover = place(
                view.fat_cover_unit,
                0.5 * view.gb_center + 0.5 * tri_c,
                (0.45 * fat**0.5, 0.3 * fat**0.5),
                view.gb_angle,
            )
            self.fill(mat, cover, cam, M["fat"])

        # colour from materials: warped tissue textures, relief shading, glints (stronger when wet)
        col, amp, fine, chroma, spec, elevation = self.luts[seg]
        tex_m = (np.vstack([cam, [0, 0, 1]]) @ self.tex_to_scene)[:2]
        coarse, lobules, tint, glints = cv2.split(
            cv2.warpAffine(
                self.tex, tex_m, (self.w, self.h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
            )
        )
        height_map = cv2.LUT(mat, elevation)
        small = cv2.resize(
            height_map, (max(4, self.w // 4), max(4, self.h // 4)), interpolation=cv2.INTER_AREA
        )
        small = cv2.GaussianBlur(small, (0, 0), max(1.0, self.h / 200))
        relief = height_map - cv2.resize(small, (self.w, self.h), interpolation=cv2.INTER_LINEAR)
        lum = cv2.LUT(mat, amp) * coarse + cv2.LUT(mat, fine) * lobules + 0.9 * relief + 1.0
        mat3 = cv2.merge([mat, mat, mat])
        img = cv2.LUT(mat3, col) * lum[..., None] + cv2.LUT(mat3, chroma) * tint[..., None]
        glint = (
            glints
            * cv2.LUT(mat, spec)
            * np.clip(8.0 * relief + 0.6, 0.0, 1.5)
            * (1.0 + 1.5 * value("wet", t))
        )
        img += (250.0 - img) * np.minimum(glint, 1.0)[..., None]
        mask = cv2.LUT(mat, self.mat2cls)

        # specimen bag, then the instruments, nearest last
        if bag_in_view:
            self._bag(img, mask, view, cam, t)
        for k in (IRRIGATOR, CLIPPER, SCISSORS, BIPOLAR, HOOK, GRASPER):
            if plan.tools[t, k]:
                self._tool(img, mask, k, view, cam, t, tri_c, neck)

        # surgical smoke, optics, motion blur, sensor noise, camera gamma
        smoke = value("smoke", t)
        if smoke > 0.02:
            sh, sw2 = self.smoke_canvas.shape
            off = int(t * 3) % (sw2 // 2)
            field = cv2.resize(self.smoke_canvas[:, off : off + sw2 // 2], (self.w, self.h))
            haze = np.minimum(0.45, smoke * (0.1 + 0.6 * field))[..., None]
            img += (self.plan.look.smoke_color - img) * haze
        img *= self.light
        img = cv2.GaussianBlur(img, (5, 5), self.plan.look.focus_sigma)
        streak = float(plan.cam[t, 4] * plan.cam[t, 2] * self.h)
        if streak >= 3.0:
            img = _motion_blur(img, min(streak, 0.04 * self.h), float(plan.blur_dir[t] + plan.cam[t, 3]))
        img += self.noise[t % 3]
        frame = cv2.LUT(np.clip(img, 0, 255).astype(np.uint8), self.gamma_lut)
        mask[self.outside] = self.bg_id
        return frame, mask, phase, plan.cvs[t].copy()

    # --- specimen bag and instruments -----------------------------------------------------------------
    def _bag(self, img: np.ndarray, mask: np.ndarray, view: _View, cam: np.ndarray, t: int) -> None:
        """A translucent plastic retrieval bag with a bright rim at its opening (label: the bag's class)."""
        retract = self.plan.value("retract", t)
        centre = self._bag_center(view, t)
        radii = np.array([0.3, 0.21]) * (1 - 0.4 * retract)
        bag = place(view.bag_unit, centre, radii, -0.5)
        px = self._px(bag, cam)
        cv2.fillPoly(mask, [px], int(self.tool_ids[BAG]), cv2.LINE_8, 4)
        self._blend(img, px, np.array([214, 222, 232], np.float32), 0.62)
        for k in range(3):  # folds
            fold = place(
                ELLIPSE[4:13], centre + np.array([0.04 * k - 0.05, 0.02 * k]), radii * (0.8 - 0.2 * k), 0.3
            )
            cv2.polylines(
                img, [self._px(fold, cam)], False, (150, 160, 175), max(1, self.h // 160), cv2.LINE_AA, 4
            )
        rim = place(
            ELLIPSE, centre + rot(-0.5) @ np.array([-radii[0] * 0.85, 0.0]), (0.04, radii[1] * 0.9), -0.5
        )
        cv2.polylines(img, [self._px(rim, cam)], True, (240, 242, 246), max(1, self.h // 90), cv2.LINE_AA, 4)

    def _tool_target(self, k: int, view: _View, t: int, tri_c: np.ndarray, neck: np.ndarray) -> np.ndarray:
        """Where each instrument works in each phase (scene units)."""
        phase = int(self.plan.phases[t])
        axis, normal = view.axis()
        bed = view.gb_center + normal * 0.02
        center, _, _ = self._gallbladder_pose(view, t)
        if k == GRASPER:
            if phase <= 3:
                return center + axis * view.gb_radii[0] * 0.7
            return self._bag_center(view, t) + np.array([-0.1, -0.12]) if phase >= 4 else center
        if k == HOOK:
            if phase == 0:
                return 0.5 * view.gb_center + 0.5 * tri_c
            if phase in (1, 2):
                return 0.5 * tri_c + 0.5 * neck
            return bed + axis * (0.3 - 0.6 * float(self.plan.progress[t])) * view.gb_radii[0]
        if k == BIPOLAR:
            x, y = view.blood_spots[0, :2]
            return view.gb_center + axis * x + normal * y
        if k in (SCISSORS, CLIPPER):
            ctrl = (
                view.duct_ctrl
                if (k == SCISSORS or self.plan.clips_duct[t] <= self.plan.clips_artery[t])
                else view.artery_ctrl
            )
            curve = bezier(np.array([neck, ctrl[1], ctrl[2]]), 32)
            return curve[int((_DUCT_CUT if k == SCISSORS else 0.45) * 31)]
        if k == IRRIGATOR:
            return bed + normal * 0.08 if phase != 6 else self._bag_center(view, t)
        return bed

    def _tool(
        self,
        img: np.ndarray,
        mask: np.ndarray,
        k: int,
        view: _View,
        cam: np.ndarray,
        t: int,
        tri_c: np.ndarray,
        neck: np.ndarray,
    ) -> None:
        """One instrument: a shaft from outside the field of view to its tip, then its own head."""
        plan, h = self.plan, self.h
        wx, wy, wo = plan.tool_wiggle[t, k]
        target = self._tool_target(k, view, t, tri_c, neck) + np.array([wx, wy])
        tip = target @ cam[:, :2].T + cam[:, 2]
        from_centre = tip - self.fov_c
        reach = float(np.hypot(*from_centre))
        if reach > 0.78 * self.fov_r:  # keep at least half the tip in view (Cholec80's presence rule)
            tip = self.fov_c + from_centre * (0.78 * self.fov_r / reach)
        angle = float(plan.look.tool_entry[k])
        entry = self.fov_c + 1.3 * self.fov_r * np.array([math.cos(angle), math.sin(angle)])
        tip = entry + (tip - entry) * float(plan.insertion[t, k])
        d = tip - entry
        d = d / (float(np.hypot(*d)) + 1e-6)
        n = np.array([-d[1], d[0]])
        cid = int(self.tool_ids[k])
        w_tip = {CLIPPER: 0.075, IRRIGATOR: 0.036}.get(k, 0.05) * h
        palette = _SHAFT_METAL if k in (CLIPPER, IRRIGATOR) else _SHAFT_BLACK
        self._shaft(img, mask, entry, tip, 1.9 * w_tip, w_tip, palette, cid)
        opening = 0.5 + 0.5 * wo
        if k == GRASPER:
            for sign in (-1, 1):
                jd = rot(sign * (0.12 + 0.3 * opening)) @ d
                jn = np.array([-jd[1], jd[0]])
                jaw = np.array([tip + jn * w_tip * 0.45, tip + jd * 0.09 * h, tip - jn * w_tip * 0.45])
                self._poly(img, mask, jaw, _JAW_METAL, cid)
                slot = np.array(
                    [
                        tip + jd * 0.02 * h + jn * w_tip * 0.12,
                        tip + jd * 0.065 * h,
                        tip + jd * 0.02 * h - jn * w_tip * 0.12,
                    ]
                )
                self._poly(img, None, slot, (70, 70, 74), cid)
        elif k == HOOK:
            a = tip + d * 0.06 * h
            b = a + n * 0.032 * h
            self._wire(img, mask, np.array([tip, a, b]), max(1, int(0.018 * h)), (214, 214, 208), cid)
        elif k == BIPOLAR:
            band = np.array(
                [
                    tip - d * 0.035 * h + n * w_tip / 2,
                    tip + n * w_tip / 2,
                    tip - n * w_tip / 2,
                    tip - d * 0.035 * h - n * w_tip / 2,
                ]
            )
            self._poly(img, mask, band, (38, 92, 196), cid)
            for sign in (-1, 1):
                jd = rot(sign * 0.08 * opening) @ d
                jn = np.array([-jd[1], jd[0]])
                jaw = np.array([tip + jn * w_tip * 0.28 * sign, tip + jd * 0.065 * h, tip])
                self._poly(img, mask, jaw, _JAW_METAL, cid)
        elif k == SCISSORS:
            for sign in (-1, 1):
                jd = rot(sign * (0.05 + 0.3 * opening)) @ d
                jn = np.array([-jd[1], jd[0]])
                blade = np.array(
                    [
                        tip + jn * w_tip * 0.35,
                        tip + jd * 0.05 * h + jn * 0.012 * h,
                        tip + jd * 0.085 * h + jn * 0.03 * h,
                        tip + jd * 0.05 * h - jn * 0.004 * h,
                        tip - jn * w_tip * 0.35,
                    ]
                )
                self._poly(img, mask, blade, (198, 170, 108), cid)
        elif k == CLIPPER:
            for sign in (-1, 1):
                jaw = np.array(
                    [
                        tip + n * sign * w_tip * 0.45,
                        tip + n * sign * w_tip * 0.2 + d * 0.085 * h,
                        tip + n * sign * w_tip * 0.05 + d * 0.085 * h,
                        tip + n * sign * w_tip * 0.2,
                    ]
                )
                self._poly(img, mask, jaw, _JAW_METAL, cid)
            clip = np.array(
                [
                    tip + d * 0.085 * h + n * w_tip * 0.12,
                    tip + d * 0.02 * h + n * w_tip * 0.12,
                    tip + d * 0.02 * h - n * w_tip * 0.12,
                    tip + d * 0.085 * h - n * w_tip * 0.12,
                ]
            )
            self._poly(img, mask, clip, (222, 196, 128), cid)
        elif k == IRRIGATOR:
            for j in range(3):
                hole = tip - d * (0.02 + 0.025 * j) * h
                cv2.circle(
                    img,
                    tuple(np.round(hole * 16).astype(int)),
                    int(0.008 * h * 16) + 8,
                    (40, 40, 44),
                    -1,
                    cv2.LINE_AA,
                    4,
                )
            if plan.value("irrigating", t) > 0.5:  # saline jet: a bright translucent streak and a splash
                jet_end = tip + d * 0.2 * h + n * 0.02 * h * wo
                jet = np.array(
                    [
                        tip + n * 0.006 * h,
                        jet_end + n * 0.012 * h,
                        jet_end - n * 0.012 * h,
                        tip - n * 0.006 * h,
                    ]
                )
                self._blend(
                    img, np.round(jet * 16).astype(np.int32), np.array([235, 240, 245], np.float32), 0.45
                )
                splash = place(ELLIPSE, jet_end, (0.04 * h, 0.025 * h), angle)
                self._blend(
                    img, np.round(splash * 16).astype(np.int32), np.array([230, 236, 242], np.float32), 0.35
                )

    def _shaft(self, img, mask, entry, tip, w_ent, w_tip, palette, cid) -> None:  # noqa: ANN001
        """Cylindrical shading: a dark body, a lighter band and a specular stripe towards the light."""
        d = tip - entry
        d = d / (float(np.hypot(*d)) + 1e-6)
        n = np.array([-d[1], d[0]])
        for frac, colour in zip((1.0, 0.6, 0.16), palette, strict=True):
            off = n * (0.25 * (1 - frac)) * w_tip
            quad = np.array(
                [
                    entry + n * w_ent * frac / 2 + off,
                    tip + n * w_tip * frac / 2 + off,
                    tip - n * w_tip * frac / 2 + off,
                    entry - n * w_ent * frac / 2 + off,
                ]
            )
            q = np.round(quad * 16).astype(np.int32)
            if frac == 1.0:
                cv2.fillConvexPoly(mask, q, cid, cv2.LINE_8, 4)
            cv2.fillConvexPoly(img, q, colour, cv2.LINE_AA, 4)

    @staticmethod
    def _poly(img: np.ndarray, mask: np.ndarray | None, pts: np.ndarray, colour: tuple, cid: int) -> None:
        q = np.round(pts * 16).astype(np.int32)
        if mask is not None:
            cv2.fillPoly(mask, [q], cid, cv2.LINE_8, 4)
        cv2.fillPoly(img, [q], tuple(float(c) for c in colour), cv2.LINE_AA, 4)

    @staticmethod
    def _wire(
        img: np.ndarray, mask: np.ndarray, pts: np.ndarray, thick: int, colour: tuple, cid: int
    ) -> None:
        q = np.round(pts * 16).astype(np.int32)
        cv2.polylines(mask, [q], False, cid, thick, cv2.LINE_8, 4)
        cv2.polylines(img, [q], False, colour, thick, cv2.LINE_AA, 4)


def _inradius(tri: np.ndarray) -> float:
    a, b, c = (float(np.linalg.norm(tri[i] - tri[(i + 1) % 3])) for i in range(3))
    u, v = tri[1] - tri[0], tri[2] - tri[0]
    area = 0.5 * abs(float(u[0] * v[1] - u[1] * v[0]))
    return 2 * area / max(a + b + c, 1e-9)


def _motion_blur(img: np.ndarray, length: float, direction: float) -> np.ndarray:
    """Linear motion blur of ``length`` pixels along ``direction`` (camera moving while exposed)."""
    size = int(length) | 1
    kernel = np.zeros((size, size), np.float32)
    c = size // 2
    dx, dy = math.cos(direction) * c, math.sin(direction) * c
    cv2.line(
        kernel, (int(round(c - dx)), int(round(c - dy))), (int(round(c + dx)), int(round(c + dy))), 1.0, 1
    )
    return cv2.filter2D(img, -1, kernel / max(kernel.sum(), 1e-6), borderType=cv2.BORDER_REFLECT)


def iter_frames(
    seed: int, num_frames: int, height: int, width: int, camera_cuts: int, schema: LabelSchema
) -> Iterator[tuple[np.ndarray, np.ndarray, int, np.ndarray]]:
    """Yield ``(frame, mask, phase, cvs)`` of one v2 clip, one frame at a time."""
    plan = _make_plan(seed, num_frames, camera_cuts)
    renderer = _Renderer(seed, plan, height, width, schema)
    for t in range(num_frames):
        yield renderer.render(t)
