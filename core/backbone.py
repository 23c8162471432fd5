"""SurgeNet backbones built from timm modules and loaded strictly.

SurgeNet's CaFormer-S18 differs from timm's ``caformer_s18``: its SepConv and MLP use plain ReLU, not
StarReLU. Loading SurgeNet weights into stock timm silently computes the wrong function, so we build
timm's ``MetaFormer`` with ReLU and check that every key matches (no silent ``strict=False``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn as nn
from timm.models import convnext, metaformer, pvt_v2
from timm.models.metaformer import Attention, LayerNorm2dNoBias, LayerNormNoBias, MetaFormer, SepConv

from .errors import WeightsError
from .weights import ensure_weights, extract_backbone_state, read_checkpoint, sha256_file
from .zoo import ARCHITECTURES, DEFAULT_BACKBONE, PretrainedSpec, get_spec


class ReluSepConv(SepConv):
    """timm's SepConv with SurgeNet's ReLU. A subclass, not a partial: timm checks ``issubclass``."""

    def __init__(self, dim: int, **kwargs: Any) -> None:
        kwargs.pop("act1_layer", None)
        super().__init__(dim, act1_layer=nn.ReLU, **kwargs)


def build_trunk(arch: str) -> nn.Module:
    """The bare timm network for an architecture, without classifier."""
    if arch == "caformer_s18":
        return MetaFormer(
            depths=(3, 3, 9, 3),
            dims=(64, 128, 320, 512),
            token_mixers=[ReluSepConv, ReluSepConv, Attention, Attention],
            mlp_act=nn.ReLU,
            norm_layers=[LayerNorm2dNoBias] * 2 + [LayerNormNoBias] * 2,
            num_classes=0,
        )
    if arch in ("convnextv2_tiny", "pvt_v2_b2"):
        return timm.create_model(arch, pretrained=False, num_classes=0)
    raise WeightsError(f"unknown architecture {arch!r}", f"use one of {sorted(ARCHITECTURES)}")


_FILTERS = {
    "caformer_s18": (metaformer.checkpoint_filter_fn, "stem.conv.weight"),
    "convnextv2_tiny": (convnext.checkpoint_filter_fn, "stem.0.weight"),
    "pvt_v2_b2": (pvt_v2.checkpoint_filter_fn, "patch_embed.proj.weight"),
}


def remap_state_dict(
    arch: str, state: Mapping[str, torch.Tensor], trunk: nn.Module
) -> dict[str, torch.Tensor]:
    """Rename original (sail-sg / FB / PVT) keys to timm's; keys already in timm layout pass through.

    Keys the model does not know are kept under their original name so the strict check reports them.
    """
    filter_fn, timm_marker = _FILTERS[arch]
    state = {k: v for k, v in state.items() if not (k.startswith("head.") and not k.startswith("head.norm"))}
    if timm_marker in state:
        return dict(state)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():  # one key at a time so an unknown key is reported, not a KeyError
        try:
            out.update(filter_fn({key: value}, trunk))
        except (KeyError, RuntimeError):  # unknown key, or a reshape that cannot fit: report it
            out[key] = value
    return out


def state_dict_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """Content hash of a state dict (names, shapes, dtypes, values), independent of file format."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu()
        flat = tensor.reshape(-1)  # logical order: channels_last and contiguous copies hash alike
        digest.update(f"{key}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


class SurgeNetBackbone(nn.Module):
    """A SurgeNet feature extractor: ``forward(x)`` gives the four stage maps (strides 4/8/16/32).

    Attributes: ``channels`` and ``reductions`` per stage, ``mean``/``std`` for input normalisation,
    ``input_size``, ``name`` (zoo entry) and ``weights_sha256`` (content hash of the loaded weights).
    """

    def __init__(self, spec: PretrainedSpec, trunk: nn.Module | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.name = spec.name
        self.arch = spec.arch
        self.trunk = trunk if trunk is not None else build_trunk(spec.arch)
        channels, reductions = ARCHITECTURES[spec.arch]
        self.channels: tuple[int, ...] = channels
        self.reductions: tuple[int, ...] = reductions
        self.embed_dim: int = channels[-1]
        self.mean: tuple[float, ...] = tuple(spec.mean)
        self.std: tuple[float, ...] = tuple(spec.std)
        self.input_size: tuple[int, int] = tuple(spec.input_size)
        self.weights_sha256: str | None = None
        self.weights_source: str = "random-init"
        self.weights_origin: str = "random-init"  # random-init | zoo | file | state_dict | bundle

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.trunk.forward_intermediates(x, intermediates_only=True)

    def pool(self, last_stage: torch.Tensor) -> torch.Tensor:
        """Global average of the last stage through the pretrained output norm: the frame embedding."""
        return self.trunk.forward_head(last_stage, pre_logits=True)

    def load_weights(self, state: Mapping[str, torch.Tensor], source: str = "state_dict") -> None:
        """Load strictly: any missing, unexpected or mis-shaped key is an error listing them."""
        mapped = remap_state_dict(self.arch, state, self.trunk)
        own = self.trunk.state_dict()
        missing = sorted(set(own) - set(mapped))
        unexpected = sorted(set(mapped) - set(own))
        mismatched = [
            f"{k}: checkpoint {tuple(mapped[k].shape)} vs model {tuple(own[k].shape)}"
            for k in sorted(set(own) & set(mapped))
            if mapped[k].shape != own[k].shape
        ]
        if missing or unexpected or mismatched:
            raise WeightsError(
                f"weights from {source} do not fit {self.arch}: {len(missing)} missing keys {missing[:8]}, "
                f"{len(unexpected)} unexpected keys {unexpected[:8]}, {len(mismatched)} shape mismatches "
                f"{mismatched[:4]}",
                f"pass a checkpoint of a {self.arch} SurgeNet backbone, or pick the matching backbone name",
            )
        self.trunk.load_state_dict(mapped, strict=True)
        self.weights_sha256 = state_dict_sha256(self.trunk.state_dict())
        self.weights_source = source

    def identity(self) -> dict[str, Any]:
        """What a bundle records about its backbone."""
        return {
            "name": self.name,
            "arch": self.arch,
            "weights_sha256": self.weights_sha256,
            "weights_source": self.weights_source,
            "weights_origin": self.weights_origin,
            "mean": list(self.mean),
            "std": list(self.std),
        }


def load_backbone(
    name: str = DEFAULT_BACKBONE,
    weights: None | str | Path | Mapping[str, torch.Tensor] = None,
    allow_download: bool = True,
    random_init: bool = False,
    progress: bool = True,
) -> SurgeNetBackbone:
    """Build a SurgeNet backbone and load its weights.

    ``weights``: ``None`` takes the zoo's file from the cache (downloading it when allowed); a path reads
    that checkpoint (teacher file, full DINO checkpoint or prefixed state dict); a mapping is used as the
    state dict. ``random_init=True`` skips loading, for tests and demos without weights.
    """
    spec = get_spec(name)
    backbone = SurgeNetBackbone(spec)
    if random_init:
        backbone.weights_sha256 = state_dict_sha256(backbone.trunk.state_dict())
        backbone.eval()
        return backbone
    origin = "file"
    if weights is None:
        weights = ensure_weights(spec, allow_download=allow_download, progress=progress)
        origin = "zoo"
    if isinstance(weights, (str, Path)):
        path = Path(weights)
        state, meta = extract_backbone_state(read_checkpoint(path))
        source = f"{path.name} (sha256 {sha256_file(path)[:12]})"
    else:
        state, meta = extract_backbone_state(weights)
        source = origin = "state_dict"
    backbone.load_weights(state, source=source)
    backbone.weights_origin = origin
    if "mean" in meta and "std" in meta:
        backbone.mean, backbone.std = tuple(meta["mean"]), tuple(meta["std"])
    backbone.eval()
    return backbone


def inspect_checkpoint(path: str | Path, name: str = DEFAULT_BACKBONE) -> dict[str, Any]:
    """What ``weights inspect`` prints: fit against the architecture without raising on a bad fit."""
    spec = get_spec(name)
    path = Path(path)
    state, meta = extract_backbone_state(read_checkpoint(path))
    arch = meta.get("arch") if meta.get("arch") in ARCHITECTURES else spec.arch
    trunk = build_trunk(arch)
    mapped = remap_state_dict(arch, state, trunk)
    own = trunk.state_dict()
    return {
        "file": str(path),
        "sha256": sha256_file(path),
        "architecture": arch,
        "source": meta.get("source", "state_dict"),
        "num_tensors": len(state),
        "num_params": int(sum(v.numel() for v in state.values())),
        "missing_keys": sorted(set(own) - set(mapped)),
        "unexpected_keys": sorted(set(mapped) - set(own)),
        "shape_mismatches": sorted(k for k in set(own) & set(mapped) if own[k].shape != mapped[k].shape),
        "mean": list(meta.get("mean", spec.mean)),
        "std": list(meta.get("std", spec.std)),
    }
