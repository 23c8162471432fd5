"""Interactive segmentation benchmark: NoC@85/90 and IoU@1/3/5 of the click engine against fair classical
baselines, with 95 % intervals by video, on the pre-registered seeds (``bench/README.md``, "Interactive
segmentation, NoC")::

    .venv/bin/python bench/interactive.py [--seed-set calibration|report] [--methods day-one grabcut ...]

Protocol (RITM): a simulated annotator clicks at the deepest point of the larger error region of *each
method's own* current mask, positive inside a missed region, negative inside a false one, at least 5 and at
most 20 clicks (a session stops once IoU reaches 0.90 after 5 clicks), the last mask fed back as the
previous mask. Objects: ``core.interactive.objects.click_objects`` (connected class parts of at least 1 % of
the frame, the definition training and the gate use), at most ``--objects-per-video`` from each evaluation
video, drawn with that video's seed.

Methods, all on equal terms (issue 21, item 6):

- ``day-one``: :class:`~surgenet_assist.core.interactive.ClickSegmenter` without training;
- ``grabcut``: OpenCV's GrabCut; ``random-walker``: scikit-image's random walker;
- ``learned`` (``--learned``): the click head trained on the registered training videos (the recipe of
  ``training_loop/click_training.py``: random positive and negative initial clicks, iterative clicks, a
  correction local to the newest click, early stopping on held-out training videos with day one as step
  0, one head per ``--train-seeds`` and the best on the held-out videos kept).

Every method gets the same clicker, the same kept-parts rule and the same click disks
(``core.interactive.engine.enforce_prompt``: a disk of the same radius for a positive and a negative click,
then only the connected parts holding a positive click are kept). No method seeds its previous mask as
probable object: day one uses a previous mask only when there is no positive click (never in these
sessions), and the classical methods see only the clicks. The classical methods are seeded symmetrically:
around every click a "near" disk (radius ``min(H, W) / 12``) of its sign (GrabCut: probably object or
probably background; the random walker has no soft labels and gets only the certain disks) inside a certain
disk of the enforced radius; unclicked pixels are probably background (GrabCut) and the frame's border,
away from positive clicks, is background (random walker: it needs one background seed). They run on the
frame scaled by ``--classical-scale`` (CPU time: GrabCut at 854x480 took 8 s per click on the shared
2-core machine) and their masks are scaled back before the shared kept-parts rule.

Statistics: per method the mean of each metric with a 95 % percentile bootstrap interval (2,000 resamples of
videos, each video's objects kept together: ``core.interactive.clicker.video_bootstrap``); per pair the
NoC ratio with its interval, and the registered decision (A needs fewer clicks than B when the NoC@90 ratio's
interval lies below 1; "less than half of GrabCut's clicks" when it lies below 0.5). Regime checks: enough
objects and videos, GrabCut reaches 0.90 on at least a third of the objects, and the oracle (the object's own
mask through the same feature grid and refinement) reaches IoU 0.90.

Writes ``bench/results/interactive.json`` for the report seeds (``interactive_calibration.json`` for the
calibration seeds), stamped with the world version and the seed set. Random-init backbone unless the
SurgeNetXL weights are cached (the report says which).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from surgenet_assist.core.backbone import load_backbone
from surgenet_assist.core.errors import WeightsError
from surgenet_assist.core.interactive import (
    DAY_ONE,
    ClickSegmenter,
    ClickSession,
    Prompt,
    click_objects,
    next_click,
    simulate,
    summarize,
)
from surgenet_assist.core.interactive.clicker import MAX_CLICKS, iou, noc_ratio, summary_intervals
from surgenet_assist.core.interactive.engine import click_radius, enforce_prompt
from surgenet_assist.core.schema import DEFAULT_SCHEMA
from surgenet_assist.core.synthetic import generate_clip

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import seeds  # noqa: E402  (bench/seeds.py, the pre-registration)

GRABCUT, RANDOM_WALKER, LEARNED = "grabcut", "random-walker", "learned"
CLIP_FRAMES = 30  # each evaluation video is rendered this long; frames are taken from its middle
NEAR_FRACTION = 1 / 12  # the classical methods' "near" disk: radius min(H, W) / 12 (40 px at 854x480)
MIN_OBJECTS, MIN_VIDEOS = 30, 6  # registered regime check
REPORT_MIN_OBJECTS = 60  # issue 21: at least 60 objects from the report seeds

Objects = list[tuple[np.ndarray, np.ndarray, str]]  # (frame, object mask, class name)


@dataclass
class BenchObject:
    """One evaluation object and where it comes from (its video is the bootstrap's unit)."""

    frame: np.ndarray
    mask: np.ndarray
    name: str
    video: str
    frame_key: tuple[str, int]


def objects_of(frame: np.ndarray, mask: np.ndarray, min_area: float) -> Objects:
    """The frame's objects (``core.interactive.objects.click_objects``: the definition training and the
    gate use too), with their class names."""
    return [
        (frame, obj, DEFAULT_SCHEMA.classes[k].name)
        for k, obj in click_objects(mask, min_fraction=min_area)
        if k < len(DEFAULT_SCHEMA.classes)
    ]


def video_objects(
    video_seeds: Sequence[int],
    world: str,
    size: tuple[int, int],
    frames_per_video: int,
    objects_per_video: int,
    min_area: float = 0.01,
) -> list[BenchObject]:
    """At most ``objects_per_video`` objects of each video (from ``frames_per_video`` frames spread over
    its middle), drawn with the video's seed so that every run takes the same ones."""
    out: list[BenchObject] = []
    for seed in video_seeds:
        clip = generate_clip(seed, CLIP_FRAMES, size[0], size[1], world=world)
        times = np.linspace(CLIP_FRAMES // 6, CLIP_FRAMES - CLIP_FRAMES // 6, frames_per_video).round()
        found = [
            BenchObject(clip.frames[t], obj, name, str(seed), (str(seed), int(t)))
            for t in times.astype(int)
            for _, obj, name in objects_of(clip.frames[t], clip.masks[t], min_area)
        ]
        if len(found) > objects_per_video:
            pick = np.random.default_rng(seed).choice(len(found), objects_per_video, replace=False)
            found = [found[i] for i in sorted(pick)]
        out += found
    return out


# --- classical baselines -----------------------------------------------------------------------------------
def seed_layers(
    prompt: Prompt, shape: tuple[int, int], full_shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """(certain, near) int8 layers at ``shape`` for a prompt in ``full_shape`` pixels: +1 where a positive
    click's disk lies, -1 for a negative one, 0 elsewhere (later clicks over earlier ones). Both signs get
    disks of the same radius: certain = the engine's enforced click radius, near = ``NEAR_FRACTION``."""
    h, w = shape
    H, W = full_shape
    scale = h / H
    certain_r = max(1, round(click_radius(H, W) * scale))
    near_r = max(certain_r + 1, round(min(H, W) * NEAR_FRACTION * scale))
    certain = np.zeros(shape, np.int8)
    near = np.zeros(shape, np.int8)
    for c in prompt.clicks:
        centre = (int(c.col * w / W), int(c.row * h / H))
        sign = 1 if c.positive else -1
        cv2.circle(near, centre, near_r, sign, -1)
        cv2.circle(certain, centre, certain_r, sign, -1)
    return certain, near


def grabcut_core(image: np.ndarray, certain: np.ndarray, near: np.ndarray, iterations: int = 3) -> np.ndarray:
    """GrabCut's object probability (0/1) from the seed layers: certain disks fixed, near disks probable,
    everything else probably background."""
    gc = np.full(certain.shape, cv2.GC_PR_BGD, np.uint8)
    gc[near > 0] = cv2.GC_PR_FGD
    gc[near < 0] = cv2.GC_PR_BGD
    gc[certain > 0] = cv2.GC_FGD
    gc[certain < 0] = cv2.GC_BGD
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.grabCut(cv2.cvtColor(image, cv2.COLOR_RGB2BGR), gc, None, bgd, fgd, iterations, cv2.GC_INIT_WITH_MASK)
    return ((gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)).astype(np.float32)


def random_walker_core(
    image: np.ndarray, certain: np.ndarray, near: np.ndarray, beta: float = 130.0
) -> np.ndarray:
    """The random walker's object probability from the certain disks, with the frame's border (away from
    positive clicks' near disks) as background: it needs a background seed before the first negative click."""
    from skimage.segmentation import random_walker

    labels = np.zeros(certain.shape, np.int32)
    border = np.zeros(certain.shape, bool)
    border[0, :] = border[-1, :] = border[:, 0] = border[:, -1] = True
    labels[border & (near <= 0)] = 2
    labels[certain > 0] = 1
    labels[certain < 0] = 2
    if not (labels == 2).any():
        return (labels != 2).astype(np.float32)
    prob = random_walker(
        image.astype(np.float32) / 255.0, labels, beta=beta, mode="cg_j", tol=1e-2, channel_axis=-1,
        return_full_prob=True,
    )
    return prob[0].astype(np.float32)


def classical(core: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray], scale: float) -> Callable:
    """A classical core as a click method: run at ``scale`` of the frame from the prompt's clicks only (the
    previous mask is not used, as day one does not use it), scaled back, then the engine's own click disks and
    kept-parts rule (``enforce_prompt``), exactly as day one's output gets them."""

    def segment(image: np.ndarray, prompt: Prompt) -> np.ndarray:
        H, W = image.shape[:2]
        h, w = max(8, round(H * scale)), max(8, round(W * scale))
        small = image if (h, w) == (H, W) else cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
        certain, near = seed_layers(prompt, (h, w), (H, W))
        prob = core(small, certain, near)
        if (h, w) != (H, W):
            prob = cv2.resize(prob, (W, H), interpolation=cv2.INTER_LINEAR)
        return enforce_prompt(np.ascontiguousarray(prob, np.float32), prompt)[0]

    return segment


# --- evaluation --------------------------------------------------------------------------------------------
def evaluate(method: Callable[[BenchObject, Prompt], np.ndarray], objects: Sequence[BenchObject],
             max_clicks: int = MAX_CLICKS) -> list[ClickSession]:
    """One simulated session per object: the clicker answers this method's own masks; at least 5 clicks
    (IoU@1/3/5), then until IoU 0.90 or ``max_clicks``."""
    return [
        simulate(lambda p, o=o: method(o, p), o.mask, max_clicks=max_clicks, stop_at=0.9, min_clicks=5)
        for o in objects
    ]


_POOL: dict[str, Any] = {}  # what forked workers read: the methods and objects (set before the pool starts)


def _session_job(job: tuple[str, int]) -> tuple[ClickSession, float]:
    name, i = job
    t0 = time.perf_counter()
    session = evaluate(_POOL["methods"][name], [_POOL["objects"][i]], _POOL["max_clicks"])[0]
    return session, time.perf_counter() - t0


def run_sessions(
    methods: dict[str, Callable[[BenchObject, Prompt], np.ndarray]],
    objects: Sequence[BenchObject],
    max_clicks: int,
    jobs: int = 1,
) -> dict[str, tuple[list[ClickSession], float]]:
    """Method -> (sessions in object order, seconds spent on them summed over workers). ``jobs`` > 1 runs
    (method, object) sessions in forked worker processes (a session depends only on its method and object,
    so the result is the same; frames should be embedded before, or every worker embeds them again)."""
    order = [(name, i) for i in range(len(objects)) for name in methods]
    if jobs <= 1:
        _POOL.update(methods=methods, objects=objects, max_clicks=max_clicks)
        results = [_session_job(job) for job in order]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        _POOL.update(methods=methods, objects=objects, max_clicks=max_clicks)
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            results = list(pool.map(_session_job, order))
    out: dict[str, tuple[list[ClickSession], float]] = {name: ([], 0.0) for name in methods}
    for (name, _), (session, seconds) in zip(order, results, strict=True):
        sessions, total = out[name]
        sessions.append(session)
        out[name] = (sessions, total + seconds)
    return out


def oracle_ious(segmenter: ClickSegmenter, objects: Sequence[BenchObject]) -> list[float]:
    """IoU of each object's own mask area-averaged onto the feature grid, refined and enforced exactly as a
    method's grid is, after the first simulated click: what the grid and refinement can reach at best."""
    out = []
    for o in objects:
        emb = segmenter.embed(o.frame, key=("eval", *o.frame_key))
        h, w = emb.grid
        grid = cv2.resize(o.mask.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)
        click = next_click(o.mask, np.zeros_like(o.mask))
        assert click is not None
        out.append(iou(segmenter.refine(emb, grid, Prompt((click,)))[0], o.mask))
    return out


def curve(sessions: Sequence[ClickSession], max_clicks: int) -> list[float]:
    """Mean IoU after each click (a session that ended early keeps its last IoU)."""
    return [float(np.mean([s.iou_at(k) for s in sessions])) for k in range(1, max_clicks + 1)]


def latency(segment: Callable[[BenchObject, Prompt, Any], np.ndarray], objects: Sequence[BenchObject],
            clicks: int = 6) -> dict[str, float]:
    """Cold first click (new frame) and warm clicks (same frame, cached features), in milliseconds."""
    cold, warm = [], []
    for o in objects:
        key = ("latency", time.perf_counter_ns())  # a new key: the first click is cold
        state = {"first": True}

        def run(p: Prompt, o=o, key=key, state=state) -> np.ndarray:
            t0 = time.perf_counter()
            mask = segment(o, p, key)
            (cold if state["first"] else warm).append((time.perf_counter() - t0) * 1000)
            state["first"] = False
            return mask

        simulate(run, o.mask, max_clicks=clicks)
    return {
        "cold_first_click_ms": float(np.median(cold)),
        "warm_click_ms_median": float(np.median(warm)) if warm else float("nan"),
        "warm_click_ms_p95": float(np.percentile(warm, 95)) if warm else float("nan"),
        "clicks_timed": len(warm),
    }


def ratio_entry(a: Sequence[ClickSession], b: Sequence[ClickSession], videos: Sequence[str],
                max_clicks: int) -> dict[str, Any]:
    """NoC@85 and NoC@90 ratios of A over B with their video-bootstrap intervals, and the registered
    decisions (fewer clicks: NoC@90 interval below 1; less than half: below 0.5)."""
    r85 = noc_ratio(a, b, videos, threshold=0.85, max_clicks=max_clicks)
    r90 = noc_ratio(a, b, videos, threshold=0.90, max_clicks=max_clicks)
    return {
        "noc85": list(r85),
        "noc90": list(r90),
        "fewer_clicks": bool(r90[2] < 1.0),
        "more_clicks": bool(r90[1] > 1.0),
        "less_than_half": bool(r90[2] < 0.5),
    }


def regime_checks(
    objects: Sequence[BenchObject], sessions: dict[str, list[ClickSession]], oracle: Sequence[float],
    role: str, max_clicks: int,
) -> dict[str, Any]:
    """The registered regime checks, each with its numbers and PASS/FAIL."""
    videos = {o.video for o in objects}
    need = REPORT_MIN_OBJECTS if role == "report" else MIN_OBJECTS
    checks: dict[str, Any] = {
        "objects": {"value": len(objects), "need": need, "pass": len(objects) >= need},
        "videos": {"value": len(videos), "need": MIN_VIDEOS, "pass": len(videos) >= MIN_VIDEOS},
        "oracle_mean_iou": {
            "value": float(np.mean(oracle)), "need": 0.90, "pass": bool(np.mean(oracle) >= 0.90),
            "fraction_reaching_0.90": float(np.mean(np.asarray(oracle) >= 0.90)),
        },
    }
    if GRABCUT in sessions:
        reach = float(np.mean([max(s.ious, default=0.0) >= 0.90 for s in sessions[GRABCUT]]))
        checks["grabcut_reaches_0.90"] = {"value": reach, "need": 1 / 3, "pass": reach >= 1 / 3}
    checks["pass"] = all(c["pass"] for c in checks.values() if isinstance(c, dict))
    return checks


def _backbone() -> tuple[Any, str]:
    try:
        return load_backbone(allow_download=False, progress=False), "SurgeNetXL (cached weights)"
    except WeightsError:
        torch.manual_seed(0)  # the same random backbone in every run, so runs compare
        return load_backbone(random_init=True), "random-init backbone (seed 0; SurgeNetXL weights not cached)"


def _day_one_settings(pairs: Sequence[str]) -> dict[str, float]:
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        out[key] = int(value) if key in ("guided_radius", "tissue_kinds") else float(value)
    return out


def plot(curves: dict[str, list[float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, values in curves.items():
        ax.plot(range(1, len(values) + 1), values, marker="o", ms=3, label=name)
    ax.axhline(0.85, color="grey", ls=":", lw=1)
    ax.axhline(0.90, color="grey", ls="--", lw=1)
    ax.set(xlabel="clicks", ylabel="mean IoU", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    seeds.add_argument(parser)
    parser.add_argument("--registry", type=Path, default=None, help=argparse.SUPPRESS)  # tests only
    parser.add_argument("--methods", nargs="+", default=[DAY_ONE, GRABCUT, RANDOM_WALKER],
                        choices=[DAY_ONE, GRABCUT, RANDOM_WALKER])
    parser.add_argument("--learned", action="store_true", help="also train and score the learned click head")
    parser.add_argument("--train-frames", type=int, default=36, help="learned head: training frames")
    parser.add_argument("--train-epochs", type=int, default=10, help="learned head: epochs")
    parser.add_argument("--train-seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="learned head: one head per seed, the best on held-out training videos kept")
    parser.add_argument("--frames-per-video", type=int, default=2)
    parser.add_argument("--objects-per-video", type=int, default=5)
    parser.add_argument("--max-clicks", type=int, default=MAX_CLICKS)
    parser.add_argument("--classical-scale", type=float, default=0.5)
    parser.add_argument("--day-one", nargs="*", default=[], metavar="KEY=VALUE",
                        help="ClickSegmenter settings (tune on calibration seeds only)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=1, help="worker processes for the sessions")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.registry is not None:  # a registry other than bench/README.md: its consistency is still checked
        import hashlib

        digest = hashlib.sha256(seeds.registry_text(args.registry).encode()).hexdigest()
        seed_set = seeds.load("interactive", args.seed_set, readme=args.registry, expected_sha256=digest)
    else:
        seed_set = seeds.load("interactive", args.seed_set)
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    size = (480, 854)
    backbone, which = _backbone()
    settings = _day_one_settings(args.day_one)
    segmenter = ClickSegmenter(backbone, cache_size=64, **settings)
    objects = video_objects(
        seed_set.seeds, seed_set.world, size, args.frames_per_video, args.objects_per_video
    )
    videos = [o.video for o in objects]
    print(f"{seed_set.describe()}; backbone: {which}; {len(objects)} objects from {len(set(videos))} videos",
          file=sys.stderr)

    methods: dict[str, Callable[[BenchObject, Prompt], np.ndarray]] = {}
    if DAY_ONE in args.methods:
        methods[DAY_ONE] = lambda o, p: segmenter.segment(
            o.frame, p, key=("eval", *o.frame_key), level=DAY_ONE).mask
    report: dict[str, Any] = {
        "backbone": which, "size": list(size), "objects": len(objects), "videos": len(set(videos)),
        "objects_per_video": args.objects_per_video, "frames_per_video": args.frames_per_video,
        "classical_scale": args.classical_scale, "day_one_settings": settings, "methods": {},
        "torch_threads": args.threads,
    }
    if args.learned:
        from surgenet_assist.training_loop.click_training import ClickTrainConfig, train_click_head_on

        train, train_videos = [], []
        for seed in seed_set.shared["train"]:  # registered training videos, never evaluated on
            clip = generate_clip(seed, CLIP_FRAMES, size[0], size[1], world=seed_set.world)
            train += [(clip.frames[t], clip.masks[t]) for t in (5, 15, 25)]
            train_videos += [str(seed)] * 3
        train, train_videos = train[: args.train_frames], train_videos[: args.train_frames]
        t0 = time.perf_counter()
        config = ClickTrainConfig(epochs=args.train_epochs, seeds=tuple(args.train_seeds))
        best, fits = train_click_head_on(train, segmenter, videos=train_videos, config=config, progress=True)
        head = best.head
        report["learned_training"] = {
            "frames": len(train), "seconds": round(time.perf_counter() - t0, 1), "epochs": args.train_epochs,
            "heldout": "last quarter of the training videos (by seed), early stopping with step 0 = day one",
            "seeds": [{"seed": f.seed, "heldout_noc90": f.heldout_noc, "best_epoch": f.best_epoch,
                       "objects": f.objects} for f in fits],
            "kept_seed": best.seed,
        }
        print(f"learned head: {report['learned_training']}", file=sys.stderr)
        learned = segmenter.with_head(head, "bench")
        methods[LEARNED] = lambda o, p: learned.segment(o.frame, p, key=("eval", *o.frame_key)).mask
    if GRABCUT in args.methods:
        grabcut = classical(grabcut_core, args.classical_scale)
        methods[GRABCUT] = lambda o, p: grabcut(o.frame, p)
    if RANDOM_WALKER in args.methods:
        walker = classical(random_walker_core, args.classical_scale)
        methods[RANDOM_WALKER] = lambda o, p: walker(o.frame, p)

    oracle = oracle_ious(segmenter, objects)  # embeds every frame once, before any worker starts
    t0 = time.perf_counter()
    ran = run_sessions(methods, objects, args.max_clicks, args.jobs)
    report["wall_seconds"] = round(time.perf_counter() - t0, 1)
    sessions = {name: s for name, (s, _) in ran.items()}
    curves = {}
    for name in methods:
        per_class = defaultdict(list)
        for o, s in zip(objects, sessions[name], strict=True):
            per_class[o.name].append(s)
        curves[name] = curve(sessions[name], args.max_clicks)
        report["methods"][name] = {
            "overall": summarize(sessions[name], args.max_clicks),
            "intervals": summary_intervals(sessions[name], videos, max_clicks=args.max_clicks),
            "per_class": {k: summarize(v, args.max_clicks) for k, v in sorted(per_class.items())},
            "seconds": round(ran[name][1], 1),
        }
        print(f"{name}: {report['methods'][name]['intervals']} ({report['methods'][name]['seconds']} s)",
              file=sys.stderr)
    pairs = [(DAY_ONE, GRABCUT), (DAY_ONE, RANDOM_WALKER), (LEARNED, DAY_ONE)]
    report["ratios"] = {
        f"{a}/{b}": ratio_entry(sessions[a], sessions[b], videos, args.max_clicks)
        for a, b in pairs
        if a in sessions and b in sessions
    }
    report["regime"] = regime_checks(objects, sessions, oracle, seed_set.role, args.max_clicks)
    lat_objects = objects[:3]
    report["latency"] = {}
    if DAY_ONE in methods:
        report["latency"][DAY_ONE] = latency(
            lambda o, p, k: segmenter.segment(o.frame, p, key=k, level=DAY_ONE).mask, lat_objects)
    for name in (GRABCUT, RANDOM_WALKER):
        if name in methods:
            report["latency"][name] = latency(lambda o, p, k, m=methods[name]: m(o, p), lat_objects[:1], 4)
    report["curves"] = curves
    report = seed_set.stamp(report)
    out = args.json or BENCH / "results" / (
        "interactive.json" if seed_set.role == "report" else "interactive_calibration.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    if args.plot:
        plot(curves, args.plot, f"IoU per click, world {seed_set.world}, {seed_set.role} seeds")
    print(json.dumps({k: report[k] for k in ("ratios", "regime")}, indent=2))
    return report


if __name__ == "__main__":
    main()
