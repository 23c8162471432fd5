"""World ``v1``: the first synthetic laparoscopic world, frozen so that old seeds and recorded figures stay
reproducible (``generate_clip(..., world="v1")``).

A clip is rendered from a small scene model in "scene units" (1 unit = the frame height at zoom 1): tissue
polygons are drawn with OpenCV into the class mask, the image is coloured from the mask plus per-clip noise
textures that are warped with the camera (one ``cv2.warpAffine`` per frame), then two instruments (grasper and
L-hook), vignetting, specular highlights, blur and sensor noise are added. Phase progress drives scene state
variables (fat cover, connective tissue left in the hepatocystic triangle, gallbladder lift, duct cut, blood,
retraction) and the CVS criteria are thresholds on those same variables. Labels (phases, CVS, cuts) depend
only on the seed and length, not on the frame size.

Do not change what this module draws: ``tests/test_synthetic.py`` holds a digest of a small v1 clip. A better
world is a new version (``world_v2.py``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np

from ..errors import UsageError
from ..schema import LabelSchema
from ._geometry import ELLIPSE as _ELLIPSE
from ._geometry import bezier as _bezier
from ._geometry import insertion as _insertion
from ._geometry import place as _place
from ._geometry import rot as _rot
from ._geometry import unit_blob as _unit_blob
from ._types import TOOL_NAMES, SceneStates

#: Default frame size (height, width) of this world.
DEFAULT_SIZE = (240, 427)

# Class names as in CholecSeg8k; ids come from the schema so a custom-ordered schema still works.
_CLASS_NAMES = {
    "bg": "Black Background",
    "wall": "Abdominal Wall",
    "liver": "Liver",
    "gi": "Gastrointestinal Tract",
    "fat": "Fat",
    "grasper": "Grasper",
    "ct": "Connective Tissue",
    "blood": "Blood",
    "duct": "Cystic Duct",
    "hook": "L-hook Electrocautery",
    "gb": "Gallbladder",
    "vein": "Hepatic Vein",
    "lig": "Liver Ligament",
}

# Base RGB colours; similar classes overlap on purpose (liver/ligament/blood, fat/connective tissue/duct,
# grasper/hook, gallbladder/abdominal wall/GI tract) so colour alone does not solve the task.
_BASE_RGB = {
    "bg": (6, 5, 5),
    "wall": (196, 128, 122),
    "liver": (132, 56, 44),
    "gi": (176, 106, 132),
    "fat": (206, 176, 98),
    "grasper": (140, 142, 148),
    "ct": (206, 186, 150),
    "blood": (112, 24, 22),
    "duct": (196, 170, 124),
    "hook": (132, 132, 134),
    "gb": (150, 150, 104),
    "vein": (70, 62, 104),
    "lig": (104, 62, 32),
}
# Luminance texture amplitude, chroma texture amplitude, specular gain per class.
_TEXTURE = {
    "bg": (0.3, 0.0, 0.0),
    "wall": (0.16, 5.0, 0.5),
    "liver": (0.22, 6.0, 0.8),
    "gi": (0.18, 6.0, 0.7),
    "fat": (0.14, 7.0, 0.6),
    "grasper": (0.05, 2.0, 0.0),
    "ct": (0.16, 5.0, 0.5),
    "blood": (0.25, 6.0, 1.0),
    "duct": (0.10, 8.0, 0.6),
    "hook": (0.05, 2.0, 0.0),
    "gb": (0.16, 6.0, 0.9),
    "vein": (0.12, 6.0, 0.4),
    "lig": (0.20, 5.0, 0.6),
}

_PHASE_NAMES = (
    "Preparation",
    "CalotTriangleDissection",
    "ClippingCutting",
    "GallbladderDissection",
    "GallbladderPackaging",
    "CleaningCoagulation",
    "GallbladderRetraction",
)
_PHASE_WEIGHTS = np.array([0.08, 0.28, 0.10, 0.24, 0.09, 0.11, 0.10])
_PHASE_KEEP_PROB = np.array([0.9, 1.0, 1.0, 1.0, 0.8, 0.7, 0.85])

_ASPECT_MARGIN = 1.0  # scene units of texture around the nominal view (camera offsets, zoom-out)


# --------------------------------------------------------------------------------------------------------
# clip plan: everything random, drawn once per clip, independent of the frame size
# --------------------------------------------------------------------------------------------------------

@dataclass
class _Layout:
    """Scene geometry of one camera view (the main view, or an unrelated view after a camera cut)."""

    liver_edge: np.ndarray  # (N, 2) lower edge of the liver, left to right
    liver_right: float
    gi: np.ndarray
    fat: np.ndarray
    fat_cover_unit: np.ndarray
    gb_unit: np.ndarray
    gb_center: np.ndarray
    gb_radii: tuple[float, float]
    gb_angle: float
    duct_end: np.ndarray
    duct_ctrl: np.ndarray
    ct_unit: np.ndarray
    ct_strand: np.ndarray
    lig_pts: np.ndarray
    vein_pts: np.ndarray | None
    blood_spots: np.ndarray  # (K, 4): x, y, rx, ry relative to the gallbladder bed
    cam_center: np.ndarray
    cam_zoom: float
    cam_angle: float
    flip: bool
    color_gain: np.ndarray
    colors: dict[str, np.ndarray]


def _make_layout(rng: np.random.Generator, unrelated: bool) -> _Layout:
    xs = np.linspace(-2.2, 2.2, 36)
    edge_y = rng.uniform(-0.12, 0.0) + rng.uniform(-0.12, 0.12) * xs
    for k in (1.5, 3.0, 5.0):
        edge_y += 0.05 / k * 2 * np.sin(k * xs + rng.uniform(0, 2 * np.pi))
    gb_center = np.array([rng.uniform(0.0, 0.3), rng.uniform(0.02, 0.1)])
    gb_angle = rng.uniform(-0.65, -0.25)
    gb_radii = (rng.uniform(0.3, 0.4), rng.uniform(0.11, 0.15))
    axis = np.array([math.cos(gb_angle), math.sin(gb_angle)])
    neck = gb_center - axis * gb_radii[0] * 0.9
    duct_end = neck + np.array([rng.uniform(-0.3, -0.18), rng.uniform(0.18, 0.3)])
    duct_ctrl = (neck + duct_end) / 2 + np.array([rng.uniform(0.05, 0.15), rng.uniform(-0.1, 0.0)])
    lx = rng.uniform(-0.7, 0.4)
    lig = np.array(
        [[lx - 0.15, -1.6], [lx + rng.uniform(-0.1, 0.1), -0.6], [lx + rng.uniform(0.0, 0.2), -0.1]]
    )
    vein = None
    if rng.random() < 0.75:
        vx = rng.uniform(-0.9, 0.9)
        vein = np.array(
            [[vx, -0.9], [vx + rng.uniform(-0.2, 0.2), -0.4], [vx + rng.uniform(-0.3, 0.3), -0.12]]
        )
    spots = np.column_stack(
        [
            rng.uniform(-0.35, 0.35, 12),
            rng.uniform(-0.12, 0.18, 12),
            rng.uniform(0.02, 0.06, 12),
            rng.uniform(0.015, 0.04, 12),
        ]
    )
    gb_tone = rng.random()  # 0 = greenish, 1 = pinkish gallbladder
    colors = {}
    for key, rgb in _BASE_RGB.items():
        colors[key] = np.array(rgb, np.float32) + rng.normal(0, 6, 3).astype(np.float32)
    colors["gb"] = (1 - gb_tone) * colors["gb"] + gb_tone * np.array([196, 140, 136], np.float32)
    if unrelated:
        center = np.array([rng.uniform(-0.7, 0.7), rng.uniform(-0.5, 0.4)])
        zoom, angle = rng.uniform(0.75, 1.6), rng.uniform(-0.5, 0.5)
    else:
        center = 0.5 * gb_center + 0.25 * (neck + duct_end) + rng.uniform(-0.08, 0.08, 2)
        zoom, angle = rng.uniform(0.95, 1.25), rng.uniform(-0.1, 0.1)
    return _Layout(
        liver_edge=np.column_stack([xs, edge_y]),
        liver_right=rng.uniform(0.6, 1.6),
        gi=_place(
            _unit_blob(rng),
            (rng.uniform(-0.9, -0.2), rng.uniform(0.6, 0.8)),
            (0.8, 0.3),
            rng.uniform(-0.3, 0.3),
        ),
        fat=_place(
            _unit_blob(rng, rough=0.2),
            duct_end + rng.uniform(-0.05, 0.05, 2),
            (0.28, 0.18),
            rng.uniform(-0.5, 0.5),
        ),
        fat_cover_unit=_unit_blob(rng, rough=0.2),
        gb_unit=_unit_blob(rng, rough=0.06),
        gb_center=gb_center,
        gb_radii=gb_radii,
        gb_angle=gb_angle,
        duct_end=duct_end,
        duct_ctrl=duct_ctrl,
        ct_unit=_unit_blob(rng, rough=0.25),
        ct_strand=_place(
            _unit_blob(rng, rough=0.3),
            (rng.uniform(0.4, 0.8), rng.uniform(0.25, 0.4)),
            (rng.uniform(0.06, 0.12), 0.04),
            rng.uniform(-1, 1),
        ),
        lig_pts=lig,
        vein_pts=vein,
        blood_spots=spots,
        cam_center=center,
        cam_zoom=zoom,
        cam_angle=angle,
        flip=bool(unrelated and rng.random() < 0.5),
        color_gain=rng.uniform(0.92, 1.08, 3).astype(np.float32)
        * (rng.uniform(0.8, 1.1) if unrelated else 1.0),
        colors=colors,
    )


@dataclass
class _Plan:
    """All random draws of a clip: phase timeline, state thresholds, camera, instruments, cuts, layouts."""

    num_frames: int
    phase_bounds: list[tuple[int, int, int]]  # (phase, start, end) for present phases
    phases: np.ndarray
    progress: np.ndarray
    ct_end: float
    ct_gamma: float
    lift_start: float
    lift_calot: float
    duct_cut_at: float
    c1_thr: float
    c2_thr: float
    c3_thr: float
    cam_freq: np.ndarray
    cam_phase: np.ndarray
    cam_amp: np.ndarray
    grasper_ins: np.ndarray
    hook_ins: np.ndarray
    tool_freq: np.ndarray
    tool_phase: np.ndarray
    grasper_entry: float
    hook_entry: float
    cut_frames: list[int]
    segment: np.ndarray
    layouts: list[_Layout]



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
    rng = np.random.default_rng([seed, 0x5EED])
    keep = rng.random(7) < _PHASE_KEEP_PROB
    weights = np.where(keep, _PHASE_WEIGHTS * rng.gamma(8.0, 1 / 8.0, 7), 0.0)
    bounds_f = np.concatenate([[0.0], np.cumsum(weights / weights.sum())]) * num_frames
    bounds = np.round(bounds_f).astype(int)
    phases = np.zeros(num_frames, np.int64)
    progress = np.zeros(num_frames, np.float32)
    phase_bounds = []
    for ph in range(7):
        a, b = bounds[ph], bounds[ph + 1]
        if b > a:
            phases[a:b] = ph
            progress[a:b] = (np.arange(a, b) - a + 0.5) / (b - a)
            phase_bounds.append((ph, int(a), int(b)))

    # instruments: which phases use them, with a few random gaps where they leave the view
    grasper = np.isin(phases, [0, 1, 2, 3, 4, 6]) | ((phases == 5) & (progress > rng.uniform(0.3, 0.6)))
    hook = np.isin(phases, [1, 3]) | ((phases == 5) & (progress < 0.6)) | ((phases == 0) & (progress > 0.7))
    for arr in (grasper, hook):
        for _ in range(rng.integers(0, 3)):
            start = int(rng.integers(0, num_frames))
            arr[start : start + int(rng.integers(2, 7))] = False

    cut_frames: list[int] = []
    if camera_cuts:
        # spread cuts so that every segment is at least 3 frames long
        slots = np.sort(rng.choice(np.arange(num_frames - 4 * camera_cuts - 1), camera_cuts, replace=False))
        cut_frames = [int(s + 4 * i + 3) for i, s in enumerate(slots)]
    segment = np.zeros(num_frames, np.int64)
    for c in cut_frames:
        segment[c:] += 1
    layouts = [_make_layout(rng, unrelated=i > 0) for i in range(camera_cuts + 1)]
    return _Plan(
        num_frames=num_frames,
        phase_bounds=phase_bounds,
        phases=phases,
        progress=progress,
        ct_end=float(rng.uniform(0.75, 0.95)),
        ct_gamma=float(rng.uniform(0.7, 1.4)),
        lift_start=float(rng.uniform(0.35, 0.75)),
        lift_calot=float(rng.uniform(0.3, 0.8)),
        duct_cut_at=float(rng.uniform(0.45, 0.75)),
        c1_thr=float(rng.uniform(0.4, 0.7)),
        c2_thr=float(rng.uniform(0.05, 0.2)),
        c3_thr=float(rng.uniform(0.45, 0.6)),
        cam_freq=rng.uniform(1 / 90, 1 / 25, 6),
        cam_phase=rng.uniform(0, 2 * np.pi, 6),
        cam_amp=np.array([0.07, 0.05, 0.05, 0.04, 0.06, 0.03]) * rng.uniform(0.6, 1.4, 6),
        grasper_ins=_insertion(grasper),
        hook_ins=_insertion(hook),
        tool_freq=rng.uniform(1 / 30, 1 / 8, 8),
        tool_phase=rng.uniform(0, 2 * np.pi, 8),
        grasper_entry=float(rng.uniform(-1.2, -0.4)),  # angle on the FOV circle (upper right)
        hook_entry=float(rng.uniform(2.3, 3.3)),  # left side
        cut_frames=cut_frames,
        segment=segment,
        layouts=layouts,
    )


@dataclass
class _State:
    phase: int
    fat: float
    ct: float
    lift: float
    duct_cut: bool
    detached: bool
    pack: float
    retract: float
    blood: float
    cvs: np.ndarray


def _state(plan: _Plan, t: int) -> _State:
    """Scene state variables at frame t; CVS criteria are thresholds on exactly these variables."""
    ph, p = int(plan.phases[t]), float(plan.progress[t])
    fat = {0: 1.0 - 0.8 * p, 1: 0.2 * max(0.0, 1.0 - p / 0.2)}.get(ph, 0.0)
    if ph == 0:
        ct = 1.0
    elif ph == 1:
        ct = max(0.0, 1.0 - p / plan.ct_end) ** plan.ct_gamma
    else:
        ct = 0.0
    if ph <= 0:
        lift = 0.0
    elif ph == 1:
        lift = plan.lift_calot * float(np.clip((p - plan.lift_start) / (1 - plan.lift_start), 0, 1))
    elif ph == 2:
        lift = plan.lift_calot
    elif ph == 3:
        lift = plan.lift_calot + (1 - plan.lift_calot) * p
    else:
        lift = 1.0
    blood = {1: 0.15 * p, 2: 0.15, 3: 0.2 + 0.5 * p, 4: 0.6, 5: 1.0 - 0.8 * p, 6: 0.25}.get(ph, 0.0)
    pack = {4: p}.get(ph, 1.0 if ph > 4 else 0.0)
    exposure = (1.0 - ct) * (1.0 - fat)
    cvs = np.array([exposure >= plan.c1_thr, ct <= plan.c2_thr, lift >= plan.c3_thr], np.float32)
    return _State(
        phase=ph,
        fat=fat,
        ct=ct,
        lift=lift,
        duct_cut=ph > 2 or (ph == 2 and p >= plan.duct_cut_at),
        detached=ph >= 4,
        pack=pack,
        retract=p**1.5 if ph == 6 else 0.0,
        blood=blood,
        cvs=cvs,
    )


def timeline(seed: int, num_frames: int, camera_cuts: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Phases, CVS and cut indices of a clip without rendering it (cheap; same as the rendered clip)."""
    plan = _make_plan(seed, num_frames, camera_cuts)
    cvs = np.stack([_state(plan, t).cvs for t in range(num_frames)])
    return plan.phases.copy(), cvs, list(plan.cut_frames)


#: Names of the v1 scene variables in :func:`states` (no phase, no progress).
STATE_NAMES = ("fat", "connective_tissue", "lift", "duct_cut", "detached", "pack", "retract", "blood")


def states(seed: int, num_frames: int, camera_cuts: int) -> SceneStates:
    """The v1 renderer's true scene state per frame; v1 has two of Cholec80's tools (grasper and hook).

    Added after v1 was frozen: it reads the plan and changes nothing that is drawn."""
    plan = _make_plan(seed, num_frames, camera_cuts)
    rows = []
    for t in range(num_frames):
        st = _state(plan, t)
        rows.append([st.fat, st.ct, st.lift, st.duct_cut, st.detached, st.pack, st.retract, st.blood])
    tools = np.zeros((num_frames, len(TOOL_NAMES)), np.uint8)
    tools[:, TOOL_NAMES.index("Grasper")] = plan.grasper_ins >= 0.5
    tools[:, TOOL_NAMES.index("Hook")] = plan.hook_ins >= 0.5
    return SceneStates(STATE_NAMES, np.asarray(rows, np.float32).reshape(num_frames, -1), tools)

# --------------------------------------------------------------------------------------------------------
# renderer: per-clip precomputation (textures, vignette, noise) and per-frame drawing
# --------------------------------------------------------------------------------------------------------
class _Renderer:
    def __init__(self, seed: int, plan: _Plan, height: int, width: int, schema: LabelSchema) -> None:
        if height < 16 or width < 16:
            raise UsageError(
                f"frame size must be at least 16x16, got {height}x{width}", "ask for a larger frame"
            )
        self.plan, self.h, self.w = plan, height, width
        self.ids = {key: schema.class_id(name) for key, name in _CLASS_NAMES.items()}
        rng = np.random.default_rng([seed, 0x7E47, height, width])
        # texture canvas in scene units, sampled at 0.6 px per frame pixel (the textures are low-frequency)
        aspect = width / height
        self.xr, self.yr = aspect / 2 + _ASPECT_MARGIN + 0.6, 0.5 + _ASPECT_MARGIN + 0.6
        self.res = 0.6 * height
        th, tw = int(2 * self.yr * self.res), int(2 * self.xr * self.res)
        tex = np.empty((th, tw, 4), np.float32)
        for c, cells in enumerate((5, 14, 40)):
            small = rng.standard_normal((max(2, int(cells * th / tw)), cells)).astype(np.float32)
            tex[..., c] = cv2.resize(small, (tw, th), interpolation=cv2.INTER_CUBIC)
            tex[..., c] /= tex[..., c].std() + 1e-6
        fine = cv2.resize(
            rng.standard_normal((th // 5, tw // 5)).astype(np.float32),
            (tw, th),
            interpolation=cv2.INTER_LINEAR,
        )
        fine = cv2.GaussianBlur(fine, (0, 0), 1.0)
        tex[..., 3] = np.clip((fine / (fine.std() + 1e-6) - 2.3) * 1.2, 0, 1)  # sparse specular spots
        self.tex = tex
        self.tex_to_scene = np.array([[1 / self.res, 0, -self.xr], [0, 1 / self.res, -self.yr], [0, 0, 1]])
        # endoscope field of view: circle cropped by the frame, vignetting and soft rim, fixed to the camera
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        self.fov_c = (
            width / 2 + rng.uniform(-0.02, 0.02) * width,
            height / 2 + rng.uniform(-0.02, 0.02) * height,
        )
        self.fov_r = rng.uniform(0.44, 0.5) * width
        dist = np.sqrt((xx - self.fov_c[0]) ** 2 + (yy - self.fov_c[1]) ** 2) / self.fov_r
        self.fov = (dist < 1.0).astype(np.uint8) * 255
        rim = np.clip((1.0 - dist) * self.fov_r / 3.0, 0, 1)
        light = (1.0 - rng.uniform(0.35, 0.55) * np.clip(dist, 0, 1) ** 2) * rim
        self.light = light[..., None].astype(np.float32)
        self.noise = [rng.normal(0, 3.0, (height, width, 3)).astype(np.float32) for _ in range(3)]
        # lookup tables by class id, one set per layout (colours differ between unrelated views)
        self.luts = []
        for layout in plan.layouts:
            col = np.zeros((256, 3), np.float32)
            amp = np.zeros(256, np.float32)
            chroma = np.zeros((256, 3), np.float32)
            spec = np.zeros(256, np.float32)
            for key, cid in self.ids.items():
                col[cid] = layout.colors[key] * layout.color_gain
                a, c, s = _TEXTURE[key]
                amp[cid], spec[cid] = a, s
                chroma[cid] = c * np.array([1.0, -0.6, -0.4], np.float32) if key != "bg" else 0
            self.luts.append((col, amp, chroma, spec))
        self.scale = float(height)

    # --- geometry helpers -----------------------------------------------------------------------------
    def camera(self, t: int) -> np.ndarray:
        """2x3 affine scene -> frame pixels: smooth pan/zoom/rotation plus a small shake."""
        plan = self.plan
        layout = plan.layouts[plan.segment[t]]
        w = np.sin(2 * np.pi * plan.cam_freq * t + plan.cam_phase) * plan.cam_amp
        zoom = layout.cam_zoom * (1 + 0.8 * w[4]) * self.scale
        ang = layout.cam_angle + w[5]
        cx = layout.cam_center[0] + w[0] + 0.15 * w[2] * math.sin(t * 1.7)
        cy = layout.cam_center[1] + w[1] + 0.15 * w[3] * math.cos(t * 1.3)
        lin = _rot(ang) * zoom
        if layout.flip:
            lin = lin @ np.diag([-1.0, 1.0])
        off = np.array([self.w / 2, self.h / 2]) - lin @ np.array([cx, cy])
        return np.hstack([lin, off[:, None]])

    @staticmethod
    def _px(pts: np.ndarray, cam: np.ndarray) -> np.ndarray:
        """Scene points -> int32 pixel coordinates with 4 fractional bits (cv2 ``shift=4``)."""
        return np.round((pts @ cam[:, :2].T + cam[:, 2]) * 16).astype(np.int32)

    def fill(self, mask: np.ndarray, pts: np.ndarray, cam: np.ndarray, cid: int) -> None:
        cv2.fillPoly(mask, [self._px(pts, cam)], int(cid), cv2.LINE_8, 4)

    def line(self, mask: np.ndarray, pts: np.ndarray, cam: np.ndarray, cid: int, width: float) -> None:
        thick = max(1, int(round(width * abs(np.linalg.det(cam[:, :2])) ** 0.5)))
        cv2.polylines(mask, [self._px(pts, cam)], False, int(cid), thick, cv2.LINE_8, 4)

    # --- one frame ----------------------------------------------------------------------------------------
    def render(self, t: int) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
        plan, ids = self.plan, self.ids
        st = _state(plan, t)
        seg = int(plan.segment[t])
        lay = plan.layouts[seg]
        cam = self.camera(t)
        mask = np.full((self.h, self.w), ids["wall"], np.uint8)

        self.fill(mask, lay.gi, cam, ids["gi"])
        edge = lay.liver_edge[lay.liver_edge[:, 0] <= lay.liver_right]
        liver = np.vstack([edge, [[edge[-1, 0] + 0.3, -3.0], [edge[0, 0], -3.0]]])
        self.fill(mask, liver, cam, ids["liver"])
        self.line(mask, _bezier(lay.lig_pts, 12), cam, ids["lig"], 0.07)
        if lay.vein_pts is not None:
            self.line(mask, _bezier(lay.vein_pts, 12), cam, ids["vein"], 0.022)
        self.fill(mask, lay.fat, cam, ids["fat"])

        # gallbladder: lifted away from the liver bed, then packed aside and retracted out of view
        axis = np.array([math.cos(lay.gb_angle), math.sin(lay.gb_angle)])
        normal = np.array([-axis[1], axis[0]])
        center = lay.gb_center + normal * 0.12 * st.lift + np.array([0.25, 0.22]) * st.pack
        center = center + np.array([0.9, -1.3]) * st.retract
        angle = lay.gb_angle + 0.15 * st.lift + 0.4 * st.pack
        gb_scale = 1.0 - 0.3 * st.retract
        gb = _place(lay.gb_unit, center, (lay.gb_radii[0] * gb_scale, lay.gb_radii[1] * gb_scale), angle)
        spots = lay.blood_spots[: int(round(st.blood * len(lay.blood_spots)))]
        for x, y, rx, ry in spots:  # blood on the liver bed, under the gallbladder
            pos = lay.gb_center + axis * x + normal * y
            self.fill(mask, _place(_ELLIPSE, pos, (rx, ry), 0.3), cam, ids["blood"])
        self.fill(mask, gb, cam, ids["gb"])

        # cystic duct from the gallbladder neck to the common bile duct; cut in ClippingCutting
        neck = lay.gb_center - axis * lay.gb_radii[0] * 0.9 + normal * 0.12 * st.lift
        duct = _bezier(np.array([neck, lay.duct_ctrl, lay.duct_end]), 20)
        if st.detached:
            self.line(mask, duct[11:], cam, ids["duct"], 0.04)
        elif st.duct_cut:
            self.line(mask, duct[:9], cam, ids["duct"], 0.04)
            self.line(mask, duct[11:], cam, ids["duct"], 0.04)
        else:
            self.line(mask, duct, cam, ids["duct"], 0.04)

        # connective tissue over the hepatocystic triangle shrinks with dissection; a strand always remains
        tri = np.array([neck, duct[10], neck + np.array([-0.2, -0.12])])
        tri_c = tri.mean(axis=0)
        if st.ct > 0.01:
            self.fill(
                mask, _place(lay.ct_unit, tri_c, (0.22 * st.ct**0.5, 0.16 * st.ct**0.5), 0.4), cam, ids["ct"]
            )
        self.fill(mask, lay.ct_strand, cam, ids["ct"])
        if st.fat > 0.01:  # omental fat covers the gallbladder area during preparation
            self.fill(
                mask,
                _place(
                    lay.fat_cover_unit,
                    lay.gb_center * 0.5 + tri_c * 0.5,
                    (0.38 * st.fat**0.5, 0.25 * st.fat**0.5),
                    lay.gb_angle,
                ),
                cam,
                ids["fat"],
            )

        # colour from mask + warped textures
        col, amp, chroma, spec = self.luts[seg]
        tex_m = (np.vstack([cam, [0, 0, 1]]) @ self.tex_to_scene)[:2]
        tex = cv2.warpAffine(
            self.tex, tex_m, (self.w, self.h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
        )
        lum = 1.0 + amp[mask] * (0.65 * tex[..., 0] + 0.35 * tex[..., 1])
        img = col[mask] * lum[..., None] + chroma[mask] * tex[..., 2:3]
        s = (tex[..., 3] * spec[mask])[..., None]
        img += (250.0 - img) * s

        # instruments (drawn in frame pixels, entering from outside the field of view)
        grasper_target = gb[0] if st.phase != 2 else duct[6]
        if st.phase == 5:
            grasper_target = lay.gb_center + np.array([0.0, 0.25])
        hook_target = {1: tri_c, 3: lay.gb_center - normal * 0.05}.get(
            st.phase, lay.gb_center + normal * 0.15
        )
        wig = np.sin(2 * np.pi * plan.tool_freq * t + plan.tool_phase) * 0.06 * self.h
        if plan.grasper_ins[t] > 0:
            tip = grasper_target @ cam[:, :2].T + cam[:, 2] + wig[:2]
            self._tool(
                img,
                mask,
                tip,
                plan.grasper_entry + 0.1 * wig[4] / self.h,
                plan.grasper_ins[t],
                ids["grasper"],
                hook=False,
                opening=0.25 + 0.2 * math.sin(t * 0.4),
            )
        if plan.hook_ins[t] > 0:
            tip = hook_target @ cam[:, :2].T + cam[:, 2] + wig[2:4]
            self._tool(
                img,
                mask,
                tip,
                plan.hook_entry + 0.1 * wig[5] / self.h,
                plan.hook_ins[t],
                ids["hook"],
                hook=True,
                opening=0.0,
            )

        # camera optics: vignetting, field of view, blur, sensor noise
        img *= self.light
        img = cv2.GaussianBlur(img, (5, 5), 0.9)
        img += self.noise[t % 3]
        frame = np.clip(img, 0, 255).astype(np.uint8)
        mask = cv2.bitwise_and(mask, self.fov)
        return frame, mask, st.phase, st.cvs

    def _tool(
        self,
        img: np.ndarray,
        mask: np.ndarray,
        tip: np.ndarray,
        entry_angle: float,
        ins: float,
        cid: int,
        hook: bool,
        opening: float,
    ) -> None:
        """Metallic shaft from outside the field of view to the tip, then grasper jaws or an L-shaped hook."""
        entry = np.array(self.fov_c) + 1.25 * self.fov_r * np.array(
            [math.cos(entry_angle), math.sin(entry_angle)]
        )
        tip = entry + (tip - entry) * ins
        d = tip - entry
        length = float(np.hypot(*d)) + 1e-6
        d = d / length
        n = np.array([-d[1], d[0]])
        w_tip, w_ent = 0.045 * self.h, 0.09 * self.h
        dark = np.array([70, 72, 76], np.float32) if not hook else np.array([58, 58, 60], np.float32)
        mid = np.array([150, 153, 160], np.float32) if not hook else np.array([138, 138, 136], np.float32)
        hi = np.array([225, 228, 232], np.float32)
        for frac, colr in ((1.0, dark), (0.6, mid), (0.18, hi)):
            off = n * (0.25 * (1 - frac))
            quad = (
                np.array(
                    [
                        entry + n * w_ent * frac / 2,
                        tip + n * w_tip * frac / 2,
                        tip - n * w_tip * frac / 2,
                        entry - n * w_ent * frac / 2,
                    ]
                )
                + off * w_tip
            )
            q = np.round(quad * 16).astype(np.int32)
            if frac == 1.0:
                cv2.fillConvexPoly(mask, q, int(cid), cv2.LINE_8, 4)
            cv2.fillConvexPoly(img, q, colr.tolist(), cv2.LINE_AA, 4)
        if hook:
            a = tip + d * 0.06 * self.h
            b = a + n * 0.035 * self.h
            pts = np.round(np.array([tip, a, b]) * 16).astype(np.int32)
            thick = max(1, int(0.014 * self.h))
            cv2.polylines(mask, [pts], False, int(cid), thick, cv2.LINE_8, 4)
            cv2.polylines(img, [pts], False, (200, 200, 196), thick, cv2.LINE_AA, 4)
        else:
            for sign in (-1, 1):
                jd = _rot(sign * opening) @ d
                jn = np.array([-jd[1], jd[0]])
                jaw = np.array([tip + jn * w_tip * 0.35, tip + jd * 0.08 * self.h, tip - jn * w_tip * 0.35])
                q = np.round(jaw * 16).astype(np.int32)
                cv2.fillConvexPoly(mask, q, int(cid), cv2.LINE_8, 4)
                cv2.fillConvexPoly(img, q, (176, 180, 186), cv2.LINE_AA, 4)



def iter_frames(
    seed: int, num_frames: int, height: int, width: int, camera_cuts: int, schema: LabelSchema
) -> Iterator[tuple[np.ndarray, np.ndarray, int, np.ndarray]]:
    """Yield ``(frame, mask, phase, cvs)`` of one v1 clip, one frame at a time."""
    plan = _make_plan(seed, num_frames, camera_cuts)
    renderer = _Renderer(seed, plan, height, width, schema)
    for t in range(num_frames):
        yield renderer.render(t)
