"""PACL weights: one safetensors file with the trained tensors and metadata (DESIGN §6).

The file holds only what PACL trains (``embedder.*``, ``log_logit_scale``,
``log_patch_logit_scale``); the CLIP stays open_clip's. Metadata names the CLIP the weights were
trained on, and loading refuses a file whose tensors, metadata or CLIP pairing do not fit, naming
what is wrong. Nothing is ever unpickled; only a regular file is opened (a FIFO would block the
reader forever), read once, and parsed from those bytes; non-finite tensors are never written.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load, save

from pacl_fast.backbone import ClipBackbone, ClipIdentity
from pacl_fast.files import FileTooLargeError, atomic_write, read_regular_bytes
from pacl_fast.model import PACL, PACLConfig

FORMAT = "pacl-fast/pacl-weights"
FORMAT_VERSION = 1
_DTYPE_NAMES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
#: Largest PACL weights file read (ViT-bigG-14's embedder is ~25 MB in fp32): a bigger file is not PACL's.
MAX_WEIGHTS_BYTES = 1 << 30
#: Largest image_size / patch_size a PACL metadata header may state.
MAX_PIXELS_PER_SIDE = 1 << 16
#: Largest width a PACL metadata config may state (ViT-bigG's tokens are 1664 wide).
MAX_WIDTH = 1 << 16


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
        """The metadata of ``header``, every field checked: one ValueError naming the first bad field."""
        if header.get("format") != FORMAT:
            raise ValueError(
                f"{path} is a safetensors file but not PACL weights (metadata format={header.get('format')!r})"
            )
        field_of = _MetadataFields(header, path)
        version = field_of.integer("format_version", default=0, low=0)
        if version > FORMAT_VERSION:
            raise ValueError(f"{path} has PACL weights format {version}; this pacl-fast reads up to {FORMAT_VERSION}")
        return cls(
            clip_model=field_of.text("clip_model"),
            clip_weights=field_of.text("clip_weights"),
            config=field_of.json("config", dict),
            image_size=field_of.integer("image_size", low=1, high=MAX_PIXELS_PER_SIDE),
            patch_size=field_of.integer("patch_size", low=1, high=MAX_PIXELS_PER_SIDE),
            training_data=field_of.text("training_data", "unknown"),
            steps=field_of.integer("steps", default=0, low=0),
            date=field_of.text("date", ""),
            clip_config=field_of.json("clip_config", dict, default=None),
            extra=field_of.json("extra", dict, default={}),
        )


_REQUIRED = object()


class _MetadataFields:
    """Typed reads of a PACL header's string fields; each failure is a ValueError naming the file and field."""

    def __init__(self, header: dict[str, str], path: Path):
        self.header, self.path = header, path

    def _fail(self, name: str, why: str) -> ValueError:
        return ValueError(f"{self.path}: PACL metadata field {name!r} {why}")

    def text(self, name: str, default: object = _REQUIRED) -> str:
        if name not in self.header:
            if default is _REQUIRED:
                raise self._fail(name, "is missing")
            return default  # type: ignore[return-value]
        return self.header[name]

    def json(self, name: str, kind: type, default: object = _REQUIRED) -> object:
        if name not in self.header:
            if default is _REQUIRED:
                raise self._fail(name, "is missing")
            return default
        raw = self.header[name]
        try:
            value = json.loads(raw)
        except (ValueError, RecursionError):
            raise self._fail(name, f"is not JSON: {raw[:60]!r}") from None
        if value is None and default is None:
            return None
        if not isinstance(value, kind):
            raise self._fail(name, f"must be a JSON {kind.__name__}, got {raw[:60]!r}")
        return value

    def integer(self, name: str, *, default: object = _REQUIRED, low: int, high: int | None = None) -> int:
        value = self.json(name, object, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
            bounds = f"{low}..{high}" if high is not None else f">= {low}"
            raise self._fail(name, f"must be an integer {bounds}, got {self.header.get(name, '')[:60]!r}")
        return value


def pacl_config_from_metadata(config: dict, path: str | os.PathLike) -> PACLConfig:
    """The :class:`PACLConfig` a header's ``config`` field describes, each value of its type and range."""
    known = {f.name: f for f in dataclasses.fields(PACLConfig)}
    unknown = sorted(set(config) - set(known))
    if unknown:
        raise ValueError(f"{path}: PACL metadata config has unknown fields {unknown}")
    for name, value in config.items():
        kind = known[name].type
        if name in ("token_dim", "embed_dim", "hidden_dim"):
            fine = (value is None and name == "hidden_dim") or (
                isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_WIDTH
            )
        elif name in ("patch_temperature", "logit_scale"):
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            fine = number and 0 < value < math.inf  # a comparison, never float(): 10**400 must not overflow
        else:
            fine = isinstance(value, bool)
        if not fine:
            raise ValueError(f"{path}: PACL metadata config field {name!r} is {value!r}, expected {kind}")
    try:
        return PACLConfig(**config)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: PACL metadata config does not describe a PACL ({error})") from None


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


def nonfinite_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """``{name: count}`` of the floating tensors holding NaN or Inf values (empty: all finite).

    One host synchronisation for all of them: a check made before every checkpoint and export.
    """
    floats = {name: t.detach() for name, t in tensors.items() if t.is_floating_point() or t.is_complex()}
    if not floats:
        return {}
    device = next(iter(floats.values())).device
    finite = torch.stack([torch.isfinite(t).all().to(device) for t in floats.values()]).tolist()
    return {name: int((~torch.isfinite(t)).sum()) for (name, t), ok in zip(floats.items(), finite) if not ok}


def save_pacl_weights(model: PACL, path: str | os.PathLike, metadata: PACLMetadata | None = None) -> Path:
    """Write ``model``'s trained tensors and metadata atomically (temp file, then rename).

    ValueError, and nothing written, if a tensor holds NaN or Inf values (a diverged run): such a
    file would only be refused when loaded.
    """
    path = Path(path)
    metadata = metadata or metadata_for(model)
    tensors = {name: t.detach().float().cpu().contiguous() for name, t in model.trainable_state_dict().items()}
    bad = nonfinite_tensors(tensors)
    if bad:
        listed = ", ".join(f"{name} ({count})" for name, count in sorted(bad.items()))
        raise ValueError(f"not writing PACL weights to {path}: NaN/Inf values in {listed}")
    return atomic_write(path, save(tensors, metadata=metadata.to_header()))


def read_weights_bytes(path: str | os.PathLike, max_bytes: int = MAX_WEIGHTS_BYTES) -> bytes:
    """The bytes of a weights file: FileNotFoundError, NotARegularFileError (a FIFO, a folder...) or
    ValueError (over ``max_bytes``) naming ``path``; read from one descriptor, so what is checked is
    what is parsed."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"PACL weights file not found: {path}")
    try:
        return read_regular_bytes(path, max_bytes)
    except FileTooLargeError as error:
        raise ValueError(f"{path} is {error.size} bytes, over the {max_bytes} a PACL weights file may have") from None


def parse_header(data: bytes, path: str | os.PathLike) -> tuple[dict, int]:
    """The safetensors JSON header of a file's ``data`` and the size of its data section.

    Raises ValueError saying whether the file is not safetensors at all or is truncated.
    """
    size = len(data)
    if size < 8:
        raise ValueError(f"{path} is not a safetensors file ({size} bytes, too short for a header)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if data[8:9] != b"{":
        kind = "a zip/PyTorch checkpoint" if data[:2] == b"PK" else "unknown bytes"
        kind = "a pickle" if data[:1] == b"\x80" else kind
        raise ValueError(f"{path} is not a safetensors file (it starts with {kind}); PACL weights are safetensors")
    if 8 + header_len > size:
        raise ValueError(f"{path} is truncated: its header says {header_len} bytes but the file has {size - 8}")
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (ValueError, RecursionError) as error:
        raise ValueError(f"{path} is not a valid safetensors file (header is not JSON: {error})") from None
    data_len = size - 8 - header_len
    _check_header(header, data_len, path)
    return header, data_len


def read_header(path: str | os.PathLike) -> tuple[dict, int]:
    """The safetensors JSON header of the file ``path`` and the size of its data section (see :func:`parse_header`)."""
    return parse_header(read_weights_bytes(path), Path(path))


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
    data = read_weights_bytes(path)
    header, _ = parse_header(data, path)
    metadata = PACLMetadata.from_header(header.get("__metadata__") or {}, path)
    config = pacl_config_from_metadata(metadata.config, path)
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
    tensors = load(data)
    bad = nonfinite_tensors(tensors)
    if bad:
        name = min(bad)
        raise ValueError(f"{path}: tensor {name} has {bad[name]} NaN/Inf values")
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
    config = pacl_config_from_metadata(metadata.config, path)
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
