"""Vision foundation models (VFMs): the spatial affinities ProxyCLIP borrows (``pacl_fast.proxyclip``).

A VFM here is a plain ViT (``timm``'s modules, ``pip install "pacl-fast[vfm]"``) run the way its
authors' hub model runs at any input size, returning the last block's tokens after the final
LayerNorm, patch tokens only, ``[B, h, w, C]`` (ProxyCLIP ``proxyclip_segmentor.py`` l. 135-160):

* ``dino_vitb8``: DINO ViT-B/8 (facebookresearch/dino@7c446df ``hubconf.py`` l. 67-79,
  ``vision_transformer.py``): ``get_intermediate_layers(x)[0]`` is ``norm`` of the last block's
  output (l. 225-233), the class token dropped by ProxyCLIP (``feat[:, 1:]``). Positional
  embeddings for another grid: bicubic, ``scale_factor=((h + 0.1) / 28, (w + 0.1) / 28)``, no
  antialiasing, the class token's kept (l. 174-194).
* ``dinov2_vitb14_reg``: DINOv2 ViT-B/14 with 4 registers (facebookresearch/dinov2@b8931f7
  ``dinov2/hub/backbones.py`` l. 113-124: ``interpolate_antialias=True, interpolate_offset=0.0``):
  positional embeddings resized in float32 to ``size=(h, w)``, bicubic with antialiasing
  (``dinov2/models/vision_transformer.py`` l. 180-212), added before the registers are inserted
  after the class token (l. 214-233); ``get_intermediate_layers(x, reshape=True)`` applies ``norm``
  and drops the class token and registers (l. 299-323).

Weights (``vfm_weights``): a local file (safetensors, or a torch checkpoint read with
``weights_only=True``) holding either the authors' hub checkpoint (``dino_vitbase8_pretrain.pth``,
``dinov2_vitb14_reg4_pretrain.pth``: names mapped key by key to timm's, :func:`hub_to_timm`) or
timm's own state dict; a timm hub tag (``"timm"``: timm downloads ``vit_base_patch8_224.dino`` /
``vit_base_patch14_reg4_dinov2.lvd142m``); or None for random initialisation (a warning: tests
and benchmarks only).
"""

from __future__ import annotations

import logging
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pacl_fast.backbone import (
    RandomWeightsWarning,
    build_assigned,
    file_sha256,
    read_safetensors,
    resize_positional_scale_factor,
)
from pacl_fast.choices import VFMS
from pacl_fast.files import open_regular

#: Training checkpoints' wrappers around a backbone's state dict (DINO's ``teacher``...): refused, by name.
WRAPPERS = ("teacher", "student", "model", "state_dict")


@dataclass(frozen=True)
class VFMSpec:
    """How one VFM is built and how its authors' code resizes positional embeddings."""

    timm_name: str
    patch_size: int
    registers: int
    #: ``"dino"``: bicubic with ``scale_factor=(g + 0.1) / g0``, no antialias, class position kept;
    #: ``"dinov2"``: bicubic ``size=g`` with antialias, in float32 (patch positions only).
    positional_resize: str
    hub_file: str

    @property
    def prefix_tokens(self) -> int:
        return 1 + self.registers


SPECS: dict[str, VFMSpec] = {
    "dino_vitb8": VFMSpec("vit_base_patch8_224.dino", 8, 0, "dino", "dino_vitbase8_pretrain.pth"),
    "dinov2_vitb14_reg": VFMSpec(
        "vit_base_patch14_reg4_dinov2.lvd142m", 14, 4, "dinov2", "dinov2_vitb14_reg4_pretrain.pth"
    ),
}
assert tuple(SPECS) == VFMS

logger = logging.getLogger(__name__)


def _require_timm():  # noqa: ANN202 - the module
    try:
        import timm
    except ImportError as error:  # pragma: no cover - timm comes with open_clip
        message = 'ProxyCLIP needs timm for its vision foundation model: pip install "pacl-fast[vfm]"'
        raise ImportError(message) from error
    return timm


def hub_to_timm(state: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The authors' hub checkpoint of ``name`` -> timm's key names, key by key.

    DINO's names are timm's already. DINOv2's differ in three places: ``register_tokens`` is
    timm's ``reg_token``; the class token's positional embedding (``pos_embed[:, 0]``) is folded
    into ``cls_token`` (timm's DINOv2 adds positions to patch tokens only, which is the same sum);
    ``mask_token`` (training only) is dropped.
    """
    state = dict(state)
    if name == "dinov2_vitb14_reg" and "register_tokens" in state:
        state.pop("mask_token", None)
        pos = state.pop("pos_embed")
        state["reg_token"] = state.pop("register_tokens")
        state["cls_token"] = state.pop("cls_token") + pos[:, :1]
        state["pos_embed"] = pos[:, 1:]
        state = {re.sub(r"\.mlp\.w12\.", ".mlp.fc1.", k): v for k, v in state.items()}
        state = {re.sub(r"\.mlp\.w3\.", ".mlp.fc2.", k): v for k, v in state.items()}
    for wrapper in WRAPPERS:
        if wrapper in state and isinstance(state[wrapper], dict):
            raise ValueError(f"VFM weights hold a {wrapper!r} dict: pass the backbone's own state dict")
    return state


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file or a torch checkpoint (``weights_only=True``), never unpickled."""
    if not path.is_file():
        raise FileNotFoundError(f"vfm_weights {path}: no such file")
    if path.suffix == ".safetensors":  # one pass, hashed on the way: the identity's file_sha256 reads nothing again
        try:
            return read_safetensors(path)
        except ValueError as error:
            raise ValueError(f"vfm_weights {path}: not a readable safetensors file ({error})") from None
    with open_regular(path) as f:
        data = f.read()
    import io

    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable checkpoint is the user's file
        message = f"vfm_weights {path}: not a torch checkpoint readable with weights_only=True ({error})"
        raise ValueError(message) from None
    if isinstance(state, dict):
        for wrapper in WRAPPERS:
            if isinstance(state.get(wrapper), dict):
                raise ValueError(f"vfm_weights {path} holds a {wrapper!r} dict: pass the backbone's own state dict")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"vfm_weights {path}: expected a flat dict of tensors")
    return state


class VisionFoundationModel(nn.Module):
    """One frozen VFM: ImageNet-normalised pixels ``[B, 3, H, W]`` -> patch tokens ``[B, H/p, W/p, C]``.

    Runs timm's patch embedding, blocks and final norm, with the positional embeddings resized as
    the VFM's authors resize them (timm's own resize differs: antialiased bicubic ``size=`` for both).
    """

    def __init__(self, name: str, vit: nn.Module, identity: str):
        super().__init__()
        self.name = name
        self.spec = SPECS[name]
        self.vit = vit
        self.identity = identity
        self._pos_cache: dict[tuple[int, int, torch.dtype, torch.device], torch.Tensor] = {}
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> VisionFoundationModel:  # frozen: always in eval mode
        return super().train(False)

    @property
    def patch_size(self) -> int:
        return self.spec.patch_size

    @property
    def width(self) -> int:
        return int(self.vit.embed_dim)

    def positional(self, grid: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        """Positional embeddings for ``grid``: ``[1, 1 + h*w, C]`` (DINO, class first) or ``[1, h*w, C]`` (DINOv2).

        Resized in float32 and cast (the authors resize in their fp16), cached per (grid, dtype, device): a
        constant of the graph that ``torch.compile`` and ONNX export trace (``encoders.graph.ImageTower.prime``
        fills the cache eagerly first; a traced tensor is never cached).
        """
        pos = self.vit.pos_embed  # DINO [1, 1 + g0^2, C]; DINOv2 (timm) [1, g0^2, C]
        key = (grid[0], grid[1], dtype, pos.device)
        cached = self._pos_cache.get(key)
        if cached is not None:
            return cached
        keep = 1 if self.spec.positional_resize == "dino" else 0
        patch_pos = pos.detach()[:, keep:]
        side = math.isqrt(patch_pos.shape[1])
        if (side, side) == tuple(grid):
            resized = pos.detach().to(dtype)
        else:
            square = patch_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()  # [1, C, g0, g0]
            if self.spec.positional_resize == "dino":  # DINO's interpolate_pos_encoding, as the CLIP methods'
                patch_pos = resize_positional_scale_factor(square, tuple(grid))
            else:
                patch_pos = F.interpolate(square, size=grid, mode="bicubic", antialias=True, align_corners=False)
            patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)
            resized = torch.cat([pos.detach()[:, :keep].float(), patch_pos], dim=1).to(dtype)
        if not torch.compiler.is_compiling():  # a traced (fake) tensor must not outlive its trace
            self._pos_cache[key] = resized
        return resized

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module hook: moving or casting drops the cache
        self._pos_cache = {}
        return super()._apply(fn, recurse)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """ImageNet-normalised ``[B, 3, H, W]`` (sides multiples of the patch size) -> ``[B, h, w, C]``."""
        p = self.patch_size
        height, width = pixels.shape[-2:]
        if height % p or width % p:
            raise ValueError(f"VFM {self.name}: image sides must be multiples of {p}, got {height}x{width}")
        grid = (height // p, width // p)
        vit = self.vit
        x = vit.patch_embed.proj(pixels.to(vit.patch_embed.proj.weight.dtype))  # [B, C, h, w]
        x = x.flatten(2).transpose(1, 2)  # [B, h*w, C]
        batch = x.shape[0]
        pos = self.positional(grid, x.dtype)
        cls = vit.cls_token.to(x.dtype).expand(batch, -1, -1)
        if self.spec.positional_resize == "dino":
            x = torch.cat([cls, x], dim=1) + pos  # [B, 1 + h*w, C]
        else:  # DINOv2 (timm's layout): patch positions, then [class, registers, patches]
            registers = vit.reg_token.to(x.dtype).expand(batch, -1, -1)
            x = torch.cat([cls, registers, x + pos], dim=1)  # [B, 5 + h*w, C]
        x = vit.norm_pre(x)
        for block in vit.blocks:
            x = block(x)
        x = vit.norm(x)[:, self.spec.prefix_tokens :]  # [B, h*w, C]
        return x.reshape(batch, grid[0], grid[1], -1)


def _timm_vit(spec: VFMSpec, *, pretrained: bool = False, **options) -> nn.Module:
    """timm's ViT of ``spec`` without a classifier, any input size; ``options``: other ``create_model`` arguments."""
    timm = _require_timm()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # timm's notes on pretrained configs
        return timm.create_model(spec.timm_name, pretrained=pretrained, num_classes=0, dynamic_img_size=True, **options)


def vit_with_weights(name: str, state: dict[str, torch.Tensor], path: str | os.PathLike, **options) -> nn.Module:
    """timm's ViT of the VFM ``name`` holding ``state`` (timm's key names, read from ``path``), checked first.

    Built as the CLIP is (``backbone.build_assigned``): modules and shapes on the meta device, then the file's tensors
    assigned, because timm's random init of 86M parameters (~2 s on a CPU) is all overwritten. The plain way
    (random init, then ``load_state_dict``) where timm cannot build on the meta device or leaves a tensor there
    that the weights do not hold. ``options``: ``timm.create_model`` overrides (tiny configs in tests).
    """
    spec = SPECS[name]
    try:
        with torch.device("meta"):
            skeleton = _timm_vit(spec, **options)
    except Exception as error:  # noqa: BLE001 - a timm whose ViT needs memory to build: the plain way
        logger.debug("vfm %s: building on the meta device failed (%s); built the plain way", name, error)
        skeleton = None
    model = skeleton if skeleton is not None else _timm_vit(spec, **options)
    expected = model.state_dict()  # shapes only, on the meta device
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"vfm_weights {path} do not fit {name}: missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
            f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}"
        )
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"vfm_weights {path}: {key} is {tuple(tensor.shape)}, {name} needs {tuple(expected[key].shape)}"
            )
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"vfm_weights {path}: {key} holds non-finite values")
    if skeleton is not None:
        vit = build_assigned(lambda _device: skeleton, state)
        if vit is not None:
            return vit
        logger.debug("vfm %s: a tensor of timm's ViT is not in the weights; built the plain way", name)
        model = _timm_vit(spec, **options)
    model.load_state_dict(state)
    return model


def load_vfm(
    name: str, weights: str | os.PathLike | None = None, *, device: str | torch.device = "cpu"
) -> VisionFoundationModel:
    """Build the VFM ``name`` (:data:`SPECS`) with ``weights`` (see the module docstring)."""
    if name not in SPECS:
        raise ValueError(f"unknown vfm {name!r}: choose one of {', '.join(SPECS)}")
    _require_timm()
    spec = SPECS[name]
    if weights is None:
        vit = _timm_vit(spec)
        warnings.warn(
            f"vfm {name} is randomly initialised (vfm_weights=None): fine for tests and benchmarks, meaningless "
            f"for segmentation. Pass the authors' {spec.hub_file} or 'timm'.",
            RandomWeightsWarning,
            stacklevel=2,
        )
        identity = f"{name}@random"
    elif weights == "timm":
        try:
            vit = _timm_vit(spec, pretrained=True)
        except Exception as error:  # hub failures: one line with what to do
            raise RuntimeError(
                f"could not download {spec.timm_name} for vfm {name} ({type(error).__name__}): without a network, "
                f"download the authors' {spec.hub_file} on a connected machine and pass it as vfm_weights"
            ) from None
        identity = f"{name}@timm:{spec.timm_name}"
    else:
        path = Path(weights)
        vit = vit_with_weights(name, hub_to_timm(read_weights_file(path), name), path)
        identity = f"{name}@sha256:{file_sha256(path)[:16]}"
    return VisionFoundationModel(name, vit, identity).to(device)
