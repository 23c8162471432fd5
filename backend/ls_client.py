"""Label Studio tooling through the SDK: create a project wired to this backend, and bulk pre-annotation.

``preannotate`` exists because Label Studio's "Retrieve predictions" sends all selected tasks in ONE
``/predict`` call with a 100 s timeout: big projects time out. We pull tasks page by page, predict in batches
locally (same code as the server), and post predictions through the API. It resumes: tasks that already
have a prediction of the current model version are skipped (read back from Label Studio, plus a local state
file under the data dir for runs that were interrupted between posting and listing).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import parse_label_config
from .labeling_configs import label_config
from .ls_api import LabelStudioAPI, LabelStudioToolError, no_answer
from .ls_webhooks import WebhookCheck, ensure_project_webhook
from .media import MediaError, MediaFetcher
from .preannotation import held_out_tasks
from .predictions import ImageTaskModel, VideoTaskModel

log = logging.getLogger("surgenet_assist.backend")
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def client(url: str, api_key: str) -> Any:
    """SDK client; legacy tokens and personal access tokens both work (the SDK picks the auth scheme)."""
    from label_studio_sdk import LabelStudio

    return LabelStudio(base_url=url.rstrip("/"), api_key=api_key)


def _call(what: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - ApiError, httpx errors
        status = getattr(exc, "status_code", None)
        body = str(getattr(exc, "body", "") or exc)[:300]
        if status is None:  # no answer at all: httpx connect/timeout errors carry the request they made
            try:
                url = f"{exc.request.url.scheme}://{exc.request.url.netloc.decode()}"  # type: ignore[attr-defined]
            except (AttributeError, RuntimeError):  # not an httpx error, or one without its request
                url = None
            raise no_answer(what, url, exc) from None
        hint = "check --url and --api-key (a legacy token needs LS started with --enable-legacy-api-token)"
        if status == 403 and ("reserved" in body or "not allowed" in body):  # its two SSRF checks
            hint = (
                "start Label Studio with ML_BLOCK_LOCAL_IP=false and SSRF_PROTECTION_ENABLED=false (or "
                "USE_DEFAULT_BANNED_SUBNETS=false): it refuses the backend's private address"
            )
        raise LabelStudioToolError(f"Label Studio {what} failed: HTTP {status} {body}", hint) from None


@dataclass
class ProjectSetup:
    project_id: int
    ml_backend_id: int | None
    task_ids: list[int]
    storage_id: int | None
    webhook: WebhookCheck | None = None  # what Label Studio holds for the project's webhook afterwards


def setup_project(
    url: str,
    api_key: str,
    *,
    frames: str | Path | None = None,
    video: str | Path | None = None,
    backend_url: str | None = None,
    title: str | None = None,
    document_root: str | Path | None = None,
    backend_auth: tuple[str, str] | None = None,
    interactive: bool = False,
    webhook_secret: str | None = None,
) -> ProjectSetup:
    """Create a project with our config, local-files storage (or uploads), tasks, and the backend connected.

    Files under ``document_root`` (Label Studio's ``LOCAL_FILES_DOCUMENT_ROOT``) are served through a Local
    Storage; anything else is uploaded. ``backend_auth``: the backend's Basic Auth (user, password), which
    Label Studio then sends on its calls to the backend (its webhooks carry none: see backend/webhooks.py).
    ``interactive``: the image config with smart click/box tools, and the backend connected "for interactive
    preannotations" (Label Studio sends clicks only to such a backend, and only with Auto-Annotation on).
    ``webhook_secret``: the project's webhook to the backend carries it (``X-Surgenet-Webhook-Secret``);
    the webhook is created or repaired either way, and the result is in ``webhook``
    (:func:`~surgenet_assist.backend.ls_webhooks.ensure_project_webhook`).
    """
    if (frames is None) == (video is None):
        raise LabelStudioToolError("give exactly one of --frames DIR or --video FILE")
    if interactive and frames is None:
        raise LabelStudioToolError(
            "interactive mode works on frame projects", "give --frames DIR with --interactive"
        )
    ls = client(url, api_key)
    if frames is not None:
        files = sorted(p for p in Path(frames).iterdir() if p.suffix.lower() in IMAGE_EXTS)
        if not files:
            raise LabelStudioToolError(f"no images in {frames}", f"put frames ({sorted(IMAGE_EXTS)}) there")
        kind, key, folder = "image", "image", Path(frames).resolve()
        cfg = label_config("image", interactive=interactive)
    else:
        from surgenet_assist.core.video import open_video

        files = [Path(video).resolve()]
        with open_video(files[0]) as v:
            fps = float(v.fps)
        kind, key, folder = "video", "video", files[0].parent
        cfg = label_config("video", frame_rate=round(fps, 3))
    project = _call(
        "create project",
        lambda: ls.projects.create(title=title or f"surgenet-assist {kind} {folder.name}", label_config=cfg),
    )
    storage_id = None
    root = Path(document_root).resolve() if document_root else None
    if root is not None and folder.is_relative_to(root) and folder != root:  # LS refuses the root itself
        storage = _call(
            "create local storage",
            lambda: ls.import_storage.local.create(
                project=project.id, path=str(folder), use_blob_urls=True, title="surgenet-assist frames"
            ),
        )
        storage_id = storage.id
        tasks = []
        for i, f in enumerate(files):
            data = {key: f"/data/local-files/?d={f.resolve().relative_to(root).as_posix()}"}
            if kind == "image":
                data |= {"source_video": folder.name, "frame_index": i}
            tasks.append({"data": data})
        resp = _call(
            "import tasks",
            lambda: ls.projects.import_tasks(id=project.id, request=tasks, return_task_ids=True),
        )
        task_ids = list(getattr(resp, "task_ids", None) or [])
    else:
        task_ids = _upload(url, api_key, project.id, files)
    ml_id = webhook = None
    if backend_url:
        ml_id = _connect_backend(ls, project.id, backend_url, backend_auth, interactive)
        webhook = _webhook(url, api_key, project.id, backend_url, webhook_secret)
    return ProjectSetup(project.id, ml_id, task_ids, storage_id, webhook)


def connect_project(
    url: str,
    api_key: str,
    project_id: int,
    *,
    backend_url: str,
    backend_auth: tuple[str, str] | None = None,
    interactive: bool = False,
    webhook_secret: str | None = None,
) -> ProjectSetup:
    """An existing project: connect the backend unless an ML backend at ``backend_url`` already is, and
    create or repair its webhook (``ls setup-project --project N``: how a deployment adds the secret header to
    the webhooks of projects it set up before)."""
    ls = client(url, api_key)
    existing = _call("list ML backends", lambda: list(ls.ml.list(project=project_id)))
    same = [m for m in existing if str(getattr(m, "url", "")).rstrip("/") == backend_url.rstrip("/")]
    ml_id = same[0].id if same else _connect_backend(ls, project_id, backend_url, backend_auth, interactive)
    webhook = _webhook(url, api_key, project_id, backend_url, webhook_secret)
    return ProjectSetup(project_id, ml_id, [], None, webhook)


def _connect_backend(
    ls: Any, project_id: int, backend_url: str, backend_auth: tuple[str, str] | None, interactive: bool
) -> int:
    """Connect the ML backend (Label Studio then calls its /health and /setup, and tries to create the
    headerless webhook that :func:`_webhook` repairs)."""
    auth = (
        {"auth_method": "BASIC_AUTH", "basic_auth_user": backend_auth[0], "basic_auth_pass": backend_auth[1]}
        if backend_auth
        else {}
    )
    ml = _call(
        "connect ML backend",
        lambda: ls.ml.create(
            project=project_id, url=backend_url, title="surgenet-assist", is_interactive=interactive, **auth
        ),
    )
    return ml.id


def _webhook(url: str, api_key: str, project_id: int, backend_url: str, secret: str | None) -> WebhookCheck:
    api = LabelStudioAPI(url, api_key)
    try:
        return ensure_project_webhook(api, project_id, backend_url, secret=secret)
    finally:
        api.close()


def _upload(url: str, api_key: str, project_id: int, files: list[Path]) -> list[int]:
    api = LabelStudioAPI(url, api_key, timeout=600)  # a personal access token is exchanged for an access one
    ids: list[int] = []
    try:
        for f in files:
            with open(f, "rb") as fh:
                body = api.request(
                    "POST",
                    f"/api/projects/{project_id}/import",
                    what=f"upload of {f}",
                    params={"return_task_ids": "true"},
                    files={"file": (f.name, fh)},
                )
            ids += (body or {}).get("task_ids") or []
    finally:
        api.close()
    return ids


# ---------------------------------------------------------------------------------------------------
# bulk pre-annotation
# ---------------------------------------------------------------------------------------------------
def _state_file(url: str, project_id: int, rank: int = 0, world_size: int = 1) -> Path:
    """One state file per rank under torchrun (ranks never write the same file)."""
    from surgenet_assist.core.paths import data_home

    safe = "".join(ch if ch.isalnum() else "_" for ch in url)
    suffix = f".rank{rank}" if world_size > 1 else ""
    return data_home() / "preannotate" / f"{safe}-{project_id}{suffix}.json"


def _load_state(path: Path, version: str) -> set[int]:
    """Tasks done by ``version`` according to this state file and its siblings of other ranks/runs."""
    base = path.name.split(".rank")[0].removesuffix(".json")
    done: set[int] = set()
    for file in sorted(path.parent.glob(f"{base}*.json")) if path.parent.is_dir() else []:
        if file.name != f"{base}.json" and not file.name.startswith(f"{base}.rank"):
            continue
        try:
            data = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        done |= set(data.get(version, []))
    return done


def _save_state(path: Path, version: str, done: set[int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        data = {}
    data[version] = sorted(done)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def _tasks(ls: Any, project_id: int, page_size: int = 100) -> Iterator[dict[str, Any]]:
    pager = _call("list tasks", lambda: ls.tasks.list(project=project_id, page_size=page_size, fields="all"))
    for task in pager:
        yield {"id": task.id, "data": dict(task.data or {})}


@dataclass
class PreannotateReport:
    total: int
    predicted: int
    skipped: int
    failed: dict[int, str]
    model_version: str
    held_out: dict[int, str] = field(default_factory=dict)  # task -> why it got an empty prediction


def preannotate(
    url: str,
    api_key: str,
    project_id: int,
    predictor: Any,
    *,
    batch: int = 32,
    video_sample_fps: float | None = 1.0,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
    store: Any = None,
    store_project: str | None = None,
    held_out: bool = False,
) -> PreannotateReport:
    """Predict every task of a project that has no prediction of ``predictor.model_version`` yet.

    Tasks of test and final videos (their split in ``store``'s ``store_project``, else the store's rule) get
    an empty prediction instead, listed in ``held_out`` (:mod:`.preannotation`); ``held_out=True``
    pre-annotates them too. Under torchrun (``rank`` of ``world_size``) each rank takes a disjoint share of
    ALL the project's tasks (split by task id, so every rank computes the same split however far the others
    have got) and skips the done ones in it; ``total`` and ``skipped`` then count this rank's share."""
    from tqdm.auto import tqdm

    from surgenet_assist.core.archive import shard_by_weight

    ls = client(url, api_key)
    project = _call("get project", lambda: ls.projects.get(id=project_id))
    plan = parse_label_config(project.label_config, predictor.schema)
    if not plan.controls:
        raise LabelStudioToolError(
            f"project {project_id}'s labeling config has no control this model can fill",
            "use `surgenet-assist ls config` for a config the model fills",
        )
    version = predictor.model_version
    state = _state_file(url, project_id, rank, world_size)
    done = _load_state(state, version)
    existing = _call("list predictions", lambda: ls.predictions.list(project=project_id))
    done |= {p.task for p in existing if p.model_version == version}
    tasks = sorted(_tasks(ls, project_id), key=lambda t: t["id"])
    if world_size > 1:
        tasks = [tasks[i] for i in sorted(shard_by_weight([1.0] * len(tasks), world_size)[rank])]
    todo = [t for t in tasks if t["id"] not in done]
    log.info(
        "project %s: %d tasks, %d already predicted by %s",
        project_id,
        len(tasks),
        len(tasks) - len(todo),
        version,
    )

    fetch = MediaFetcher(LabelStudioAPI(url, api_key))

    image_model = ImageTaskModel(predictor) if plan.image_controls else None
    video_model = VideoTaskModel(predictor, video_sample_fps) if plan.video_controls else None
    failed: dict[int, str] = {}
    held = {
        todo[i]["id"]: f"{why['split']} video: empty prediction"
        for i, why in held_out_tasks(todo, plan, store, store_project, allowed=held_out).items()
    }
    predicted = 0
    desc = f"project {project_id}" + (f" rank {rank}/{world_size}" if world_size > 1 else "")
    bar = tqdm(total=len(todo), unit="task", desc=desc, disable=not progress)
    step = max(1, batch) if video_model is None else 1
    for lo in range(0, len(todo), step):
        chunk = todo[lo : lo + step]
        predict = [t for t in chunk if t["id"] not in held]
        try:
            preds = _predict_chunk(predict, plan, image_model, video_model, fetch) if predict else []
        except MediaError:
            preds = []  # isolate the bad task(s): retry one by one
            for t in predict:
                try:
                    preds += _predict_chunk([t], plan, image_model, video_model, fetch)
                except MediaError as exc:
                    failed[t["id"]] = exc.message
                    preds.append(None)
        found = iter(preds)
        preds = [{"score": 0.0, "result": []} if t["id"] in held else next(found) for t in chunk]
        for t, p in zip(chunk, preds, strict=True):
            if p is None:
                continue
            _call(
                f"post prediction for task {t['id']}",
                lambda t=t, p=p: ls.predictions.create(
                    task=t["id"], result=p["result"], score=p["score"], model_version=version
                ),
            )
            done.add(t["id"])
            predicted += t["id"] not in held
        _save_state(state, version, done)
        bar.update(len(chunk))
    bar.close()
    return PreannotateReport(len(tasks), predicted, len(tasks) - len(todo), failed, version, held)


def _predict_chunk(
    chunk: list[dict[str, Any]], plan: Any, image_model: Any, video_model: Any, fetch: Callable
) -> list[dict[str, Any]]:
    merged = [{"score": 1.0, "result": []} for _ in chunk]
    for model in (image_model, video_model):
        if model is None:
            continue
        for m, p in zip(merged, model.predict(chunk, plan, fetch), strict=True):
            m["result"] += p["result"]
            m["score"] = min(m["score"], p["score"])
    return merged
