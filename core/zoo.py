"""Registry of released SurgeNet backbones, timm style: pretrained-weight metadata kept with the model name.

Every entry says where the weights come from (URL, file name, SHA-256 as far as it is known), how inputs
must be normalised, the default input size and the licence. ``surgenet-assist weights list`` prints it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .errors import WeightsError

HF_CNN = "https://huggingface.co/TimJaspersTue/SurgeNetModels/resolve/main/{file}?download=true"

#: Mean/std of the SurgeNetXL pretraining corpus (stored in the DINO checkpoint's ``args``).
SURGICAL_MEAN = (0.46888983, 0.29536288, 0.28712815)
SURGICAL_STD = (0.24689102, 0.21034359, 0.21188641)

LICENCE = (
    "SurgeNet weights are licensed CC BY-NC-SA 4.0 (non-commercial, share-alike); "
    "models fine-tuned from them are derivatives under the same licence. "
    "See https://github.com/TimJaspers0801/SurgeNet/blob/main/LICENSE_MODELS.txt"
)


@dataclass(frozen=True)
class PretrainedSpec:
    """Where a backbone's weights live and how to feed it."""

    name: str
    arch: str  # one of ARCHITECTURES
    file_name: str
    pretraining_data: str
    num_frames: int | None = None
    sha256: str | None = None  # full digest, when published
    sha256_prefix: str | None = None  # partial digest (first/last hex digits) when only that is published
    sha256_suffix: str | None = None
    mean: tuple[float, float, float] = SURGICAL_MEAN
    std: tuple[float, float, float] = SURGICAL_STD
    input_size: tuple[int, int] = (256, 448)  # (H, W) for a 16:9 frame; the short side is what matters
    licence: str = LICENCE
    full_checkpoint: str | None = None  # the DINO checkpoint with student/teacher/args

    @property
    def url(self) -> str:
        return HF_CNN.format(file=self.file_name)

    def to_dict(self) -> dict:
        return asdict(self) | {"url": self.url}


#: Architecture name -> (stage channels, stage reductions).
ARCHITECTURES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "caformer_s18": ((64, 128, 320, 512), (4, 8, 16, 32)),
    "convnextv2_tiny": ((96, 192, 384, 768), (4, 8, 16, 32)),
    "pvt_v2_b2": ((64, 128, 320, 512), (4, 8, 16, 32)),
}

_ENTRIES = [
    PretrainedSpec(
        "surgenetxl",
        "caformer_s18",
        "SurgeNetXL_checkpoint_epoch0050_teacher.pth",
        "SurgeNetXL: 4.7 M frames, 23 procedures incl. curated surgical YouTube",
        4_711_024,
        sha256_prefix="bd2709b0",
        sha256_suffix="47ffff8",
        full_checkpoint="SurgeNetXL_checkpoint0050.pth",
    ),
    PretrainedSpec(
        "surgenet",
        "caformer_s18",
        "SurgeNet_checkpoint_epoch0050_teacher.pth",
        "SurgeNet: all public and private sets except YouTube",
        2_636_790,
        full_checkpoint="SurgeNet_checkpoint0050.pth",
    ),
    PretrainedSpec(
        "surgenet-small",
        "caformer_s18",
        "SurgeNetSmall_checkpoint_epoch0050_teacher.pth",
        "10% of SurgeNet",
        263_679,
        full_checkpoint="SurgeNetSmall_checkpoint0050.pth",
    ),
    PretrainedSpec(
        "surgenet-cholec",
        "caformer_s18",
        "CHOLEC_checkpoint_epoch0050_teacher.pth",
        "Cholec80 + HeiChole + hSDB-Chole (cholecystectomy)",
        250_655,
        full_checkpoint="CHOLEC_checkpoint0050.pth",
    ),
    PretrainedSpec(
        "surgenet-ramie",
        "caformer_s18",
        "RAMIE_checkpoint_epoch0050_teacher.pth",
        "RAMIE-UMCU (robot-assisted esophagectomy)",
        377_287,
        full_checkpoint="RAMIE_checkpoint0050.pth",
    ),
    PretrainedSpec(
        "surgenet-rarp",
        "caformer_s18",
        "RARP_checkpoint_epoch0050_teacher.pth",
        "ESAD + PSI-AVA + RARP-AvL (prostatectomy)",
        382_416,
        full_checkpoint="RARP_checkpoint0050.pth",
    ),
    PretrainedSpec(
        "surgenet-public",
        "caformer_s18",
        "Public_checkpoint_epoch0050_teacher.pth",
        "public datasets only",
        1_997_987,
        full_checkpoint="Public_checkpoint0050.pth",
    ),
    PretrainedSpec(
        "surgenet-convnextv2",
        "convnextv2_tiny",
        "SurgeNet_ConvNextv2_checkpoint_epoch0050_teacher.pth",
        "SurgeNet (ConvNeXtV2-Tiny backbone)",
        2_636_790,
        full_checkpoint="SurgeNet_ConvNextv2_checkpoint0050.pth",
    ),
    PretrainedSpec(
        "surgenet-pvtv2",
        "pvt_v2_b2",
        "SurgeNet_PVTv2_checkpoint_epoch0050_teacher.pth",
        "SurgeNet (PVTv2-B2 backbone)",
        2_636_790,
        full_checkpoint="SurgeNet_PVTv2_checkpoint0050.pth",
    ),
]

REGISTRY: dict[str, PretrainedSpec] = {spec.name: spec for spec in _ENTRIES}
DEFAULT_BACKBONE = "surgenetxl"


def _key(name: str) -> str:
    return name.lower().replace("_", "-").replace(" ", "-")


_ALIASES = {_key(s.name).replace("-", ""): s.name for s in _ENTRIES}


def list_backbones() -> list[PretrainedSpec]:
    return list(REGISTRY.values())


def get_spec(name: str) -> PretrainedSpec:
    """Look a backbone up by name; case, dashes and underscores don't matter."""
    key = _key(name)
    if key in REGISTRY:
        return REGISTRY[key]
    if key.replace("-", "") in _ALIASES:
        return REGISTRY[_ALIASES[key.replace("-", "")]]
    raise WeightsError(
        f"unknown backbone {name!r}",
        f"choose one of {sorted(REGISTRY)} (see `surgenet-assist weights list`)",
    )
