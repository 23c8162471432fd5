"""A real Label Studio for tests: start it (own venv, SQLite, 127.0.0.1), catch its webhooks, and record what
it sends and exports for projects annotated through its API.

Used by ``test_label_studio.py`` (live, every run) and, as a script, to refresh the captured payloads the fast
unit tests read (``tests/fixtures/label_studio/``)::

    .venv/bin/python tests/integration/ls_live.py tests/fixtures/label_studio

Payload shapes are whatever Label Studio sends and exports; this module writes only the annotation *results*
(the editor's region format, label-studio.md section 3) and reads everything else back from the server.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import requests

ROOT = Path(__file__).resolve().parents[2]
LS_VENV = Path(os.environ.get("SURGENET_ASSIST_LS_VENV", ROOT / ".ls-venv"))
TOKEN = "0123456789abcdef0123456789abcdef01234567"
H, W = 64, 96


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServedBackend:
    """A Flask app from ``create_app`` behind the server ``surgenet-assist serve`` runs (uvicorn +
    ``backend.server.BackendServer``), on a free loopback port, in this process: tests talk to the backend as
    Label Studio does, through the same pools, body limits and health snapshot."""

    def __init__(self, app: Any, port: int | None = None, limits: Any = None) -> None:
        from surgenet_assist.backend.server import InProcessServer

        self.app = app
        self._server = InProcessServer(app, port=port or 0, limits=limits)
        self.asgi, self.port, self.url = self._server.asgi, self._server.port, self._server.url

    def stop(self) -> None:
        self._server.stop()


def send_chunked(port: int, head: bytes, chunks: int, chunk: bytes) -> bytes:
    """Send a request line and headers, then ``chunks`` chunks of a chunked body (stopping when the server
    hangs up), and return everything the server answered until it closed the connection."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    sock.sendall(head)
    try:
        for _ in range(chunks):
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    except OSError:
        pass  # the server refused before the end: the point
    data = b""
    while True:
        try:
            piece = sock.recv(4096)
        except OSError:
            break
        if not piece:
            break
        data += piece
    sock.close()
    return data


def wait_up(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log else ""
            raise RuntimeError(f"Label Studio exited with {proc.returncode}:\n{tail}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not up after {timeout:.0f} s")


def poll(fn, timeout: float = 30.0, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


@contextmanager
def label_studio(base: Path, extra_env: dict[str, str] | None = None) -> Iterator[dict[str, Any]]:
    """Start Label Studio with its data under ``base``; yields ``{"url", "files", "log"}``. ``extra_env``:
    more of Label Studio's settings (e.g. ``TASK_API_PAGE_SIZE_MAX``, or ``SSRF_PROTECTION_ENABLED=true``,
    its own default), after the ones every test needs."""
    exe = LS_VENV / "bin" / "label-studio"
    files = base / "files"
    files.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "DJANGO"))}
    env.update(
        LABEL_STUDIO_USERNAME="admin@example.com",
        LABEL_STUDIO_PASSWORD="adminpass123",
        LABEL_STUDIO_USER_TOKEN=TOKEN,
        LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED="true",
        LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=str(files),
        SENTRY_DSN="",
        FRONTEND_SENTRY_DSN="",
        LATEST_VERSION_CHECK="false",
        COLLECT_ANALYTICS="false",
        ML_BLOCK_LOCAL_IP="false",
        SSRF_PROTECTION_ENABLED="false",
        HOME=str(base),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra_env or {})
    log = base / "ls.log"
    cmd = [str(exe), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port)]
    cmd += ["--data-dir", str(base / "data"), "--enable-legacy-api-token"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=base)
    try:
        wait_up(f"http://127.0.0.1:{port}/health", 300, proc, log)
        yield {"url": f"http://127.0.0.1:{port}", "files": files, "log": log}
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


class WebhookSink:
    """A tiny HTTP server that records every JSON body POSTed to it (Label Studio's webhook deliveries)."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                sink.bodies.append(json.loads(raw or b"null"))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/webhook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def actions(self) -> list[str]:
        return [b.get("action") for b in self.bodies]

    def close(self) -> None:
        self.server.shutdown()


# ----------------------------------------------------------------------------------------------------------
# annotation results as Label Studio's editor writes them (the masks/labels are the test's ground truth)
# ----------------------------------------------------------------------------------------------------------
def rect_mask(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((H, W), np.uint8)
    m[y0:y1, x0:x1] = 255
    return m


def brush(rid: str, label: str, mask: np.ndarray, from_name: str = "mask") -> dict[str, Any]:
    from label_studio_sdk.converter.brush import mask2rle  # the SDK's encoder: our code is under test

    return {
        "id": rid,
        "type": "brushlabels",
        "from_name": from_name,
        "to_name": "image",
        "origin": "manual",
        "original_width": W,
        "original_height": H,
        "image_rotation": 0,
        "value": {"format": "rle", "rle": mask2rle(mask), "brushlabels": [label]},
    }


def polygon(rid: str, label: str, points: list[list[float]], from_name: str = "outline") -> dict[str, Any]:
    return {
        "id": rid,
        "type": "polygonlabels",
        "from_name": from_name,
        "to_name": "image",
        "origin": "manual",
        "original_width": W,
        "original_height": H,
        "image_rotation": 0,
        "value": {"points": points, "closed": True, "polygonlabels": [label]},
    }


def choices(rid: str, from_name: str, values: list[str], to_name: str = "image") -> dict[str, Any]:
    return {
        "id": rid,
        "type": "choices",
        "from_name": from_name,
        "to_name": to_name,
        "origin": "manual",
        "value": {"choices": values},
    }


def timeline(rid: str, label: str, start: int, end: int) -> dict[str, Any]:
    return {
        "id": rid,
        "type": "timelinelabels",
        "from_name": "phases",
        "to_name": "video",
        "origin": "manual",
        "value": {"ranges": [{"start": start, "end": end}], "timelinelabels": [label]},
    }


POLYGON_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <PolygonLabels name="outline" toName="image">
    <Label value="Gallbladder"/>
    <Label value="Liver"/>
  </PolygonLabels>
  <Choices name="cvs" toName="image" choice="multiple">
    <Choice value="C1"/><Choice value="C2"/><Choice value="C3"/>
  </Choices>
</View>
"""


@dataclass
class Capture:
    """What Label Studio sent and exported for the annotated projects."""

    configs: dict[str, str] = field(default_factory=dict)
    ids: dict[str, int] = field(default_factory=dict)  # project ids
    exports: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    webhooks: list[dict[str, Any]] = field(default_factory=list)


def export(url: str, project_id: int, api_key: str = TOKEN) -> list[dict[str, Any]]:
    """Label Studio's JSON export of every task (the "Export" button, JSON format)."""
    from surgenet_assist.backend.ls_api import LabelStudioAPI

    api = LabelStudioAPI(url, api_key)  # a personal access token is exchanged for an access token
    try:
        return api.get(
            f"/api/projects/{project_id}/export", what="export", exportType="JSON", download_all_tasks="true"
        )
    finally:
        api.close()


def _local_tasks(ls: Any, project_id: int, root: Path, folder: Path, frames: list[np.ndarray]) -> list[int]:
    """Frames as local files with ``source_video``/``frame_index`` (what ``ls setup-project`` imports)."""
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(frames):
        cv2.imwrite(str(folder / f"{i:05d}.png"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    storage = ls.import_storage.local.create(project=project_id, path=str(folder), use_blob_urls=True)
    del storage
    tasks = [
        {
            "data": {
                "image": f"/data/local-files/?d={(folder / f'{i:05d}.png').relative_to(root).as_posix()}",
                "source_video": folder.name,
                "frame_index": i,
            }
        }
        for i in range(len(frames))
    ]
    return list(ls.projects.import_tasks(id=project_id, request=tasks, return_task_ids=True).task_ids)


def _upload(url: str, project_id: int, name: str, frame: np.ndarray) -> int:
    """An uploaded frame: task data is only ``image`` (LS prefixes the file name with a hash)."""
    import cv2

    ok, buf = cv2.imencode(".png", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    assert ok
    r = requests.post(
        f"{url}/api/projects/{project_id}/import?return_task_ids=true",
        headers={"Authorization": f"Token {TOKEN}"},
        files={"file": (name, buf.tobytes(), "image/png")},
        timeout=60,
    )
    r.raise_for_status()
    return int(r.json()["task_ids"][0])


def annotate_and_capture(
    server: dict[str, Any], sink: WebhookSink, backend_url: str | None = None
) -> Capture:
    """Create an image, a polygon and a video project, annotate them through the API (creates, an update that
    drops a label, a skipped task, a delete), and capture the webhooks and the JSON exports.

    With ``backend_url`` our backend is connected to the image and video projects as their ML backend (so its
    ``/webhook`` gets the same events) as well.
    """
    from label_studio_sdk import LabelStudio

    from surgenet_assist.core.formats.ls_config import image_config, video_config
    from surgenet_assist.core.synthetic import generate_clip

    url, root = server["url"], server["files"]
    ls = LabelStudio(base_url=url, api_key=TOKEN)
    cap = Capture()
    clip = generate_clip(3, 5, H, W)

    def project(name: str, cfg: str, ml: bool) -> int:
        p = ls.projects.create(title=f"capture {name}", label_config=cfg)
        ls.webhooks.create(project=p.id, url=sink.url, send_payload=True, send_for_all_actions=True)
        if ml and backend_url:
            ls.ml.create(project=p.id, url=backend_url, title="surgenet-assist", is_interactive=False)
        cap.configs[name] = cfg
        cap.ids[name] = p.id
        return p.id

    # --- image project: the config `surgenet-assist ls config --kind image` generates -----------------------
    pid = project("image", image_config(), ml=True)
    t = _local_tasks(ls, pid, root, root / "case07", clip.frames[:4])
    t.append(_upload(url, pid, "video09_frame_000120.png", clip.frames[4]))
    liver_a, liver_b = rect_mask(30, 60, 0, 40), rect_mask(40, 64, 30, 70)
    gb = rect_mask(30, 55, 50, 90)  # overlaps liver_b: the later region is on top
    ls.annotations.create(
        id=t[0],
        result=[
            brush("r0a", "Liver", liver_a),
            brush("r0b", "Liver", liver_b),
            brush("r0c", "Gallbladder", gb),
            choices("r0d", "cvs", ["C1", "C3"]),
            choices("r0e", "phase", ["CalotTriangleDissection"]),
        ],
    )
    ann1 = ls.annotations.create(
        id=t[1],
        result=[brush("r1a", "Grasper", rect_mask(0, 20, 0, 30)), choices("r1b", "phase", ["Preparation"])],
    )
    # the update drops the phase and repaints the mask: the store must tombstone the phase
    ls.annotations.update(id=ann1.id, result=[brush("r1a", "Liver", rect_mask(5, 25, 10, 60))])
    ls.annotations.create(id=t[2], result=[], was_cancelled=True)  # "Skip"
    doomed = ls.annotations.create(id=t[3], result=[choices("r3a", "phase", ["ClippingCutting"])])
    ls.annotations.delete(id=doomed.id)
    ls.annotations.create(
        id=t[4], result=[brush("r4a", "Fat", rect_mask(20, 50, 20, 80)), choices("r4b", "cvs", ["C2"])]
    )
    cap.exports["image"] = export(url, pid)

    # --- polygons ---------------------------------------------------------------------------------------
    pid = project("polygon", POLYGON_CONFIG, ml=False)
    tp = _local_tasks(ls, pid, root, root / "case08", clip.frames[:1])
    ls.annotations.create(
        id=tp[0],
        result=[
            polygon("p0a", "Liver", [[10.0, 50.0], [60.0, 50.0], [60.0, 90.0], [10.0, 90.0]]),
            polygon("p0b", "Gallbladder", [[50.0, 10.0], [90.0, 10.0], [70.0, 45.0]]),
            choices("p0c", "cvs", ["C1", "C2", "C3"]),
        ],
    )
    cap.exports["polygon"] = export(url, pid)

    # --- video project: phase timeline (frameRate = the video's fps) and clip CVS ----------------------
    pid = project("video", video_config(frame_rate=10), ml=True)
    (root / "videos").mkdir(exist_ok=True)
    path = generate_clip(4, 30, H, W).write_video(root / "videos" / "case10.mp4", fps=10)
    data = {"video": f"/data/local-files/?d={path.relative_to(root).as_posix()}"}
    ls.import_storage.local.create(project=pid, path=str(path.parent), use_blob_urls=True)
    tv = list(ls.projects.import_tasks(id=pid, request=[{"data": data}], return_task_ids=True).task_ids)
    annv = ls.annotations.create(
        id=tv[0],
        result=[
            timeline("v0a", "Preparation", 1, 12),
            timeline("v0b", "CalotTriangleDissection", 13, 30),
            choices("v0c", "cvs", ["C1"], to_name="video"),
        ],
    )
    # the update moves the boundary (the label's frame range changes) and drops the CVS choice
    ls.annotations.update(
        id=annv.id,
        result=[timeline("v0a", "Preparation", 1, 8), timeline("v0b", "CalotTriangleDissection", 9, 25)],
    )
    cap.exports["video"] = export(url, pid)

    expected = ["ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED"]
    poll(lambda: all(a in sink.actions() for a in expected), what="webhook deliveries")
    cap.webhooks = [_scrub(b) for b in sink.bodies if str(b.get("action", "")).startswith("ANNOTATION")]
    return cap


def personal_access_token(url: str) -> str:
    """Create a personal access token for the admin, then switch legacy tokens off for the organisation, as
    Label Studio does for new organisations (the legacy token only bootstraps this)."""
    legacy = {"Authorization": f"Token {TOKEN}"}
    r = requests.post(f"{url}/api/token/", headers=legacy, timeout=30)
    r.raise_for_status()
    pat = r.json()["token"]
    settings = {"api_tokens_enabled": True, "legacy_api_tokens_enabled": False}
    requests.post(f"{url}/api/jwt/settings", headers=legacy, json=settings, timeout=30).raise_for_status()
    assert requests.get(f"{url}/api/projects/", headers=legacy, timeout=30).status_code == 401
    return pat


def capture_bulk_events(server: dict[str, Any], sink: WebhookSink, api_key: str) -> list[dict[str, Any]]:
    """The events the per-annotation capture lacks: ``ANNOTATIONS_CREATED`` ("create annotations from
    predictions" on three uploaded frames) and ``TASKS_DELETED`` (the data manager's delete and the API's)."""
    from label_studio_sdk import LabelStudio

    from surgenet_assist.backend.ls_api import LabelStudioAPI
    from surgenet_assist.core.formats.ls_config import image_config
    from surgenet_assist.core.synthetic import generate_clip

    url = server["url"]
    ls = LabelStudio(base_url=url, api_key=api_key)
    api = LabelStudioAPI(url, api_key)
    p = ls.projects.create(title="capture bulk", label_config=image_config())
    ls.webhooks.create(project=p.id, url=sink.url, send_payload=True, send_for_all_actions=True)
    import cv2

    ids: list[int] = []
    for i, frame in enumerate(generate_clip(4, 3, H, W).frames):
        ok, buf = cv2.imencode(".png", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        assert ok
        body = api.request(
            "POST",
            f"/api/projects/{p.id}/import",
            what="upload",
            params={"return_task_ids": "true"},
            files={"file": (f"video21_{i:06d}.png", buf.tobytes(), "image/png")},
        )
        ids += body["task_ids"]
    for t in ids:
        region = brush("p1", "Liver", rect_mask(2, 20, 3, 30))
        ls.predictions.create(task=t, result=[region], model_version="m1")
    everything = {"all": True, "excluded": []}
    ls.actions.create(id="predictions_to_annotations", project=p.id, selected_items=everything)
    ls.actions.create(id="delete_tasks", project=p.id, selected_items={"all": False, "included": [ids[1]]})
    ls.tasks.delete(id=str(ids[2]))
    wanted = ["ANNOTATIONS_CREATED", "TASKS_DELETED"]
    poll(lambda: sink.actions().count("TASKS_DELETED") == 2 and all(a in sink.actions() for a in wanted))
    api.close()
    return [_scrub(b) for b in sink.bodies if b.get("action") in wanted]


def _scrub(body: dict[str, Any]) -> dict[str, Any]:
    """A webhook body without the project's invite token (kept out of fixtures)."""
    project = body.get("project")
    if isinstance(project, dict) and project.get("token"):
        body = {**body, "project": {**project, "token": "<redacted>"}}
    return body


def main(out: str) -> None:
    import tempfile

    dest = Path(out)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, label_studio(Path(tmp)) as server:
        sink, bulk_sink = WebhookSink(), WebhookSink()
        try:
            cap = annotate_and_capture(server, sink)
            bulk = capture_bulk_events(server, bulk_sink, personal_access_token(server["url"]))
        finally:
            sink.close()
            bulk_sink.close()
        version = requests.get(f"{server['url']}/api/version", timeout=10).json()  # needs no token
    for name, cfg in cap.configs.items():
        (dest / f"{name}_config.xml").write_text(cfg, encoding="utf-8")
    for name, tasks in cap.exports.items():
        (dest / f"{name}_export.json").write_text(json.dumps(tasks, indent=1), encoding="utf-8")
    (dest / "webhooks.json").write_text(json.dumps(cap.webhooks, indent=1), encoding="utf-8")
    (dest / "webhooks_bulk.json").write_text(json.dumps(bulk, indent=1), encoding="utf-8")
    ls_version = version.get("label-studio-os-package", {}).get("version") or version.get("release")
    (dest / "captured_with.json").write_text(json.dumps({"label_studio": ls_version}, indent=1) + "\n")
    print(f"captured {len(cap.webhooks)} webhooks and {len(cap.exports)} exports into {dest}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "tests" / "fixtures" / "label_studio"))
