"""A model's defaults, resolved once when it is built: what every door uses when the user names nothing.

DESIGN §3, "One default, every door": ``Segmenter.predict``, ``pacl-fast segment``, ``eval``, ``serve``
and its page all read :class:`ModelDefaults` from ``Segmenter.defaults``, so the same image and labels
get the same labels through each of them. Where each value comes from, the first that applies:

1. **The PACL weights' metadata**, when it records them: ``PACLMetadata.extra["defaults"]``, a JSON
   object with any of ``templates`` (a preset of :data:`~pacl_fast.choices.TEMPLATE_PRESETS`, or a list
   of templates), ``background_threshold`` (a probability; 0: none), ``image_size`` (pixels) and
   ``sliding_window`` (``[crop, stride]`` or ``[crop, stride, short side]``). ``train/`` records the
   defaults of the data it trained on (:func:`training_defaults`); :func:`record_defaults` adds measured
   ones to a file (the demo weights' threshold, below). A file is hostile until checked: every entry is
   checked when the weights are read, before the CLIP loads, and a bad one is a ValueError naming the file.
2. **Derived** from what the weights were trained on: weights trained on the synthetic world (their
   ``training_data`` says so, as older files do) get the ``synthetic`` templates.
3. **The method's**: CLIP's 80 ImageNet templates, no background threshold, the CLIP's native input
   size, no sliding window (the training-free methods, and PACL weights that record nothing).

The logit scale is always the model's own (PACL's trained one; CLIP's for the training-free methods),
read here once: the model is frozen, and reading it from a GPU every batch is a host-device sync.

**The demo model's background threshold** (:data:`DEMO_BACKGROUND_THRESHOLD`, recorded in
``pacl_fast/assets/demo/pacl.safetensors``). Without one its page painted every background pixel as
a shape. Measured on 200 held-out scenes (``render_scene(i, seed=1)``, i < 200: 611,339 background and
207,861 shape pixels), ``predict(..., templates="synthetic", background_threshold=0.0)`` with the
default encoder here (torch bf16 on a 2-core Xeon with AMX; torch fp32 within 0.2 points in the first
two columns), the threshold then applied to the winner scores: the scores' quantiles 10/25/50/75/90 % are
0.43/0.54/0.75/0.92/0.99 on background pixels and 0.74/0.95/0.997/1.0/1.0 on the shapes'. By
threshold: background pixels sent to background; shape pixels kept with the right class; the mean of
those two; mIoU over the 6 shapes with background as a 7th class:

=========  ===========  ================  =======  ========
threshold  background   shapes, right     mean     mIoU (7)
=========  ===========  ================  =======  ========
none       0 %          88.9 %            44.5 %   0.190
0.8        56.6 %       82.2 %            69.4 %   0.390
0.9        71.1 %       77.7 %            74.4 %   0.460
0.95       80.5 %       73.0 %            76.8 %   0.506
0.98       88.0 %       66.2 %            77.1 %   0.530
=========  ===========  ================  =======  ========

0.95 is chosen: the mean of the two shares is flat from 0.95 to 0.98 (background is 75 % of the
pixels, so mIoU keeps rising a little, to 0.530 at 0.98 and 0.529 at 0.99), and 0.95 keeps 7 points
more of the shapes than 0.98. ``background_threshold=0.0`` turns it off.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pacl_fast.choices import TEMPLATE_PRESETS
from pacl_fast.images import SlidingWindow

if TYPE_CHECKING:
    from torch import nn

    from pacl_fast.weights import PACLMetadata

#: The entry of ``PACLMetadata.extra`` that holds the defaults PACL weights record.
ENTRY = "defaults"
#: What that entry may hold.
RECORDABLE: tuple[str, ...] = ("templates", "background_threshold", "image_size", "sliding_window")
#: How ``train/`` names the synthetic world in ``PACLMetadata.training_data`` ("synthetic world seed 0").
SYNTHETIC_TRAINING_DATA = "synthetic world"
#: The demo model's background threshold (measured: the module docstring).
DEMO_BACKGROUND_THRESHOLD = 0.95
#: Bounds on what a weights file may record (a larger value is a hostile or broken file, not a model's default).
MAX_TEMPLATES = 1000
MAX_TEMPLATE_CHARS = 1000
MAX_SIDE = 1 << 14


@dataclass(frozen=True)
class ModelDefaults:
    """What a model uses when a user names nothing (see the module docstring for where each comes from).

    Attributes:
        templates: a preset name of :data:`~pacl_fast.choices.TEMPLATE_PRESETS`, or the templates.
        logit_scale: the scale turning cosines into softmax logits (scores and the background threshold).
        image_size: the short side the model sees.
        background_threshold: pixels whose winner probability is under it are background; None: none.
        sliding_window: windows to average over, or None (the whole image at ``image_size``).
        source: where they come from, in words (``repr``, ``/v1/info``).
    """

    templates: str | tuple[str, ...]
    logit_scale: float
    image_size: int
    background_threshold: float | None = None
    sliding_window: SlidingWindow | None = None
    source: str = "the method's"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, as ``/v1/info`` shows them."""
        window = self.sliding_window
        return {
            "templates": self.templates if isinstance(self.templates, str) else list(self.templates),
            "background_threshold": self.background_threshold,
            "image_size": self.image_size,
            "sliding_window": None if window is None else [window.crop, window.stride, window.short_side],
            "logit_scale": self.logit_scale,
            "source": self.source,
        }

    def describe(self) -> str:
        """The defaults that change answers, short: ``templates=synthetic, background_threshold=0.95``."""
        templates = self.templates if isinstance(self.templates, str) else f"{len(self.templates)} templates"
        words = [f"templates={templates}"]
        if self.background_threshold is not None:
            words.append(f"background_threshold={self.background_threshold:g}")
        if self.sliding_window is not None:
            w = self.sliding_window
            words.append(f"sliding_window={w.crop},{w.stride}" + (f",{w.short_side}" if w.short_side else ""))
        return ", ".join(words)


def training_defaults(data: str) -> dict[str, Any]:
    """What ``train/`` records as the defaults of PACL weights trained on ``data`` (its ``--data`` kind)."""
    return {"templates": "synthetic"} if data == "synthetic" else {}


# ------------------------------------------------------------------------------ reading a weights file


def _probability(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"must be a probability in [0, 1] or null, got {value!r}")
    return float(value) or None  # 0: no threshold


def _side(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SIDE:
        raise ValueError(f"must be a number of pixels in 1..{MAX_SIDE}, got {value!r}")
    return value


def _window(value: object) -> SlidingWindow | None:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) not in (2, 3):
        raise ValueError(f"must be [crop, stride] or [crop, stride, short side] in pixels, or null, got {value!r}")
    return SlidingWindow(*(_side(v) for v in value))


def _templates(value: object) -> str | tuple[str, ...]:
    if isinstance(value, str):
        if value not in TEMPLATE_PRESETS:
            raise ValueError(f"must be one of {', '.join(TEMPLATE_PRESETS)} or a list of templates, got {value!r}")
        return value
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_TEMPLATES:
        raise ValueError(f"must be a preset name or a list of 1..{MAX_TEMPLATES} templates, got {str(value)[:80]!r}")
    if not all(isinstance(t, str) and len(t) <= MAX_TEMPLATE_CHARS for t in value):
        raise ValueError(f"must hold templates of at most {MAX_TEMPLATE_CHARS} characters each")
    from pacl_fast.prompts import template_set

    return template_set(value)  # each with one {} that formats a label


_CHECKS = {"templates": _templates, "background_threshold": _probability, "image_size": _side,
           "sliding_window": _window}  # fmt: skip


def recorded_defaults(metadata: PACLMetadata | None, path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The defaults PACL weights record (``metadata.extra["defaults"]``), each checked and converted
    (``sliding_window`` -> :class:`~pacl_fast.images.SlidingWindow`, a threshold of 0 -> None); {} when
    none. ValueError naming the file and the entry for anything else."""
    if metadata is None or ENTRY not in metadata.extra:
        return {}
    where = f"{path}: " if path is not None else ""
    entry = metadata.extra[ENTRY]
    if not isinstance(entry, dict):
        raise ValueError(f"{where}PACL metadata extra.{ENTRY} must be a JSON object, got {str(entry)[:80]!r}")
    unknown = sorted(set(entry) - set(RECORDABLE))
    if unknown:
        raise ValueError(f"{where}PACL metadata extra.{ENTRY} has unknown entries {unknown}; known: {RECORDABLE}")
    checked = {}
    for name, value in entry.items():
        try:
            checked[name] = _CHECKS[name](value)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{where}PACL metadata extra.{ENTRY}.{name} {error}") from None
    return checked


def resolve_defaults(
    model: nn.Module, metadata: PACLMetadata | None = None, path: str | os.PathLike | None = None
) -> ModelDefaults:
    """The defaults of ``model`` (a PACL or training-free model), from its weights' ``metadata`` (read
    from ``path``) when given: see the module docstring. Reads the logit scale once."""
    backbone = model.backbone
    recorded = recorded_defaults(metadata, path)
    sources = []
    if recorded:
        sources.append(f"weights' metadata ({', '.join(recorded)})")
    templates = recorded.get("templates")
    if templates is None:
        templates = "imagenet"
        if metadata is not None and metadata.training_data.startswith(SYNTHETIC_TRAINING_DATA):
            templates = "synthetic"
            sources.append("synthetic templates: trained on the synthetic world")
    image_size = recorded.get("image_size", backbone.image_size)
    if image_size < backbone.patch_size:
        raise ValueError(f"{path}: PACL metadata extra.{ENTRY}.image_size {image_size} is under the patch size")
    window = recorded.get("sliding_window")
    if window is not None:
        window.origins((window.crop, window.crop), backbone.patch_size)  # multiples of the patch size
    return ModelDefaults(
        templates=templates,
        logit_scale=float(model.logit_scale.detach().float()),  # once: the model is frozen
        image_size=image_size,
        background_threshold=recorded.get("background_threshold"),
        sliding_window=window,
        source="; ".join(sources) or f"the method's ({model.method})",
    )


def record_defaults(path: str | os.PathLike, **values: Any) -> Path:
    """Record ``values`` (entries of :data:`RECORDABLE`, as JSON values) in the defaults of the PACL weights
    at ``path``, keeping every tensor as it is; checked as they will be read. For measured defaults, e.g.
    ``record_defaults("pacl.safetensors", background_threshold=0.95)`` (``train/make_demo_weights.sh``)."""
    from safetensors.torch import save

    from pacl_fast.files import atomic_write
    from pacl_fast.weights import read_pacl_weights

    tensors, metadata = read_pacl_weights(path)
    metadata.extra = {**metadata.extra, ENTRY: {**metadata.extra.get(ENTRY, {}), **values}}
    recorded_defaults(metadata, path)
    return atomic_write(Path(path), save(tensors, metadata=metadata.to_header()))
