"""ProxyCLIP (Lan et al., ECCV 2024): CLIP's values, attended with a vision foundation model's affinities.

What it computes, read from mc-lan/ProxyCLIP@e7b767f (``proxyclip_segmentor.py``, and the last block
in ``open_clip/transformer.py`` l. 503-533 and 560-587):

1. CLIP ViT (QuickGELU for OpenAI weights: ``create_model('ViT-B/16', pretrained='openai')``):
   blocks ``0..L-2`` unchanged; positional embeddings for a grid with another number of patches
   (l. 513-516) resized bicubic with ``scale_factor=(g + 0.1) / g0`` (``transformer.py`` l. 540-558,
   as SCLIP does).
2. The last block: ``ln_1`` and the value projection only (``in_proj`` of ``ln_1(x)``, l. 565-566),
   the class token's value dropped, the values ``[D, h, w]`` resized bilinearly
   (``align_corners=False``) to the VFM's grid ``(H, W)`` (l. 580-582); no residual, no MLP.
3. The VFM (``pacl_fast.vfm``) on the same crop re-normalised with ImageNet statistics
   (``proxyclip_segmentor.py`` l. 82-83 and 127-129): patch tokens after its final norm ``[C, H, W]``.
   ``S`` = cosine similarity of all token pairs (l. 569-570); ``A = gamma * (S - beta * mean(S))``
   with beta 1.2, gamma 3.0 (l. 573; defaults ``proxyclip_segmentor.py`` l. 29); entries with
   ``A < 0`` masked (l. 574); softmax over keys; one map for every head (l. 576-578; no
   ``head_dim**-0.5`` scale). Output ``out_proj(softmax(A) V)`` (l. 584-586).
4. ``ln_post``, ``proj`` (l. 531-532), L2 normalisation (``proxyclip_segmentor.py`` l. 167):
   patch embeddings on the **VFM's** grid, finer than CLIP's (DINO ViT-B/8 at 336 px: 42x42).

Where the engine differs, on purpose (``kernels.reference.proxyclip_reference`` holds both):

* ``mean(S)``: the authors take it over the whole tensor ``[B, N, N]`` and run batch 1; the engine
  takes it per image, which is what batch 1 computes, so batch > 1 equals batch 1 image by image.
* A row whose entries are all masked (every ``A < 0``: a near-uniform crop, where ``mean(S)`` passes
  ``1 / beta``) is NaN in the authors' code (softmax over ``-inf`` only). The engine gives such a
  row the softmax of its unmasked ``A``: attention by similarity, as every other row has.
* The affinities (similarity, mean, threshold, softmax) are computed in float32 whatever the model's
  precision (the authors run them in their fp16): ``A < 0`` is a threshold, and bf16's 8 bits would
  move entries across it. The attention map is cast to the values' precision for ``A V``.
* The authors' code assumes square crops (``I, J`` are both taken from the height, ``token_size``
  is read as ``(W/p, H/p)``; every crop of their configs is square). The engine uses each grid's
  own height and width, which is the same for square crops.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from open_clip.constants import IMAGENET_MEAN, IMAGENET_STD  # what every VFM here normalises with
from torch import nn

from pacl_fast.backbone import ClipBackbone, FrozenClipModel
from pacl_fast.methods import check_last_block
from pacl_fast.vfm import VisionFoundationModel

#: ProxyCLIP's defaults (``proxyclip_segmentor.py`` l. 29).
BETA = 1.2
GAMMA = 3.0


def proxy_attention(features: torch.Tensor, beta: float = BETA, gamma: float = GAMMA) -> torch.Tensor:
    """VFM patch tokens ``[B, N, C]`` -> ProxyCLIP's attention map ``[B, N, N]`` (rows sum to 1).

    ``A = gamma * (S - beta * mean(S))`` per image, ``A < 0`` masked, softmax over keys; a row with
    every entry masked takes the softmax of its unmasked ``A`` (module docstring).
    """
    unit = F.normalize(features, dim=-1)  # [B, N, C]
    similarity = unit @ unit.transpose(1, 2)  # [B, N, N]
    mean = similarity.mean(dim=(1, 2), keepdim=True)  # [B, 1, 1]: per image
    affinity = (similarity - mean * beta) * gamma
    keep = affinity >= 0
    keep = keep | ~keep.any(dim=-1, keepdim=True)  # fully masked rows keep every entry
    return affinity.masked_fill(~keep, float("-inf")).softmax(dim=-1)


class ProxyCLIP(FrozenClipModel):
    """A frozen CLIP whose last block attends CLIP's values with a VFM's affinities (module docstring).

    ``encode_image(pixels)``: CLIP-normalised pixels ``[B, 3, H, W]`` (sides multiples of both patch
    sizes, :attr:`pixel_multiple`) -> unit patch embeddings on the VFM's grid ``[B, H/q, W/q, E]``
    (``q`` = :attr:`grid_patch`).

    The last block's parameters are held directly (shared, never copied), as ``methods.LastBlock``
    holds them, so that ``encoders.graph``'s traceable view (which swaps ``nn.MultiheadAttention``
    modules) leaves this computation as it is.
    """

    method = "proxyclip"
    #: CLIP's positional embeddings for another grid: resized only when the number of patches differs from
    #: the native grid's (``transformer.py`` l. 513-516), bicubic with ``scale_factor=(g + 0.1) / g0``
    #: (l. 540-558), as SCLIP, ClearCLIP and NACLIP.
    positional_resize = "scale_factor_if_count_differs"

    def __init__(self, backbone: ClipBackbone, vfm: VisionFoundationModel, beta: float = BETA, gamma: float = GAMMA):
        super().__init__()
        if backbone.visual.proj is None:
            raise ValueError(f"CLIP {backbone.identity.arch} has no image projection; proxyclip needs one")
        block = backbone.blocks[-1]
        try:
            check_last_block(block)
        except ValueError as error:
            raise ValueError(f"CLIP {backbone.identity.arch} cannot run proxyclip: {error}") from None
        self.backbone = backbone
        self.vfm = vfm
        self.beta = float(beta)
        self.gamma = float(gamma)
        attn: nn.MultiheadAttention = block.attn
        self.num_heads = int(attn.num_heads)
        # Shared with the block (assignment registers the same Parameter / module, no copy).
        self.ln_1 = block.ln_1
        self.in_proj_weight = attn.in_proj_weight  # [3D, D]: the value projection is its last third
        self.in_proj_bias = attn.in_proj_bias  # [3D] or None
        self.out_proj = attn.out_proj
        # CLIP-normalised -> ImageNet-normalised, in float32 whatever the model's precision (the authors'
        # ``norm(unnorm(img))`` runs on the float32 input, then ``.half()``):
        # x_in = x * std_clip / std_in + (mean_clip - mean_in) / std_in
        mean, std = backbone.mean_std
        self._renorm_scale = tuple(s / t for s, t in zip(std, IMAGENET_STD))
        self._renorm_shift = tuple((m - n) / t for m, n, t in zip(mean, IMAGENET_MEAN, IMAGENET_STD))

    @property
    def grid_patch(self) -> int:
        """Pixels per cell of the output grid: the VFM's patch size."""
        return self.vfm.patch_size

    @property
    def pixel_multiple(self) -> int:
        """Input sides must be multiples of this: both towers' patch sizes."""
        return math.lcm(self.backbone.patch_size, self.vfm.patch_size)

    @property
    def logit_scale(self) -> torch.Tensor:
        """CLIP's own logit scale (the protocol presets use ProxyCLIP's 40)."""
        return self.backbone.clip.logit_scale.detach().float().clamp(max=math.log(100.0)).exp()

    def extra_repr(self) -> str:
        return f"vfm={self.vfm.identity!r}, beta={self.beta}, gamma={self.gamma}"

    def describe(self) -> dict:
        """What defines the outputs besides the CLIP's weights (keys caches and exports)."""
        return {
            "method": self.method,
            "positional_resize": self.positional_resize,
            "vfm": self.vfm.identity,
            "beta": self.beta,
            "gamma": self.gamma,
        }

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def vfm_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """CLIP-normalised ``[B, 3, H, W]`` -> the same crop ImageNet-normalised, in the VFM's precision."""
        scale = torch.tensor(self._renorm_scale, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
        shift = torch.tensor(self._renorm_shift, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
        return (pixels.float() * scale + shift).to(pixels.dtype)

    def clip_values(self, pixels: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """CLIP-normalised pixels -> the last block's values resized to the VFM grid ``[B, H*W, D]``."""
        x, clip_grid = self.backbone.embed_patches(pixels, resize=self.positional_resize)  # [B, 1 + n, D]
        for layer in self.backbone.blocks[:-1]:
            x = layer(x)
        width = x.shape[-1]
        bias = None if self.in_proj_bias is None else self.in_proj_bias[2 * width :]
        values = F.linear(self.ln_1(x[:, 1:]), self.in_proj_weight[2 * width :], bias)  # [B, n, D]
        values = values.transpose(1, 2).reshape(x.shape[0], width, *clip_grid)  # [B, D, h, w]
        values = F.interpolate(values, size=grid, mode="bilinear", align_corners=False)  # [B, D, H, W]
        return values.flatten(2).transpose(1, 2)  # [B, H*W, D]

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """CLIP-normalised pixels ``[B, 3, H, W]`` -> unit patch embeddings on the VFM grid ``[B, H', W', E]``."""
        height, width = pixels.shape[-2:]
        multiple = self.pixel_multiple
        if height % multiple or width % multiple:
            raise ValueError(
                f"proxyclip: image sides must be multiples of {multiple} (the lcm of CLIP's patch size "
                f"{self.backbone.patch_size} and the VFM's {self.vfm.patch_size}), got {height}x{width}"
            )
        visual = self.backbone.visual
        with torch.no_grad():
            features = self.vfm(self.vfm_pixels(pixels))  # [B, H', W', C]
            grid = (features.shape[1], features.shape[2])
            # The affinities in float32: the mask A < 0 is a threshold, and bf16's 8 bits would move it.
            attention = proxy_attention(features.flatten(1, 2).float(), self.beta, self.gamma)  # [B, N, N]
            values = self.clip_values(pixels, grid)  # [B, N, D]
            attended = self.out_proj(attention.to(values.dtype) @ values)  # [B, N, D]
            x = visual.ln_post(attended) @ visual.proj  # [B, N, E]
            x = F.normalize(x, dim=-1)
        return x.reshape(x.shape[0], grid[0], grid[1], -1)

