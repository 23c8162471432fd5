"""Regenerate the Label Studio pictures of docs/interactive.md from a real editor session:

* ``docs/images/interactive_label_studio_clicks.png``: a click (and, where the first mask spills over, an
  Alt+click) with the smart key-point tool, Auto-Annotation on, and the backend's brush mask shown as a
  suggestion waiting to be accepted;
* ``docs/images/interactive_label_studio.png``: the same task after accepting the suggestion and submitting.

What runs: Label Studio 1.23 from ``.ls-venv`` (offline, SQLite, started by the integration-test
helper ``tests/integration/ls_live.py``), surgenet-assist's ML backend in-process with the click-to-mask
engine on the random-init backbone (no SurgeNetXL weights needed), a project made by
``ls setup-project --interactive``'s code on one synthetic 854x480 frame, and a headless Chromium driven
by Playwright clicking in the editor like a user. Label Studio forwards the clicks to the backend's
``/predict``; nothing is injected into the page.

Playwright and Chromium are **not** project dependencies; install them outside the repository::

    apt-get install -y chromium
    python3 -m venv /tmp/pwvenv && /tmp/pwvenv/bin/pip install playwright   # no `playwright install`

then, from the repository root::

    .venv/bin/python scripts/label_studio_interactive_screenshot.py [--out docs/images]

This file is run twice: by the project's Python (servers, project, clicks to make) and, with ``--browser``,
by the Playwright venv's Python (the editor session; imports only Playwright and the standard library).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WIDTH, HEIGHT = 854, 480  # the frame
VIEWPORT = {"width": 1400, "height": 900}
SEED = 3  # a clip whose frame shows the gallbladder large and whole
TARGET = "Gallbladder"
USER, PASSWORD = "admin@example.com", "adminpass123"  # what ls_live.label_studio() creates


# ---------------------------------------------------------------------------------------------------------
# project side (the repository's .venv)
# ---------------------------------------------------------------------------------------------------------
def _interior(mask: Any) -> tuple[int, int, float]:
    """The pixel deepest inside ``mask`` (x, y) and its distance to the border."""
    import cv2
    import numpy as np

    depth = cv2.distanceTransform(np.pad(mask.astype(np.uint8), 1), cv2.DIST_L2, 5)[1:-1, 1:-1]
    y, x = np.unravel_index(int(depth.argmax()), depth.shape)
    return int(x), int(y), float(depth.max())


def _keypoint(rid: str, x: int, y: int, positive: bool = True) -> dict[str, Any]:
    """The smart key point the editor sends for a click on pixel (x, y)."""
    return {
        "original_width": WIDTH,
        "original_height": HEIGHT,
        "image_rotation": 0,
        "value": {"x": (x + 0.5) / WIDTH * 100, "y": (y + 0.5) / HEIGHT * 100, "width": 0.6,
                  "keypointlabels": [TARGET]},
        "is_positive": positive,
        "id": rid,
        "from_name": "click",
        "to_name": "image",
        "type": "keypointlabels",
        "origin": "manual",
    }


def _plan_clicks(url: str, token: str, ml_id: int, task_id: int, gt: Any) -> list[dict[str, Any]]:
    """A positive click deep inside the target; an Alt+click where the backend's first mask spills out of it
    (asked through Label Studio's own interactive endpoint, as the editor will)."""
    import requests

    from surgenet_assist.core.encoders import brush_rle_to_mask

    x, y, _ = _interior(gt)
    clicks = [{"x": x, "y": y, "positive": True}]
    r = requests.post(
        f"{url}/api/ml/{ml_id}/interactive-annotating",
        headers={"Authorization": f"Token {token}"},
        json={"task": task_id, "context": {"result": [_keypoint("kp1", x, y)]}},
        timeout=300,
    )
    r.raise_for_status()
    answer = r.json()
    if "data" not in answer:
        raise SystemExit(f"Label Studio's interactive call failed: {answer}")
    (region,) = answer["data"]["result"]
    mask = brush_rle_to_mask(region["value"]["rle"], HEIGHT, WIDTH) == 255
    iou = (mask & gt).sum() / max((mask | gt).sum(), 1)
    print(f"first click ({x}, {y}): mask IoU {iou:.2f} with the {TARGET.lower()}", flush=True)
    wrong = mask & ~gt
    if wrong.any():
        nx, ny, depth = _interior(wrong)
        if depth >= 4:  # a spill wide enough to click on
            clicks.append({"x": nx, "y": ny, "positive": False})
    return clicks


def make_pictures(out: Path, browser_python: str, chromium: str) -> None:
    import cv2
    import numpy as np
    import requests
    from werkzeug.serving import make_server

    sys.path.insert(0, str(ROOT / "tests" / "integration"))
    from ls_live import TOKEN, free_port, label_studio

    from surgenet_assist.backend.app import BackendSettings, create_app
    from surgenet_assist.backend.ls_client import setup_project
    from surgenet_assist.core.backbone import load_backbone
    from surgenet_assist.core.interactive import ClickSegmenter
    from surgenet_assist.core.schema import DEFAULT_SCHEMA
    from surgenet_assist.core.synthetic import generate_clip

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ls-shot-") as tmp, label_studio(Path(tmp) / "ls") as server:
        url = server["url"]
        segmenter = ClickSegmenter(load_backbone(random_init=True), short_side=256)
        settings = BackendSettings(
            label_studio_url=url, label_studio_api_key=TOKEN, extra={"open_store": False}
        )
        app = create_app(settings, click_segmenter=segmenter)
        backend = make_server("127.0.0.1", free_port(), app, threaded=True)
        threading.Thread(target=backend.serve_forever, daemon=True).start()
        try:
            folder = Path(tmp) / "frames"  # outside Label Studio's document root: uploaded
            folder.mkdir()
            clip = generate_clip(SEED, 1, HEIGHT, WIDTH)
            frame = cv2.cvtColor(clip.frames[0], cv2.COLOR_RGB2BGR)
            cv2.imwrite(str(folder / "video31_000120.png"), frame)
            res = setup_project(
                url, TOKEN, frames=folder, backend_url=f"http://127.0.0.1:{backend.server_port}",
                interactive=True, title="surgenet-assist interactive",
            )
            # interactive only: no "predictions" tab (this backend has no segmentation model for /predict)
            headers = {"Authorization": f"Token {TOKEN}"}
            requests.patch(
                f"{url}/api/projects/{res.project_id}", headers=headers,
                json={"show_collab_predictions": False}, timeout=30,
            ).raise_for_status()
            gt = np.asarray(clip.masks[0]) == DEFAULT_SCHEMA.class_id(TARGET)
            clicks = _plan_clicks(url, TOKEN, res.ml_backend_id, res.task_ids[0], gt)
            job = {
                "url": url, "project": res.project_id, "task": res.task_ids[0], "clicks": clicks,
                "user": USER, "password": PASSWORD, "label": TARGET, "chromium": chromium,
                "clicks_png": str(out / "interactive_label_studio_clicks.png"),
                "accepted_png": str(out / "interactive_label_studio.png"),
            }
            env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
            subprocess.run([browser_python, __file__, "--browser", json.dumps(job)], check=True, env=env)
            for p in requests.get(
                f"{url}/api/predictions/", headers=headers, params={"task": res.task_ids[0]}, timeout=30
            ).json():
                print(f"note: a prediction was stored ({p.get('model_version')})", flush=True)
        finally:
            backend.shutdown()
    print(f"wrote {job['clicks_png']} and {job['accepted_png']}")


# ---------------------------------------------------------------------------------------------------------
# browser side (the Playwright venv): a user in Label Studio's editor
# ---------------------------------------------------------------------------------------------------------
def browse(job: dict[str, Any]) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=job["chromium"], args=["--no-sandbox"])
        page = browser.new_page(viewport=VIEWPORT)
        page.set_default_timeout(job.get("timeout_s", 120) * 1000)
        try:
            _edit(page, job)
        except Exception:
            failed = Path(tempfile.gettempdir()) / "label_studio_interactive_failure.png"
            page.screenshot(path=str(failed))
            print(f"failed; the page at that moment: {failed}", file=sys.stderr, flush=True)
            raise
        finally:
            browser.close()


def _edit(page: Any, job: dict[str, Any]) -> None:
    """Log in, open the task, click with the smart key point, screenshot, accept, submit, screenshot."""
    url = job["url"]
    page.goto(f"{url}/user/login/")
    page.fill("input[name=email]", job["user"])
    page.fill("input[name=password]", job["password"])
    page.click("button[type=submit], input[type=submit]")
    page.wait_for_load_state("networkidle")
    page.goto(f"{url}/projects/{job['project']}/data?task={job['task']}")
    canvas = page.locator("canvas[class^=overlay]")  # the image's overlay, sized as shown
    canvas.wait_for()
    page.wait_for_load_state("networkidle")
    page.wait_for_timeout(1500)

    page.get_by_text("Auto-Annotation", exact=True).click()  # the editor's toggle (bottom bar)
    page.get_by_text("Auto-Accept Suggestions").wait_for()  # shown once Auto-Annotation is on
    page.wait_for_timeout(500)

    def pick_tool() -> None:
        """The label of the click tool (KeyPointLabels "click" is the config's second labels block), then
        the smart key-point tool from the toolbar's smart group (a plain key point is not sent). A
        suggestion unselects the label: picked again before every click."""
        page.get_by_text(job["label"], exact=True).nth(1).click()
        page.locator(".lsf-tool_smart").first.hover()
        page.locator(".lsf-toolbar__smart [aria-label=key-point-tool]").click()
        page.wait_for_timeout(300)

    box = canvas.bounding_box()
    assert box is not None

    def at(c: dict[str, Any]) -> tuple[float, float]:
        sx, sy = box["width"] / WIDTH, box["height"] / HEIGHT
        return box["x"] + (c["x"] + 0.5) * sx, box["y"] + (c["y"] + 0.5) * sy

    for c in job["clicks"]:
        pick_tool()
        with page.expect_response(lambda r: "interactive-annotating" in r.url) as answer:
            if not c["positive"]:
                page.keyboard.down("Alt")
            page.mouse.click(*at(c))
            if not c["positive"]:
                page.keyboard.up("Alt")
        body = answer.value.json()
        if "data" not in body:
            raise SystemExit(f"the backend's answer in the editor: {body}")
        page.wait_for_timeout(1500)  # the suggestion's brush is drawn
    page.mouse.move(box["x"] + box["width"] + 300, box["y"] + 40)  # no hover effects on the canvas
    page.get_by_text("suggestions").wait_for()
    page.wait_for_timeout(500)
    page.screenshot(path=job["clicks_png"])
    print(f"screenshot: {job['clicks_png']}", flush=True)

    page.get_by_test_id("bottombar-accept-suggestions-button").click()
    page.wait_for_timeout(800)
    with page.expect_response(lambda r: "/annotations" in r.url and r.request.method == "POST"):
        page.get_by_role("button", name="Submit").click()
    page.wait_for_load_state("networkidle")
    page.wait_for_timeout(1500)
    page.mouse.move(box["x"] + box["width"] + 300, box["y"] + 40)
    page.screenshot(path=job["accepted_png"])
    print(f"screenshot: {job['accepted_png']}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    ap.add_argument("--browser-python", default=os.environ.get("PLAYWRIGHT_PYTHON", "/tmp/pwvenv/bin/python"),
                    help="a Python with Playwright installed (default: %(default)s)")
    ap.add_argument("--chromium", default=os.environ.get("CHROMIUM", "/usr/lib/chromium/chromium"),
                    help="the Chromium binary Playwright drives (default: %(default)s, Debian's chromium)")
    ap.add_argument("--browser", help=argparse.SUPPRESS)  # internal: the editor session, job as JSON
    args = ap.parse_args()
    if args.browser:
        browse(json.loads(args.browser))
    else:
        make_pictures(args.out.resolve(), args.browser_python, args.chromium)


if __name__ == "__main__":
    main()
