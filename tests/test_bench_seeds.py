"""Pre-registered benchmark seeds (bench/seeds.py) and privileged ceilings (bench/ceilings.py)."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from surgenet_assist.core.synthetic import WORLDS, generate_clip

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


seeds = _load("seeds")
ceilings = _load("ceilings")

BENCHMARKS = ("active_learning", "interactive", "continued_pretraining", "propagation", "annotation_effort")


def _registry(tmp_path: Path, yaml_text: str) -> Path:
    readme = tmp_path / "README.md"
    readme.write_text(f"# bench\n\n{seeds.START}\n```yaml\n{yaml_text}```\n{seeds.END}\n", encoding="utf-8")
    return readme


def _digest(readme: Path) -> str:
    return hashlib.sha256(seeds.registry_text(readme).encode()).hexdigest()


def test_every_benchmark_is_registered_with_disjoint_seeds_and_a_world():
    for name in BENCHMARKS:
        calibration, report = seeds.load(name, "calibration"), seeds.load(name, "report")
        assert calibration.world in WORLDS and calibration.world == report.world == "v2"
        assert calibration.seeds and report.seeds and not set(calibration.seeds) & set(report.seeds)
        assert calibration.registry_sha256 == seeds.REGISTRY_SHA256


def test_replicates_hand_out_disjoint_videos():
    cal, rep = seeds.load("active_learning", "calibration"), seeds.load("active_learning", "report")
    videos = [
        v
        for seed_set in (cal, rep)
        for r in seed_set.seeds
        for role, n in (("pool", 4), ("val", 2), ("test", 3))
        for v in seed_set.video_seeds(r, role, n)
    ]
    assert len(videos) == len(set(videos))
    with pytest.raises(seeds.SeedRegistryError, match="not in active_learning's report seeds"):
        rep.video_seeds(cal.seeds[0], "pool", 4)  # a calibration replicate is not a report replicate
    with pytest.raises(seeds.SeedRegistryError, match="do not fit"):
        cal.video_seeds(cal.seeds[0], "val", 201)  # would run into the test videos
    with pytest.raises(seeds.SeedRegistryError, match="are videos, not replicates"):
        seeds.load("propagation", "report").video_seeds(25101, "pool", 1)


def test_overlapping_lists_are_refused(tmp_path):
    overlap = "a:\n  world: v2\n  unit: video\n  calibration: [1, 2, 3]\n  report: [3, 4]\n"
    readme = _registry(tmp_path, overlap)
    with pytest.raises(seeds.SeedRegistryError, match="a.calibration and a.report overlap") as info:
        seeds.load("a", "report", readme, expected_sha256=_digest(readme))
    assert "disjoint" in info.value.hint
    # across benchmarks, and a replicate's whole block of videos counts
    across = (
        "a:\n  world: v2\n  unit: replicate\n  calibration: [5]\n  report: [6]\n"
        "b:\n  world: v2\n  unit: video\n  calibration: [6001]\n  report: [7]\n"
    )
    readme = _registry(tmp_path, across)
    with pytest.raises(seeds.SeedRegistryError, match="a.report and b.calibration overlap"):
        seeds.load("b", "calibration", readme, expected_sha256=_digest(readme))
    shared = "a:\n  world: v2\n  unit: video\n  calibration: [1]\n  report: [2]\n  shared:\n    train: [2]\n"
    readme = _registry(tmp_path, shared)
    with pytest.raises(seeds.SeedRegistryError, match="a.report and a.shared.train overlap"):
        seeds.load("a", "calibration", readme, expected_sha256=_digest(readme))


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("a:\n  world: v9\n  unit: video\n  calibration: [1]\n  report: [2]\n", "unknown synthetic world"),
        ("a:\n  world: v2\n  unit: frame\n  calibration: [1]\n  report: [2]\n", "unknown unit"),
        ("a:\n  world: v2\n  unit: video\n  calibration: [1, 1]\n  report: [2]\n", "repeats a seed"),
        ("a:\n  world: v2\n  unit: video\n  calibration: []\n  report: [2]\n", "non-empty list"),
        ("a:\n  world: v2\n  unit: video\n  report: [2]\n", "non-empty list"),
        ("a: [1, 2]\n", "not a mapping"),
        ("a: {world: v2\n", "not valid YAML"),
    ],
)
def test_malformed_registries_are_refused(tmp_path, yaml_text, message):
    readme = _registry(tmp_path, yaml_text)
    with pytest.raises(seeds.SeedRegistryError, match=message):
        seeds.load("a", "calibration", readme, expected_sha256=_digest(readme))


def test_an_unrecorded_change_of_the_registry_is_refused(tmp_path):
    text = "a:\n  world: v2\n  unit: video\n  calibration: [1]\n  report: [2]\n"
    readme = _registry(tmp_path, text)
    recorded = _digest(readme)
    assert seeds.load("a", "report", readme, expected_sha256=recorded).seeds == (2,)
    _registry(tmp_path, text.replace("report: [2]", "report: [9]"))  # report seeds swapped after the fact
    with pytest.raises(seeds.SeedRegistryError, match="registry in README.md changed") as info:
        seeds.load("a", "report", readme, expected_sha256=recorded)
    assert "change log" in info.value.hint
    with pytest.raises(seeds.SeedRegistryError, match="no seeds registered for benchmark 'b'"):
        seeds.load("b", "report", readme, expected_sha256=_digest(readme))
    with pytest.raises(seeds.SeedRegistryError, match="unknown seed set 'test'"):
        seeds.load("a", "test", readme, expected_sha256=_digest(readme))
    (tmp_path / "README.md").write_text("no registry here")
    with pytest.raises(seeds.SeedRegistryError, match="no seed registry block"):
        seeds.load("a", "report", readme)


def test_results_are_stamped_with_world_and_seed_set():
    seed_set = seeds.load("propagation", "report")
    stamped = seed_set.stamp({"mIoU": 0.5})
    assert stamped["mIoU"] == 0.5 and stamped["world"] == "v2"
    assert stamped["seed_set"]["role"] == "report" and stamped["seed_set"]["seeds"] == list(seed_set.seeds)
    assert stamped["seed_set"]["registry_sha256"] == seeds.REGISTRY_SHA256
    assert "25101-25110" in seed_set.describe() and "world v2" in seed_set.describe()


def test_mask_features_are_class_fractions_without_ignored_pixels():
    masks = np.zeros((1, 6, 6), np.uint8)
    masks[0, :3] = 2
    masks[0, 5, 5] = 255
    feats = ceilings.mask_features(masks, num_classes=3, grid=3).reshape(10, 3)
    assert np.allclose(feats[0], [17 / 36, 0, 18 / 36])  # the ignored pixel is in no class
    assert np.allclose(feats[1], [0, 0, 1]) and np.allclose(feats[9], [3 / 4, 0, 0])


def test_privileged_ceilings_find_the_signal_and_checks_read_it():
    fit = [generate_clip(s, 40, 48, 85) for s in (31, 32, 33)]
    held_out = [generate_clip(s, 40, 48, 85) for s in (41, 42)]
    out = ceilings.privileged_ceilings(fit, held_out)
    assert out["world"] == "v2" and out["frames"] == {"fit": 120, "held_out": 80}
    assert out["state"]["phase"] > out["chance"]["state"]["phase"] + 0.4
    assert out["state"]["cvs"] > out["chance"]["state"]["cvs"] + 0.15
    assert out["mask"]["phase"] > out["chance"]["mask"]["phase"]
    assert out["tools"]["phase"] > out["chance"]["tools"]["phase"] + 0.2

    def interval(values):
        return float(np.mean(values)), 0.01

    rows = ceilings.ceiling_checks([out, out], interval, margin=0.05)
    assert [(r["task"], r["pass"]) for r in rows if "state" in r["check"]] == [("phase", True), ("cvs", True)]
    # a ceiling at chance fails the check
    flat = {**out, "state": {"phase": 0.15, "cvs": 0.7}, "chance": {**out["chance"]}}
    flat["chance"]["state"] = {"phase": 0.14, "cvs": 0.69}
    rows = ceilings.ceiling_checks([flat, flat], interval, margin=0.05)
    assert not any(r["pass"] for r in rows if "state" in r["check"])
    with pytest.raises(ValueError, match="different worlds"):
        ceilings.privileged_ceilings(fit, [generate_clip(41, 10, 48, 85, world="v1")])
