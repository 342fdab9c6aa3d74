"""PACL weights: one safetensors file with the trained tensors and metadata (DESIGN §6).

The file holds only what PACL trains (``embedder.*``, ``log_logit_scale``,
``log_patch_logit_scale``); the CLIP stays open_clip's. Metadata names the CLIP the weights were
trained on, and loading refuses a file whose tensors or CLIP pairing do not fit, naming what is
wrong. Nothing is ever unpickled.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from pacl_fast.backbone import ClipBackbone, ClipIdentity
from pacl_fast.files import atomic_write
from pacl_fast.model import PACL, PACLConfig

FORMAT = "pacl-fast/pacl-weights"
FORMAT_VERSION = 1
_DTYPE_NAMES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


@dataclass
class PACLMetadata:
    """What travels with PACL weights (all strings in the safetensors header)."""

    clip_model: str  # open_clip name, or custom-<config hash>
    clip_weights: str  # pretrained tag, sha256:<hex> of the weights file, or "random"
    config: dict  # PACLConfig fields
    image_size: int
    patch_size: int
    training_data: str = "unknown"
    steps: int = 0
    date: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    clip_config: dict | None = None  # the open_clip model_cfg, so custom CLIPs can be rebuilt
    extra: dict = field(default_factory=dict)

    @property
    def clip_identity(self) -> ClipIdentity:
        return ClipIdentity(self.clip_model, self.clip_weights)

    def to_header(self) -> dict[str, str]:
        header = {"format": FORMAT, "format_version": str(FORMAT_VERSION)}
        for key, value in asdict(self).items():
            header[key] = value if isinstance(value, str) else json.dumps(value)
        return header

    @classmethod
    def from_header(cls, header: dict[str, str], path: Path) -> PACLMetadata:
        if header.get("format") != FORMAT:
            raise ValueError(
                f"{path} is a safetensors file but not PACL weights (metadata format={header.get('format')!r})"
            )
        version = int(header.get("format_version", "0"))
        if version > FORMAT_VERSION:
            raise ValueError(f"{path} has PACL weights format {version}; this pacl-fast reads up to {FORMAT_VERSION}")
        try:
            return cls(
                clip_model=header["clip_model"],
                clip_weights=header["clip_weights"],
                config=json.loads(header["config"]),
                image_size=int(json.loads(header["image_size"])),
                patch_size=int(json.loads(header["patch_size"])),
                training_data=header.get("training_data", "unknown"),
                steps=int(json.loads(header.get("steps", "0"))),
                date=header.get("date", ""),
                clip_config=json.loads(header.get("clip_config", "null")),
                extra=json.loads(header.get("extra", "{}")),
            )
        except (KeyError, ValueError) as error:
            raise ValueError(f"{path}: PACL metadata is incomplete or malformed ({error})") from error


def metadata_for(model: PACL, **fields) -> PACLMetadata:
    """Metadata describing ``model`` (and its CLIP); ``fields`` fill training_data, steps, extra."""
    identity = model.backbone.identity
    return PACLMetadata(
        clip_model=identity.arch,
        clip_weights=identity.weights,
        config=model.config.to_dict(),
        image_size=model.backbone.image_size,
        patch_size=model.backbone.patch_size,
        clip_config=model.backbone.model_cfg if identity.arch.startswith("custom-") else None,
        **fields,
    )


def save_pacl_weights(model: PACL, path: str | os.PathLike, metadata: PACLMetadata | None = None) -> Path:
    """Write ``model``'s trained tensors and metadata atomically (temp file, then rename)."""
    path = Path(path)
    metadata = metadata or metadata_for(model)
    tensors = {name: t.detach().float().cpu().contiguous() for name, t in model.trainable_state_dict().items()}
    return atomic_write(path, save(tensors, metadata=metadata.to_header()))


def read_header(path: str | os.PathLike) -> tuple[dict, int]:
    """The safetensors JSON header of ``path`` and the size of its data section.

    Raises ValueError saying whether the file is not safetensors at all or is truncated.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"PACL weights file not found: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is not a safetensors file ({size} bytes, too short for a header)")
        (header_len,) = struct.unpack("<Q", head)
        first = f.read(1)
        if first != b"{":
            kind = (
                "a zip/PyTorch checkpoint"
                if head[:2] == b"PK"
                else "a pickle"
                if head[:1] == b"\x80"
                else "unknown bytes"
            )
            raise ValueError(f"{path} is not a safetensors file (it starts with {kind}); PACL weights are safetensors")
        if 8 + header_len > size:
            raise ValueError(f"{path} is truncated: its header says {header_len} bytes but the file has {size - 8}")
        raw = first + f.read(header_len - 1)
    try:
        header = json.loads(raw)
    except ValueError as error:
        raise ValueError(f"{path} is not a valid safetensors file (header is not JSON: {error})") from error
    data_len = size - 8 - header_len
    _check_header(header, data_len, path)
    return header, data_len


#: Bytes per element of the safetensors dtypes a header may name.
_ELEMENT_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _check_header(header: object, data_len: int, path: Path) -> None:
    """A safetensors header as the format defines it, or one ValueError naming what is wrong.

    A dict of tensor entries (``dtype``, ``shape``, ``data_offsets``) and an optional
    ``__metadata__`` of strings; each entry's byte range matches its dtype and shape, lies in the
    data section, and the ranges tile the data without overlapping.
    """

    def bad(why: str) -> ValueError:
        return ValueError(f"{path} is not a valid safetensors file: {why}")

    if not isinstance(header, dict):
        raise bad(f"its header is a {type(header).__name__}, not an object")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("__metadata__ must map names to strings")
    ranges = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"tensor {name!r} must have exactly dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in _ELEMENT_BYTES:
            raise bad(f"tensor {name!r} has an unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                                  for n in shape):  # fmt: skip
            raise bad(f"tensor {name!r} has a shape that is not a list of sizes: {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(n, int) and not isinstance(n, bool) for n in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise bad(f"tensor {name!r} has data_offsets {offsets!r}, not [start, end]")
        elements = 1
        for n in shape:
            elements *= n
        if offsets[1] - offsets[0] != elements * _ELEMENT_BYTES[dtype]:
            raise bad(f"tensor {name!r} spans {offsets[1] - offsets[0]} bytes, its {dtype} {shape} needs "
                      f"{elements * _ELEMENT_BYTES[dtype]}")  # fmt: skip
        ranges.append((offsets[0], offsets[1], name))
    end = 0
    for start, stop, name in sorted(ranges):
        if start != end:
            raise bad(f"tensor {name!r} starts at byte {start}, where {end} was expected (overlap or gap)")
        end = stop
    if end > data_len:
        raise ValueError(f"{path} is truncated: tensors need {end} bytes of data, the file has {data_len}")


def expected_shapes(config: PACLConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors a PACL of ``config`` has."""
    d, e, h = config.token_dim, config.embed_dim, config.hidden_dim
    return {
        "embedder.linear.weight": (e, d),
        "embedder.fc1.weight": (h, d),
        "embedder.fc1.bias": (h,),
        "embedder.fc2.weight": (e, h),
        "embedder.fc2.bias": (e,),
        "log_logit_scale": (),
        "log_patch_logit_scale": (),
    }


def read_pacl_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], PACLMetadata]:
    """Read and validate a PACL weights file on its own (no CLIP needed).

    Checks: safetensors and not truncated; PACL metadata; exactly the expected tensor names;
    their shapes for the recorded config; floating dtypes; finite values.
    """
    path = Path(path)
    header, _ = read_header(path)
    metadata = PACLMetadata.from_header(header.get("__metadata__") or {}, path)
    config = PACLConfig(**metadata.config)
    expected = expected_shapes(config)
    present = {k: v for k, v in header.items() if k != "__metadata__"}
    missing = sorted(set(expected) - set(present))
    extra = sorted(set(present) - set(expected))
    if missing or extra:
        raise ValueError(f"{path}: tensor names do not match PACL: missing {missing}, unexpected {extra}")
    for name, shape in expected.items():
        if tuple(present[name]["shape"]) != shape:
            raise ValueError(f"{path}: tensor {name} has shape {tuple(present[name]['shape'])}, expected {shape}")
        if present[name]["dtype"] not in _DTYPE_NAMES:
            raise ValueError(f"{path}: tensor {name} has dtype {present[name]['dtype']}, expected a float type")
    tensors = load_file(str(path))
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(f"{path}: tensor {name} has {bad} NaN/Inf values")
    return tensors, metadata


def check_clip_pairing(metadata: PACLMetadata, identity: ClipIdentity, path: str | os.PathLike) -> None:
    """Refuse weights trained on another CLIP (architecture or weights)."""
    if metadata.clip_model != identity.arch or metadata.clip_weights != identity.weights:
        raise ValueError(
            f"{path} holds PACL weights for CLIP {metadata.clip_identity}, but the loaded CLIP is {identity}. "
            "Open the CLIP they were trained with (clip=..., clip_weights=...), or pass strict_clip=False "
            "if you know the two are the same weights."
        )


def pacl_from_tensors(
    backbone: ClipBackbone,
    tensors: dict[str, torch.Tensor],
    metadata: PACLMetadata,
    path: str | os.PathLike,
    *,
    strict_clip: bool = True,
) -> PACL:
    """A PACL on ``backbone`` from tensors :func:`read_pacl_weights` checked, after checking the CLIP pairing."""
    config = PACLConfig(**metadata.config)
    if (config.token_dim, config.embed_dim) != (backbone.token_dim, backbone.embed_dim):
        raise ValueError(
            f"{path}: weights are for a CLIP with token_dim={config.token_dim}, embed_dim={config.embed_dim}; "
            f"CLIP {backbone.identity.arch} has {backbone.token_dim}, {backbone.embed_dim}"
        )
    if strict_clip:
        check_clip_pairing(metadata, backbone.identity, path)
    model = PACL(backbone, config)
    model.load_trainable_state_dict(tensors)
    return model.to(next(backbone.parameters()).device)


def load_pacl(
    backbone: ClipBackbone, path: str | os.PathLike, *, strict_clip: bool = True
) -> tuple[PACL, PACLMetadata]:
    """A PACL on ``backbone`` with the weights in ``path``, after checking them and the CLIP pairing."""
    tensors, metadata = read_pacl_weights(path)
    return pacl_from_tensors(backbone, tensors, metadata, path, strict_clip=strict_clip), metadata
