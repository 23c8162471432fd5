"""Finding, downloading, verifying and safely reading backbone checkpoints.

Downloads go to a cache (``$SURGENET_ASSIST_HOME/weights``, default the XDG data dir; paths in the torch-free
``core/paths.py``), are verified by SHA-256 and moved into place atomically, so an interrupted download never
leaves a file that looks complete. Every checkpoint is read with ``torch.load(..., weights_only=True)``: a
file that needs arbitrary pickled code is refused, not executed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .errors import ChecksumMismatchError, WeightsError, WeightsNotAvailableError
from .paths import data_home as data_home  # re-exported: its home is core.paths (torch-free)
from .paths import downloads_allowed, weights_cache_dir
from .zoo import PretrainedSpec

_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def digest_matches(spec: PretrainedSpec, digest: str) -> bool:
    """True when ``digest`` agrees with all that is published about the file's SHA-256."""
    if spec.sha256:
        return digest == spec.sha256
    ok = True
    if spec.sha256_prefix:
        ok &= digest.startswith(spec.sha256_prefix)
    if spec.sha256_suffix:
        ok &= digest.endswith(spec.sha256_suffix)
    return ok


def _expected(spec: PretrainedSpec) -> str:
    if spec.sha256:
        return spec.sha256
    return f"{spec.sha256_prefix or ''}…{spec.sha256_suffix or ''}"


def cached_path(spec: PretrainedSpec) -> Path:
    return weights_cache_dir() / spec.file_name


def _verify_cached(spec: PretrainedSpec, path: Path) -> None:
    """Check a cached file against the published digest and against the digest recorded at download."""
    digest = sha256_file(path)
    sidecar = path.with_name(path.name + ".sha256")
    recorded = sidecar.read_text().strip() if sidecar.exists() else None
    if not digest_matches(spec, digest) or (recorded and recorded != digest):
        raise ChecksumMismatchError(
            f"cached weights {path} have SHA-256 {digest}, expected {recorded or _expected(spec)}",
            f"delete {path} and run `surgenet-assist weights download {spec.name}` again",
        )


def ensure_weights(spec: PretrainedSpec, allow_download: bool = True, progress: bool = True) -> Path:
    """Return the path of ``spec``'s verified weights, downloading them into the cache if needed."""
    path = cached_path(spec)
    if path.exists():
        _verify_cached(spec, path)
        return path
    if not allow_download or not downloads_allowed():
        raise WeightsNotAvailableError(
            f"weights for {spec.name!r} are not cached and downloads are disabled",
            f"download {spec.url} and save it as {path}, or pass --weights FILE",
        )
    return download(spec, progress=progress)


def download(spec: PretrainedSpec, progress: bool = True) -> Path:
    """Download ``spec``'s weights, verify SHA-256, then move them into the cache atomically."""
    target = cached_path(spec)
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"Downloading {spec.name} from {spec.url}\nLicence: {spec.licence}", file=sys.stderr)
    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{spec.file_name}.", suffix=".part", dir=target.parent)
    try:
        try:
            response = urllib.request.urlopen(spec.url, timeout=60)  # noqa: S310 - fixed https URL
        except (urllib.error.URLError, OSError) as exc:
            raise WeightsNotAvailableError(
                f"cannot download {spec.url}: {getattr(exc, 'reason', exc)}",
                f"when offline, fetch the file elsewhere and save it as {target}, or pass --weights FILE",
            ) from None
        total = int(response.headers.get("Content-Length") or 0) or None
        with (
            os.fdopen(fd, "wb") as out,
            response,
            tqdm(total=total, unit="B", unit_scale=True, desc=spec.file_name, disable=not progress) as bar,
        ):
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
        hexdigest = digest.hexdigest()
        if not digest_matches(spec, hexdigest):
            raise ChecksumMismatchError(
                f"download of {spec.url} has SHA-256 {hexdigest}, expected {_expected(spec)}",
                "the file is corrupt or was changed upstream; retry, and report it if it persists",
            )
        os.replace(tmp_name, target)
        target.with_name(target.name + ".sha256").write_text(hexdigest + "\n")
        return target
    except OSError as exc:
        raise WeightsError(
            f"cannot write weights to {target}: {exc.strerror}",
            "free disk space or set SURGENET_ASSIST_HOME to a writable directory with ~100 MB free",
        ) from None
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)


def read_checkpoint(path: str | Path) -> Any:
    """``torch.load`` with ``weights_only=True``; DINO checkpoints' ``argparse.Namespace`` is allowed."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"weights file {path} does not exist", "check the path passed with --weights")
    if path.stat().st_size == 0:
        raise WeightsError(f"weights file {path} is empty", "download it again")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0][:200]
        raise WeightsError(
            f"refused to load {path}: it holds pickled objects other than tensors ({first})",
            "only load checkpoints you trust as plain state dicts; re-save it with "
            "torch.save(model.state_dict(), ...) from a trusted environment",
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise WeightsError(
            f"cannot read weights file {path}: {str(exc).splitlines()[0][:200]}",
            "the file is truncated or not a PyTorch checkpoint; download it again",
        ) from None


def _strip_prefixes(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "backbone.", "encoder."):
            while key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def extract_backbone_state(obj: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Find the backbone tensors in any accepted checkpoint shape and return them with metadata.

    Accepted: a flat teacher state dict; a full DINO checkpoint (``teacher`` with ``backbone.`` keys and an
    ``args`` namespace carrying ``data_mean``/``data_std``); ``{"state_dict"|"model": ...}`` wrappers; keys
    with ``module.``/``backbone.`` prefixes. DINO projection heads and classifier heads are dropped.
    """
    meta: dict[str, Any] = {}
    if not isinstance(obj, Mapping):
        raise WeightsError(
            f"checkpoint holds a {type(obj).__name__}, not a state dict",
            "pass a SurgeNet teacher .pth, a DINO checkpoint or a state dict",
        )
    if "teacher" in obj and isinstance(obj["teacher"], Mapping):
        args = obj.get("args")
        for field in ("data_mean", "data_std", "arch"):
            value = getattr(args, field, None) if args is not None else None
            if value is None and isinstance(args, Mapping):
                value = args.get(field)
            if value is not None:
                meta[field.replace("data_", "")] = tuple(value) if field != "arch" else value
        meta["source"] = "dino-teacher"
        state = {k: v for k, v in obj["teacher"].items() if not k.startswith(("head.", "module.head."))}
    else:
        state = obj
        for wrapper in ("state_dict", "model"):
            if wrapper in state and isinstance(state[wrapper], Mapping):
                state = state[wrapper]
                break
    state = _strip_prefixes(state)
    non_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if non_tensors:
        raise WeightsError(
            f"checkpoint entries are not tensors: {non_tensors[:5]}", "pass a state dict of tensors"
        )
    return state, meta


def copy_into_cache(spec: PretrainedSpec, source: str | Path) -> Path:
    """Put a file obtained elsewhere into the cache after checking its digest (for offline machines)."""
    if not Path(source).is_file():
        raise WeightsError(
            f"no weights file at {source}", f"give the path of the downloaded {spec.file_name}"
        )
    digest = sha256_file(source)
    if not digest_matches(spec, digest):
        raise ChecksumMismatchError(
            f"{source} has SHA-256 {digest}, which is not {spec.name}'s {_expected(spec)}",
            "check that you copied the right file",
        )
    target = cached_path(spec)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".part")
    shutil.copyfile(source, tmp)
    os.replace(tmp, target)
    target.with_name(target.name + ".sha256").write_text(digest + "\n")
    return target
