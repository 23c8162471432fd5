"""Model bundles: everything needed to serve a trained model, in one directory written atomically.

Layout::

    <bundle>/bundle.json   metadata: version, schema, backbone identity + hash, normalisation,
                           input size, preprocessing, training metadata, file hashes
    <bundle>/heads.pt      head weights (plain state dict)
    <bundle>/backbone.pt   backbone weights, unless the backbone is the unmodified zoo file
                           (then it is loaded from the weights cache and checked against its hash)

All tensors are read with ``torch.load(..., weights_only=True)``.

The ``preprocessing`` section is the contract between training and serving (:class:`Preprocessing`):
``short_side``, ``frame_size`` (the (H, W) training resized every frame to, or null), ``mean``/``std``,
``multiple``, ``interpolation`` and ``temporal_fps`` (the rate of the temporal phase model's sequences), plus
``source``. ``Predictor.from_bundle`` (backend, napari, ``predict``) and ``evaluate`` read it. A bundle
without the section (written before it existed) loads with ``source: "legacy"``: short side = the short side
of ``input_size``, frames kept at their size, INTER_AREA when shrinking and INTER_LINEAR when enlarging, a
1 fps temporal model: exactly what serving did before.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .backbone import SurgeNetBackbone, load_backbone, state_dict_sha256
from .errors import BundleError, WeightsError
from .model import Preprocessing, SurgeNetAssistModel
from .paths import atomic_directory
from .schema import LabelSchema
from .weights import read_checkpoint, sha256_file

BUNDLE_FORMAT = 1
MANIFEST = "bundle.json"


@dataclass
class BundleInfo:
    """The parsed ``bundle.json``."""

    version: str
    schema: LabelSchema
    backbone: dict[str, Any]
    input_size: tuple[int, int]
    created_at: str
    backbone_included: bool
    training: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    path: Path | None = None
    preprocessing: Preprocessing | None = None  # None only while parsing; read_bundle_info always sets it

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(self.backbone["mean"])

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(self.backbone["std"])


def _backbone_is_pristine(backbone: SurgeNetBackbone) -> bool:
    return backbone.weights_origin == "zoo" and state_dict_sha256(backbone.trunk.state_dict()) == (
        backbone.weights_sha256
    )


def save_bundle(
    model: SurgeNetAssistModel,
    path: str | Path,
    version: str,
    training: dict[str, Any] | None = None,
    include_backbone: bool | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a bundle directory atomically (temp dir + rename); returns its path."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise BundleError(f"bundle {path} already exists", "choose a new version/path or pass overwrite=True")
    backbone = model.backbone
    if include_backbone is None:
        include_backbone = not _backbone_is_pristine(backbone)
    try:
        with atomic_directory(path) as tmp:
            files = {}
            torch.save(model.heads_state_dict(), tmp / "heads.pt")
            files["heads.pt"] = sha256_file(tmp / "heads.pt")
            trunk_state = backbone.trunk.state_dict()
            identity = backbone.identity() | {"weights_sha256": state_dict_sha256(trunk_state)}
            if include_backbone:
                torch.save(trunk_state, tmp / "backbone.pt")
                files["backbone.pt"] = sha256_file(tmp / "backbone.pt")
            manifest = {
                "format": BUNDLE_FORMAT,
                "version": version,
                "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "schema": model.schema.to_dict(),
                "backbone": identity,
                "input_size": list(backbone.input_size),
                "preprocessing": model.preprocessing_contract().to_dict(),
                "backbone_included": include_backbone,
                "training": training or {},
                "files": files,
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    except OSError as exc:
        raise BundleError(
            f"cannot write bundle {path}: {exc.strerror}", "free disk space or choose a writable directory"
        ) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def read_bundle_info(path: str | Path) -> BundleInfo:
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        raise BundleError(
            f"{path} is not a model bundle (no {MANIFEST})",
            "pass a directory written by `surgenet-assist demo`/training, or a registry version",
        )
    try:
        data = json.loads(manifest_path.read_text())
        if data.get("format") != BUNDLE_FORMAT:
            raise BundleError(
                f"bundle {path} has format {data.get('format')}, expected {BUNDLE_FORMAT}",
                "re-export it with this version of surgenet-assist",
            )
        info = BundleInfo(
            version=str(data["version"]),
            schema=LabelSchema.from_dict(data["schema"]),
            backbone=dict(data["backbone"]),
            input_size=tuple(data["input_size"]),
            created_at=data["created_at"],
            backbone_included=bool(data["backbone_included"]),
            training=data.get("training", {}),
            files=data.get("files", {}),
            path=path,
        )
        if data.get("preprocessing"):
            info.preprocessing = Preprocessing.from_dict(data["preprocessing"])
        else:
            info.preprocessing = legacy_preprocessing(info)
        return info
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise BundleError(
            f"bundle manifest {manifest_path} is malformed: {exc!r}", "re-create the bundle"
        ) from None


def legacy_preprocessing(info: BundleInfo) -> Preprocessing:
    """The contract of a bundle written before bundles recorded one: what serving did then."""
    return Preprocessing(
        short_side=int(min(info.input_size)),
        mean=info.mean,
        std=info.std,
        frame_size=None,
        temporal_fps=1.0,
        interpolation="auto",
        source="legacy",
    )


def load_bundle(
    path: str | Path, allow_download: bool = True, backbone_weights: str | Path | None = None
) -> tuple[SurgeNetAssistModel, BundleInfo]:
    """Load a bundle; verifies file hashes and the backbone's content hash."""
    info = read_bundle_info(path)
    path = Path(path)
    for name, digest in info.files.items():
        if not (path / name).exists():
            raise BundleError(f"bundle {path} lacks {name}", "copy the whole bundle directory")
        if sha256_file(path / name) != digest:
            raise BundleError(f"{path / name} does not match its recorded SHA-256", "the bundle is corrupt")
    name = info.backbone["name"]
    if info.backbone_included:
        backbone = load_backbone(name, random_init=True)
        backbone.load_weights(read_checkpoint(path / "backbone.pt"), source=f"bundle {info.version}")
        backbone.weights_origin = info.backbone.get("weights_origin", "bundle")
    else:
        backbone = load_backbone(name, weights=backbone_weights, allow_download=allow_download)
    if backbone.weights_sha256 != info.backbone["weights_sha256"]:
        raise WeightsError(
            f"backbone weights for bundle {info.version} have hash {backbone.weights_sha256[:12]}, "
            f"the bundle was trained on {info.backbone['weights_sha256'][:12]}",
            f"use the {name} weights the bundle was trained with",
        )
    backbone.mean, backbone.std = info.mean, info.std
    backbone.input_size = info.input_size
    model = SurgeNetAssistModel(backbone, info.schema)
    model.preprocessing = info.preprocessing
    heads = read_checkpoint(path / "heads.pt")
    result = model.load_state_dict(heads, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("backbone.")]
    if missing or result.unexpected_keys:
        raise BundleError(
            f"bundle {path} head weights do not fit: missing {missing[:6]}, "
            f"unexpected {result.unexpected_keys[:6]}",
            "the bundle was written by an incompatible version",
        )
    model.eval()
    return model, info
