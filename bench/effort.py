"""Annotation effort: annotator hours to label videos to the same quality, five workflows side by side.

Pre-registered in ``bench/README.md`` ("Annotation effort"): seeds (calibration 26001-26006, report
26101-26112; shared ``pool`` videos the first champion is fitted on, ``val`` videos its gate validates on),
metrics, regime checks and the decision rule. The simulated annotator and its time model are
``core/effort.py``; the workflows (a) from scratch ... (e) the loop are ``training_loop/effort.py``; the time
model's sources are in ``docs/effort.md``.

Run (calibration; report runs only with frozen code, ``--seed-set report``)::

    OMP_NUM_THREADS=1 python bench/effort.py --json bench/results/effort_calibration.json

Random-init backbone unless the SurgeNetXL weights are cached (the report says which). Writes the picture
(hours per video against videos labelled, one curve per workflow) to ``--plot``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import seeds
import torch

from surgenet_assist.core.backbone import load_backbone
from surgenet_assist.core.effort import TARGET_IOU, TimeModel
from surgenet_assist.core.errors import WeightsError
from surgenet_assist.core.interactive import ClickSegmenter
from surgenet_assist.core.synthetic import generate_clip
from surgenet_assist.training_loop.effort import (
    WORKFLOW_NAMES,
    LabelledVideo,
    VideoEffort,
    annotate_video,
    fit_champion,
    keyframe_features,
    mean_interval,
    propagated_masks,
    ratio_interval,
    run_loop,
    set_threads,
    summarize,
)
from surgenet_assist.training_loop.registry import gap_interval

BENCHMARK = "annotation_effort"
TARGET_RATIO = 1 / 3  # (d) needs at most a third of (a)'s time
#: plausible from-scratch seconds per object region (regime check R3): SAM's unassisted masks took 34 s,
#: COCO's polygons about 80 s (docs/effort.md); a time model far outside this range prices nothing real
PER_OBJECT_RANGE_S = (10.0, 120.0)
#: time models the (d)/(a) ratio is recomputed under (from the same action counts)
SENSITIVITY = {
    "vertex 0.5 s": {"vertex_s": 0.5},
    "vertex 2 s": {"vertex_s": 2.0},
    "click 1 s": {"click_s": 1.0},
    "click 3 s": {"click_s": 3.0},
    "no review time": {"frame_review_s": 0.0},
    "review 6 s": {"frame_review_s": 6.0},
}


def _backbone() -> tuple[torch.nn.Module, str]:
    try:
        return load_backbone(allow_download=False, progress=False), "SurgeNetXL (cached weights)"
    except WeightsError:
        torch.manual_seed(0)  # the same random backbone in every run, so runs compare
        return load_backbone(random_init=True), "random-init backbone (seed 0; SurgeNetXL weights not cached)"


def make_video(seed: int, args: argparse.Namespace, world: str, backbone: Any) -> LabelledVideo:
    clip = generate_clip(seed, args.frames, args.size[0], args.size[1], world=world)
    video = LabelledVideo(str(seed), clip.frames, clip.masks, clip.phases, clip.cvs)
    video.features = keyframe_features(backbone, clip.frames, args.short_side)
    return video


def seconds_under(efforts: list[VideoEffort], model: TimeModel) -> list[float]:
    return [model.seconds(e.actions) for e in efforts]


def analyse(per_workflow: dict[str, list[VideoEffort]], loop: Any, base: TimeModel) -> dict[str, Any]:
    """Summaries, regime checks and the pre-registered decisions."""
    out: dict[str, Any] = {"workflows": {w: summarize(e) for w, e in per_workflow.items()}}
    by_video = {w: {e.video: e for e in efforts} for w, efforts in per_workflow.items()}
    videos = [e.video for e in per_workflow["a"]]
    hours = {w: [by_video[w][v].hours for v in videos] for w in per_workflow}
    out["ratios_vs_a"] = {}
    for w in per_workflow:
        if w == "a":
            continue
        r, lo, hi = ratio_interval(hours[w], hours["a"])
        out["ratios_vs_a"][w] = {"ratio": round(r, 4), "ci95": [round(lo, 4), round(hi, 4)]}
    sens = {}
    for name, change in SENSITIVITY.items():
        model = TimeModel(**{**base.as_dict(), **change})
        d = seconds_under([by_video["d"][v] for v in videos], model)
        a = seconds_under([by_video["a"][v] for v in videos], model)
        r, lo, hi = ratio_interval(d, a)
        sens[name] = {"d_over_a": round(r, 4), "ci95": [round(lo, 4), round(hi, 4)]}
    out["sensitivity_d_over_a"] = sens

    # regime checks
    checks = []
    n = len(videos)
    same = all(sorted(by_video[w]) == sorted(videos) for w in per_workflow)
    checks.append(
        {
            "check": "R1 at least 6 videos, every workflow on the same videos",
            "pass": n >= 6 and same,
            "detail": f"{n} videos",
        }
    )
    quality = all(
        e.min_object_iou >= TARGET_IOU and e.phase_exact and e.cvs_exact
        for efforts in per_workflow.values()
        for e in efforts
    )
    worst = min(e.min_object_iou for efforts in per_workflow.values() for e in efforts)
    checks.append(
        {
            "check": "R2 equal quality: every object IoU >= 0.90, phase and CVS exact, every workflow",
            "pass": quality,
            "detail": f"lowest object IoU {worst:.4f}",
        }
    )
    per_object = [base.seconds(e.actions) / max(1, e.objects) for e in per_workflow["a"]]
    m, _ = mean_interval(per_object)
    checks.append(
        {
            "check": "R3 from-scratch seconds per object region within {:g}-{:g} s".format(
                *PER_OBJECT_RANGE_S
            ),
            "pass": PER_OBJECT_RANGE_S[0] <= m <= PER_OBJECT_RANGE_S[1],
            "detail": f"{m:.1f} s",
        }
    )
    promoted = sum(c["promoted"] for c in loop.cycles[:-1])  # the last cycle pre-annotates nothing
    checks.append(
        {
            "check": "R4 the loop promoted a new champion before its last batch",
            "pass": promoted > 0,
            "detail": f"{promoted} promotions in {len(loop.cycles) - 1} cycles that fed a batch",
        }
    )
    out["regime"] = checks
    regime_ok = all(c["pass"] for c in checks[:3])

    # decision 1: (d) <= 1/3 (a)
    d = out["ratios_vs_a"]["d"]
    if not regime_ok:
        verdict = "no claim (regime failed)"
    elif d["ci95"][1] < TARGET_RATIO:
        verdict = "met"
    elif d["ci95"][0] > TARGET_RATIO:
        verdict = "not met"
    else:
        verdict = "undecided (interval straddles 1/3)"
    out["target_d_third_of_a"] = {**d, "target": round(TARGET_RATIO, 4), "verdict": verdict}

    # decision 2: (e) last batch cheaper than first
    batches = np.asarray(loop.batches)
    e_hours = np.asarray([e.hours for e in loop.efforts])
    first, last = e_hours[batches == 0].tolist(), e_hours[batches == batches.max()].tolist()
    curve = []
    for b in sorted(set(batches.tolist())):
        mean, half = mean_interval(e_hours[batches == b].tolist())
        curve.append({"batch": int(b), "mean": round(mean, 4), "ci95": round(half, 4)})
    e_out: dict[str, Any] = {
        "per_batch_hours_per_video": curve,
        "cycles": loop.cycles,
        "order": [e.video for e in loop.efforts],
    }
    if batches.max() == 0 or len(first) < 2 or len(last) < 2:
        e_out["verdict"] = "no claim (fewer than two batches of two videos)"
    else:
        diff, (lo, hi) = gap_interval(first, last)
        e_out["first_minus_last"] = {"hours": round(diff, 4), "ci95": [round(lo, 4), round(hi, 4)]}
        last_videos = [e.video for e, b in zip(loop.efforts, loop.batches, strict=True) if b == batches.max()]
        paired = [
            by_video["d"][v].hours - e.hours
            for v, e in zip(
                last_videos,
                [e for e, b in zip(loop.efforts, loop.batches, strict=True) if b == batches.max()],
                strict=True,
            )
        ]
        pm, ph = mean_interval(paired)
        e_out["last_batch_d_minus_e"] = {"hours": round(pm, 4), "ci95_half": round(ph, 4)}
        if not regime_ok:
            e_out["verdict"] = "no claim (regime failed)"
        elif lo > 0 and checks[3]["pass"]:
            e_out["verdict"] = "met"
        elif lo > 0:
            e_out["verdict"] = "last batch cheaper, but no promotion: video order, not learning (no claim)"
        else:
            e_out["verdict"] = "not met"
    out["target_e_last_cheaper"] = e_out
    return out


def plot(per_workflow: dict[str, list[VideoEffort]], loop: Any, path: Path, title: str) -> None:
    """Hours per video and cumulative hours against videos labelled (the loop's order for every workflow)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = [e.video for e in loop.efforts]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for w, efforts in per_workflow.items():
        by = {e.video: e.hours for e in efforts}
        y = [by[v] for v in order]
        x = np.arange(1, len(y) + 1)
        label = f"({w}) {WORKFLOW_NAMES[w]}"
        axes[0].plot(x, y, marker="o", ms=3, label=label)
        axes[1].plot(x, np.cumsum(y), marker="o", ms=3, label=label)
    for b in range(1, max(loop.batches) + 1):
        first = loop.batches.index(b) + 0.5
        for ax in axes:
            ax.axvline(first, color="grey", lw=0.6, ls=":")
    axes[0].set(
        xlabel="videos labelled (loop's order; dotted: nightly cycles)",
        ylabel="annotator hours per video",
        title="Effort per video",
    )
    axes[1].set(xlabel="videos labelled", ylabel="cumulative annotator hours", title="Total effort")
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


DOCS = Path(__file__).resolve().parents[1] / "docs" / "effort.md"


def docs_table(report: dict[str, Any]) -> str:
    """The numbers section of docs/effort.md, written from a result (so the page never drifts from it)."""
    seed_set = report["seed_set"]
    lines = [
        f"{seed_set['role'].capitalize()} run: world {report['world']}, {len(seed_set['seeds'])} videos "
        f"(seeds {seed_set['seeds'][0]}–{seed_set['seeds'][-1]}), "
        f"registry {seed_set['registry_sha256'][:12]}; "
        f"{report['backbone']}; {report['settings']['frames']} keyframes per video at "
        f"{report['settings']['size'][0]}x{report['settings']['size'][1]}. 95 % intervals over videos.",
        "",
        "| workflow | hours per video | total hours | ratio to (a) [95 % CI] | clicks | vertices | "
        "timeline edits | CVS toggles | lowest object IoU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for w, s in report["workflows"].items():
        r = report["ratios_vs_a"].get(w)
        ratio = f"{r['ratio']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]" if r else "1"
        a = s["actions_per_video"]
        lines.append(
            f"| ({w}) {WORKFLOW_NAMES[w]} | {s['hours_per_video']:.3f} ± {s['hours_per_video_ci95']:.3f} | "
            f"{s['hours_total']:.2f} ± {s['hours_total_ci95']:.2f} | {ratio} | {a['clicks']:.0f} | "
            f"{a['vertices']:.0f} | {a['boundary_edits']:.0f} | {a['toggles']:.0f} | "
            f"{s['min_object_iou']:.3f} |"
        )
    lines += ["", "Regime checks:", ""]
    lines += [f"- {'PASS' if c['pass'] else 'FAIL'} {c['check']}: {c['detail']}" for c in report["regime"]]
    t = report["target_d_third_of_a"]
    lines += [
        "",
        f"**(d) at most a third of (a)**: {t['verdict']}: total(d) / total(a) = {t['ratio']:.3f} "
        f"[{t['ci95'][0]:.3f}, {t['ci95'][1]:.3f}] against 0.333.",
    ]
    sens = ", ".join(
        f"{k}: {v['d_over_a']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]"
        for k, v in report["sensitivity_d_over_a"].items()
    )
    lines += ["", f"(d)/(a) under other time models: {sens}."]
    e = report["target_e_last_cheaper"]
    batches = "; ".join(
        f"batch {b['batch']}: {b['mean']:.3f} ± {b['ci95']:.3f} h" for b in e["per_batch_hours_per_video"]
    )
    lines += [
        "",
        f"**(e) last batch cheaper than first**: {e['verdict']}. Hours per video by batch: {batches}.",
    ]
    if "first_minus_last" in e:
        f, p = e["first_minus_last"], e["last_batch_d_minus_e"]
        lines.append(
            f"First minus last batch: {f['hours']:+.3f} h "
            f"[{f['ci95'][0]:+.3f}, {f['ci95'][1]:+.3f}] (Welch); "
            f"on the last batch's videos, (d) minus (e): {p['hours']:+.3f} ± {p['ci95_half']:.3f} h (paired)."
        )
    gates = ", ".join(
        f"{c['candidate']} {'promoted' if c['promoted'] else 'kept champion'} "
        f"({c['candidate_score']:.3f} vs {c['champion_score']:.3f})"
        for c in e["cycles"]
    )
    lines += ["", f"Nightly cycles (validation score, candidate vs champion): {gates}."]
    return "\n".join(lines)


def write_docs(report: dict[str, Any], path: Path = DOCS) -> None:
    """Replace the section between ``<!-- effort-<role>:start -->`` and its end marker in docs/effort.md."""
    role = report["seed_set"]["role"]
    start, end = f"<!-- effort-{role}:start -->", f"<!-- effort-{role}:end -->"
    text = path.read_text(encoding="utf-8")
    a, b = text.index(start) + len(start), text.index(end)
    path.write_text(text[:a] + "\n" + docs_table(report) + "\n" + text[b:], encoding="utf-8")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    seeds.add_argument(parser)
    parser.add_argument("--frames", type=int, default=30, help="1 fps keyframes per video")
    parser.add_argument("--size", type=int, nargs=2, default=[144, 256], metavar=("H", "W"))
    parser.add_argument("--short-side", type=int, default=192, help="backbone input short side")
    parser.add_argument("--batch", type=int, default=3, help="videos per batch of the loop (e)")
    parser.add_argument("--videos", type=int, default=None, help="only the first N videos (smoke runs)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--write-docs", action="store_true", help="write the numbers into docs/effort.md")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    seed_set = seeds.load(BENCHMARK, args.seed_set)
    print(seed_set.describe(), file=sys.stderr)
    backbone, which = _backbone()
    t0 = time.perf_counter()
    video_seeds = list(seed_set.seeds)[: args.videos]
    make = lambda s: make_video(s, args, seed_set.world, backbone)  # noqa: E731
    videos = [make(s) for s in video_seeds]
    pool = [make(s) for s in seed_set.shared["pool"]]
    val = [make(s) for s in seed_set.shared["val"]]
    print(f"features: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    champion = fit_champion(pool, val, "cycle-0")
    segmenter = ClickSegmenter(backbone, short_side=args.short_side)
    base = TimeModel()
    per_workflow: dict[str, list[VideoEffort]] = {w: [] for w in "abcd"}
    moved = []
    for v in videos:
        moved.append(propagated_masks(v))
        for w in "abcd":
            per_workflow[w].append(annotate_video(v, w, champion, segmenter, base, propagated=moved[-1]))
        print(
            f"video {v.name}: " + ", ".join(f"({w}) {per_workflow[w][-1].hours:.3f} h" for w in "abcd"),
            file=sys.stderr,
        )
    loop = run_loop(
        videos,
        champion,
        pool,
        val,
        segmenter,
        args.batch,
        base,
        progress=lambda s: print(s, file=sys.stderr),
        propagated=moved,
    )
    per_workflow["e"] = loop.efforts
    report: dict[str, Any] = {
        "backbone": which,
        "settings": {
            "frames": args.frames,
            "size": args.size,
            "short_side": args.short_side,
            "batch": args.batch,
            "target_iou": TARGET_IOU,
            "threads": args.threads,
        },
        "time_model": base.as_dict(),
        "first_champion_validation": champion.validation,
        **analyse(per_workflow, loop, base),
        "per_video": {w: [e.as_dict() for e in efforts] for w, efforts in per_workflow.items()},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    report = seed_set.stamp(report)
    for c in report["regime"]:
        print(f"{'PASS' if c['pass'] else 'FAIL'}  {c['check']}: {c['detail']}", file=sys.stderr)
    for w, s in report["workflows"].items():
        print(
            f"({w}) {WORKFLOW_NAMES[w]}: {s['hours_per_video']:.3f} ± {s['hours_per_video_ci95']:.3f} h",
            file=sys.stderr,
        )
    print(f"(d)/(a): {report['target_d_third_of_a']}", file=sys.stderr)
    print(f"(e): {report['target_e_last_cheaper'].get('verdict')}", file=sys.stderr)
    if args.plot:
        plot(per_workflow, loop, args.plot, f"{seed_set.describe()}; {which}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    if args.write_docs:
        write_docs(report)
    return report


if __name__ == "__main__":
    main()
