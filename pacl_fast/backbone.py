"""Open a frozen open_clip CLIP and read patch tokens out of its ViT at any resolution.

Three ways to name a CLIP, as open_clip users expect:

* a built-in model name plus a weights source: ``load_clip("ViT-B-16", "laion2b_s34b_b88k")`` (a
  pretrained tag, fetched from the hub by open_clip) or ``load_clip("ViT-B-16", "/path/ckpt.pt")``
  (a local checkpoint; safetensors, or a torch file read with ``weights_only=True``);
* ``"local-dir:/path"``: a folder holding ``open_clip_config.json`` and ``open_clip_model.safetensors``
  (what ``train/train.py --stage clip`` exports);
* a config dict (open_clip's ``model_cfg``: ``embed_dim``, ``vision_cfg``, ``text_cfg``), for tiny
  models in tests and the synthetic world.

A model built from a pretrained tag gets the settings open_clip records for that tag
(:func:`pretrained_settings`), whatever the config name: QuickGELU for weights trained with it
(OpenAI's, MetaCLIP's, DFN's...: ``ViT-B-16`` + ``openai`` computes what ``ViT-B-16-quickgelu`` +
``openai`` does, which open_clip's own factory only warns about) and the tag's mean/std. A local
file carries no such record: its config says it (``ViT-B-16-quickgelu``, or ``"quick_gelu": true``
in a ``local-dir:`` folder's ``model_cfg`` or a config dict).

A tag's weights come from the hub cache, else from the hub; with no network (``HF_HUB_OFFLINE``,
or the hub's host not answering within :data:`HUB_CONNECT_TIMEOUT` seconds) only the cache is
looked at, and a miss raises :class:`WeightsUnavailableError` at once, saying what to download.

``clip_weights=None`` means random initialisation and says so in a warning.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import socket
import sys
import time
import types
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import TextTransformer, VisionTransformer
from torch import nn
from torch.overrides import TorchFunctionMode

from pacl_fast.files import known_sha256, open_regular, read_regular_bytes, remember_sha256
from pacl_fast.text_tower import (
    PromptTruncatedWarning,
    check_tokens,
    describe_cut_texts,
    encode_text_eager,
    length_groups,
    pool_index,
    text_attributes,
    text_head,
    text_hidden,
    text_parts,
    tracing,
    truncation_problem,
)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

LOCAL_DIR_PREFIX = "local-dir:"
#: How positional embeddings meet another patch grid (:meth:`ClipBackbone.positional_embedding`):
#: ``"size"`` (PACL's: bicubic to ``(h, w)`` whenever the grid differs from the native one);
#: ``"scale_factor_if_count_differs"`` (SCLIP's, ClearCLIP's and NACLIP's ``interpolate_pos_encoding``:
#: :func:`resize_positional_scale_factor`, only when the number of patches differs from the native grid's);
#: ``"size_if_count_differs"`` (MaskCLIP's ``_pos_embeding``: bicubic to ``(h, w)``, only then).
POSITIONAL_RESIZES = ("size", "scale_factor_if_count_differs", "size_if_count_differs")

#: Seconds to wait for the hub's host to accept a connection before treating the machine as offline.
HUB_CONNECT_TIMEOUT = 3.0
#: The preprocessing keys of an open_clip pretrained config that the model keeps (``preprocess_cfg``).
PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")
#: Largest ``open_clip_config.json`` read (real ones are under 2 KB).
MAX_CONFIG_BYTES = 1 << 20
#: safetensors' own limit on its JSON header.
MAX_SAFETENSORS_HEADER = 100_000_000
#: safetensors' dtype names that :func:`read_safetensors` reads itself (others go through the safetensors library).
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip

logger = logging.getLogger(__name__)


def resize_positional_scale_factor(patch_pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``[1, D, g0, g1] -> [1, D, h, w]`` as SCLIP, ClearCLIP and NACLIP resize positional embeddings.

    Their ``interpolate_pos_encoding`` (SCLIP ``clip/model.py``, NACLIP ``clip/model.py``, ClearCLIP's
    open_clip ``transformer.py``, after DINO) calls ``F.interpolate(..., scale_factor=((h + 0.1) / g0,
    (w + 0.1) / g1), mode="bicubic")``: the output has ``floor`` of those sizes, i.e. ``(h, w)``, but
    the sampling positions follow the scale factor given, not ``g / h``, so the values differ
    slightly from ``F.interpolate(size=(h, w))``.
    """
    g0, g1 = patch_pos.shape[-2:]
    scale = ((grid[0] + 0.1) / g0, (grid[1] + 0.1) / g1)
    resized = F.interpolate(patch_pos, scale_factor=scale, mode="bicubic", align_corners=False)
    if tuple(resized.shape[-2:]) != tuple(grid):
        raise RuntimeError(f"scale-factor resize of a {g0}x{g1} grid gave {tuple(resized.shape[-2:])}, not {grid}")
    return resized


class RandomWeightsWarning(UserWarning):
    """A model runs with randomly initialised weights: its outputs mean nothing."""


class WeightsUnavailableError(FileNotFoundError):
    """The weights a pretrained tag names are not in the local cache and cannot be downloaded now (no
    network, or the hub refused). The message is one line: what failed and what to do."""


@dataclass(frozen=True)
class ClipIdentity:
    """What a CLIP is, for pairing PACL weights with it and keying caches.

    ``arch`` is the open_clip model name, or ``custom-<sha256[:12]>`` of the config for custom
    configs; ``weights`` is a pretrained tag, ``sha256:<hex>`` of a local weights file, or ``random``.
    """

    arch: str
    weights: str

    def __str__(self) -> str:
        return f"{self.arch}@{self.weights}"


def config_digest(model_cfg: dict[str, Any]) -> str:
    """A short stable hash of an open_clip model config (key order does not matter)."""
    canonical = json.dumps(model_cfg, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, cached by (path, size, mtime) in this process and in the persistent digest cache
    (:func:`pacl_fast.files.known_sha256`) across processes, because CLIP checkpoints are large."""
    path = os.path.abspath(path)
    with open_regular(path) as f:
        stat = os.fstat(f.fileno())
        key = (path, stat.st_size, stat.st_mtime_ns)
        if key not in _SHA_CACHE:
            known = known_sha256(path, stat)
            if known is None:
                hashed_from = time.time_ns()
                digest = hashlib.sha256()
                for block in iter(lambda: f.read(1 << 22), b""):
                    digest.update(block)
                known = digest.hexdigest()
                _remember_unless_changed(path, f, stat, known, hashed_from)
            _SHA_CACHE[key] = known
    return _SHA_CACHE[key]


def _remember_unless_changed(path: str | os.PathLike, f: Any, before: os.stat_result, digest: str, start: int) -> None:
    """Record ``digest`` for ``path`` in the digest cache (``path`` open as ``f``; ``fstat`` ``before`` and
    ``time.time_ns()`` ``start`` taken when its hashing began), unless the file changed while it was read."""
    if not _changed(f, before):
        remember_sha256(path, before, digest, start)
    else:
        logger.debug("%s changed while it was hashed: its digest is not remembered", path)


def _changed(f: Any, before: os.stat_result) -> bool:
    """Whether the open file ``f`` is no longer as ``fstat`` ``before`` saw it (size, mtime or ctime)."""
    after = os.fstat(f.fileno())
    return any(getattr(after, field) != getattr(before, field) for field in ("st_size", "st_mtime_ns", "st_ctime_ns"))


def check_safetensors(path: str | os.PathLike) -> None:
    """``ValueError`` naming ``path`` unless it is a whole safetensors file, read before any tensor is.

    A safetensors file is an 8-byte little-endian header length, a JSON header whose ``data_offsets``
    place every tensor, and the data: a truncated download or copy ends before the data its header
    describes (safetensors itself then raises an error that names no file).
    """
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if length < 2 or length > min(size - 8, MAX_SAFETENSORS_HEADER):
            raise ValueError(
                f"CLIP weights file {path} is not a whole safetensors file ({size} bytes, "
                f"{'no header' if length < 0 else f'a header of {length} bytes'}): truncated, or another format"
            )
        try:
            header = json.loads(f.read(length))
            ends = [int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as error:
            raise ValueError(f"CLIP weights file {path} has a broken safetensors header ({error})") from None
    expected = 8 + length + max(ends, default=0)
    if expected != size:
        raise ValueError(
            f"CLIP weights file {path} is {'truncated' if size < expected else 'longer than its header says'}: "
            f"its header describes {expected} bytes, the file has {size}; download or copy it again"
        )


def _read_exactly(f: Any, buffer: memoryview, path: str | os.PathLike) -> None:
    """Fill ``buffer`` from ``f``; a file that ends first was cut while being read."""
    done = 0
    while done < len(buffer):
        count = f.readinto(buffer[done:])
        if not count:
            raise ValueError(f"CLIP weights file {path} ended while being read: it is being written or was truncated")
        done += count


def read_safetensors(path: str | os.PathLike, *, digest: bool = True) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, each in memory of its own, read in one pass over the file.

    Why not ``safetensors.torch.load_file``: its tensors map the file, so loading them into a model is a
    second pass (page faults, then a copy), and a model that kept them would change if the file were
    rewritten in place. Here each tensor is read straight into its own storage, and with ``digest`` the
    same bytes are hashed as they arrive, so the file's sha256 (the CLIP's identity) costs no second read:
    :func:`file_sha256` answers from it. When the persistent digest cache knows the file unchanged
    (:func:`pacl_fast.files.known_sha256`: a process that read it before), nothing is hashed at all; a file
    hashed here is remembered there (:func:`pacl_fast.files.remember_sha256`). (Hashing on a second thread
    measured no faster on the shared 2-core machine: there was no idle core to hash on.)

    The header is held to the format: known dtypes, shapes that match their byte ranges, ranges that tile
    the data exactly (what safetensors itself requires); ``ValueError`` naming the file otherwise. Dtypes it
    does not know (fp8...) and big-endian machines go through the safetensors library, copied.
    """
    check_safetensors(path)
    with open_regular(path) as f:
        stat = os.fstat(f.fileno())
        known = known_sha256(path, stat) if digest else None  # known: the tensors need no hashing
        hashed_from = time.time_ns()
        prefix = f.read(8)
        header_bytes = f.read(int.from_bytes(prefix, "little"))
        try:
            header = json.loads(header_bytes)
            header.pop("__metadata__", None)
            entries = sorted(
                ((name, SAFETENSORS_DTYPES.get(entry["dtype"]), [int(n) for n in entry["shape"]],
                  *(int(offset) for offset in entry["data_offsets"])) for name, entry in header.items()),
                key=lambda entry: entry[3],
            )  # fmt: skip
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            raise ValueError(f"CLIP weights file {path} has a broken safetensors header ({error})") from None
        if sys.byteorder != "little" or any(dtype is None for _, dtype, *_ in entries):
            return _read_safetensors_library(path)
        hasher = hashlib.sha256(prefix + header_bytes) if digest and known is None else None
        state: dict[str, torch.Tensor] = {}
        position = 0
        for name, dtype, shape, start, end in entries:
            size = math.prod(shape) * dtype.itemsize
            if start != position or end - start != size or min(shape, default=0) < 0:
                raise ValueError(
                    f"CLIP weights file {path} has a broken safetensors header: tensor {name!r} ({dtype}, shape "
                    f"{shape}) has bytes {start}..{end}, expected {position}..{position + size}"
                )
            tensor = torch.empty(shape, dtype=dtype)  # [*shape]
            buffer = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
            _read_exactly(f, buffer, path)
            if hasher is not None:
                hasher.update(buffer)
            state[name] = tensor
            position = end
        if hasher is not None:
            known = hasher.hexdigest()
            _remember_unless_changed(path, f, stat, known, hashed_from)
        elif known is not None and _changed(f, stat):
            known = None  # rewritten while read: file_sha256 hashes what it holds now
    if known is not None:
        _SHA_CACHE[(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)] = known
    return state


def _read_safetensors_library(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """What :func:`read_safetensors` cannot read itself, through the safetensors library, copied out of its map."""
    from safetensors.torch import load_file

    try:
        return {name: tensor.clone() for name, tensor in load_file(str(path)).items()}
    except Exception as error:  # safetensors' own errors name no file
        raise ValueError(f"cannot read CLIP weights file {path}: {error}") from error


def _read_state_dict(path: Path, *, digest: bool = True) -> dict[str, torch.Tensor]:
    """Tensors of a CLIP checkpoint file, never unpickling arbitrary objects (safetensors: with ``digest``, the
    file's sha256 is taken on the way, see :func:`read_safetensors`)."""
    if path.suffix == ".safetensors":
        state = read_safetensors(path, digest=digest)
    else:
        try:
            with open_regular(path) as f:
                state = torch.load(f, map_location="cpu", weights_only=True)
        except OSError:
            raise
        except Exception as error:  # pickle with custom classes, or not a torch file at all
            refusal = "torch.load(weights_only=True) refused it"
            raise ValueError(
                f"cannot read CLIP checkpoint {path}: it is not a safetensors file and {refusal} ({error}). "
                "Convert it to safetensors."
            ) from error
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"CLIP checkpoint {path} holds a {type(state).__name__}, expected a state dict")
    others = sorted(str(k) for k, v in state.items() if not isinstance(v, torch.Tensor))
    if others:
        raise ValueError(f"CLIP checkpoint {path} holds entries that are not tensors: {others[:5]}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _local_dir_weights(folder: Path) -> Path | None:
    """The weights file open_clip itself loads from a ``local-dir:`` folder (so that the identity we
    record is the hash of the file that is loaded: a folder may hold a ``.safetensors`` and a ``.bin``)."""
    from open_clip import factory

    chosen = factory._find_checkpoint_in_dir(folder)  # open_clip's own choice, private but the one it uses
    return Path(chosen) if chosen is not None else None


class ClipBackbone(nn.Module):
    """A frozen open_clip CLIP whose ViT yields patch tokens ``[B, h, w, D]`` at any grid.

    Patch tokens are the final block's output after ``ln_post``, before ``proj`` (open_clip's
    ``output_tokens=True``). Positional embeddings are interpolated (bicubic) to the input's
    grid and cached per grid.
    """

    def __init__(self, clip: nn.Module, tokenizer: Any, identity: ClipIdentity, model_cfg: dict[str, Any]):
        super().__init__()
        visual = getattr(clip, "visual", None)
        if not isinstance(visual, VisionTransformer):
            raise ValueError(
                f"CLIP {identity.arch} has a {type(visual).__name__} image tower; pacl-fast's methods (pacl, "
                "maskclip, sclip, clearclip, naclip) need open_clip's VisionTransformer (ViT-*) to read patch tokens"
            )
        if visual.attn_pool is not None:
            raise ValueError(f"CLIP {identity.arch} uses an attentional pooler; its tokens are not patch tokens")
        self.clip = clip
        self.tokenizer = tokenizer
        self.identity = identity
        self.model_cfg = copy.deepcopy(model_cfg)
        self.clip.requires_grad_(False)
        self.clip.eval()
        self._pos_cache: dict[tuple[int, int, torch.dtype, torch.device, str], torch.Tensor] = {}

    # Frozen: train() never puts the CLIP in training mode (dropout, patch dropout stay off).
    def train(self, mode: bool = True) -> ClipBackbone:
        super().train(False)
        return self

    @property
    def visual(self) -> VisionTransformer:
        return self.clip.visual

    @property
    def patch_size(self) -> int:
        return int(self.visual.patch_size[0])

    @property
    def image_size(self) -> int:
        return int(self.visual.image_size[0])

    @property
    def token_dim(self) -> int:
        """D: width of the patch tokens."""
        return int(self.visual.ln_post.normalized_shape[0])

    @property
    def embed_dim(self) -> int:
        """E: width of CLIP's joint image-text embedding."""
        return int(self.visual.output_dim)

    @property
    def context_length(self) -> int:
        return int(self.clip.context_length)

    @property
    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        cfg = getattr(self.visual, "preprocess_cfg", None) or {}
        return tuple(cfg.get("mean", OPENAI_MEAN)), tuple(cfg.get("std", OPENAI_STD))

    def positional_embedding(
        self, grid: tuple[int, int], dtype: torch.dtype, device: torch.device, resize: str = "size"
    ) -> torch.Tensor:
        """Class + patch positional embeddings for a grid ``(h, w)``: ``[1 + h*w, D]``.

        ``resize`` (one of :data:`POSITIONAL_RESIZES`) picks how and when the native ``g0 x g1`` table
        is resized, bicubic in all three: ``"size"`` (exactly ``(h, w)``, what PACL trains and evaluates
        with, whenever ``(h, w) != (g0, g1)``), or the training-free repositories' rule, which resizes
        only when ``h * w != g0 * g1`` and otherwise adds the native table as it is, in its row-major
        order (SCLIP ``clip/model.py`` l. 239-242, NACLIP ``clip/model.py`` l. 104-107, ClearCLIP
        ``open_clip/transformer.py`` l. 510-513, MaskCLIP ``mmseg/models/backbones/vit.py`` l. 367-379):
        by scale factor (:func:`resize_positional_scale_factor`) or by size. The class position is never
        resized. Cached per (grid, dtype, device, resize).
        """
        if resize not in POSITIONAL_RESIZES:
            raise ValueError(f"resize must be one of {POSITIONAL_RESIZES}, got {resize!r}")
        key = (grid[0], grid[1], dtype, device, resize)
        cached = self._pos_cache.get(key)
        if cached is not None:
            return cached
        pos = self.visual.positional_embedding.detach()  # [1 + g0*g1, D]
        g0, g1 = self.visual.grid_size
        by_count = resize != "size"
        if tuple(grid) == (g0, g1) or (by_count and grid[0] * grid[1] == g0 * g1):
            resized = pos
        else:
            cls_pos, patch_pos = pos[:1], pos[1:]
            patch_pos = patch_pos.reshape(1, g0, g1, -1).permute(0, 3, 1, 2).float()  # [1, D, g0, g1]
            if resize == "scale_factor_if_count_differs":
                patch_pos = resize_positional_scale_factor(patch_pos, grid)
            else:
                patch_pos = F.interpolate(patch_pos, size=grid, mode="bicubic", align_corners=False)
            patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1).to(pos.dtype)
            resized = torch.cat([cls_pos, patch_pos], dim=0)
        resized = resized.to(device=device, dtype=dtype)
        if not torch.compiler.is_compiling():  # a traced (fake) tensor must not outlive its trace
            self._pos_cache[key] = resized
        return resized

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module hook: moving the model drops the cache
        self._pos_cache = {}
        return super()._apply(fn, recurse)

    def embed_patches(self, pixels: torch.Tensor, resize: str = "size") -> tuple[torch.Tensor, tuple[int, int]]:
        """Normalised pixels ``[B, 3, H, W]`` (sides multiples of the patch size) -> the tower's input
        ``[B, 1 + h*w, D]`` (class token first, positional embeddings added, ``ln_pre``) and the grid ``(h, w)``."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"pixels must be [B, 3, H, W], got {tuple(pixels.shape)}")
        p = self.patch_size
        height, width = pixels.shape[-2:]
        if height % p or width % p:
            raise ValueError(f"image sides must be multiples of the patch size {p}, got {height}x{width}")
        grid = (height // p, width // p)
        visual = self.visual
        x = visual.conv1(pixels.to(visual.conv1.weight.dtype))  # [B, D, h, w]
        x = x.flatten(2).transpose(1, 2)  # [B, h*w, D]
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)  # [B, 1 + h*w, D]
        x = x + self.positional_embedding(grid, x.dtype, x.device, resize)
        return visual.ln_pre(x), grid

    @property
    def blocks(self) -> nn.ModuleList:
        """The image tower's residual attention blocks (batch first)."""
        return self.visual.transformer.resblocks

    def patch_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels ``[B, 3, H, W]`` (sides multiples of the patch size) -> ``[B, h, w, D]``."""
        x, grid = self.embed_patches(pixels)
        x = self.visual.transformer(x)
        x = self.visual.ln_post(x[:, 1:])  # [B, h*w, D]
        return x.reshape(x.shape[0], grid[0], grid[1], -1)

    def encode_global(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels ``[B, 3, S, S]`` at the native size -> CLIP's unit image embeddings ``[B, E]``."""
        return self.clip.encode_image(pixels.to(self.visual.conv1.weight.dtype), normalize=True)

    # --- the text tower ---------------------------------------------------------------------------

    @property
    def text_truncatable(self) -> bool:
        """Whether the text tower gives the same outputs at fewer than ``context_length`` tokens.

        True for open_clip towers with a causal mask that pool at the end-of-text token (``argmax``
        or ``eos`` pooling: CLIP, EVA, ViTamin, PE...): no position reads a later one, so the tokens
        after the pooled one change nothing. SigLIP/CLIPA-style towers (``last``/``first`` pooling,
        no causal mask), CoCa's appended class token and Hugging Face towers read every position,
        so they keep the full length. Decided from the model's own modules and config.
        """
        return truncation_problem(text_parts(self.clip)) is None

    @property
    def text_dtype(self) -> torch.dtype:
        """The precision the text tower runs in."""
        parts = text_parts(self.clip)
        if parts is not None:
            return parts.transformer.get_cast_dtype()
        return next(self.clip.text.parameters()).dtype

    def text_lengths(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids ``[T, L]`` -> how many leading tokens each row needs ``[T]`` (int64): its pooled
        (end-of-text) position + 1 on truncatable towers, ``L`` on others."""
        check_tokens(tokens, self.context_length)
        parts = text_parts(self.clip)
        if truncation_problem(parts) is not None:
            return torch.full((tokens.shape[0],), tokens.shape[1], dtype=torch.int64, device=tokens.device)
        return pool_index(parts, tokens) + 1

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids ``[T, L]`` -> L2-normalised CLIP text embeddings ``[T, E]``: what open_clip's
        ``encode_text(normalize=True)`` computes on the same prompts at the full context length.

        On truncatable towers (:attr:`text_truncatable`) any ``L <= context_length`` works: the
        positional embeddings and the causal mask are sliced to ``L``. Run eagerly, each row is also
        cut to what it needs (:meth:`text_lengths`), rows run in passes by that length, and the
        prefix all rows share runs once (its keys and values are reused): the causal mask makes all
        three exact, and prompts average ~9 of CLIP's 77 tokens. Traced (``torch.compile``, ONNX
        export), the tower runs at ``L`` as given. Other towers take ``L == context_length`` only.
        """
        check_tokens(tokens, self.context_length)
        parts = text_parts(self.clip)
        problem = truncation_problem(parts)
        if problem is not None:
            if tokens.shape[1] != self.context_length:
                raise ValueError(
                    f"tokens must be [T, {self.context_length}] for CLIP {self.identity.arch}: {problem}, so its "
                    f"text tower runs at the full context length; got {tuple(tokens.shape)}"
                )
            return self.clip.encode_text(tokens, normalize=True)
        if tracing():
            return text_head(parts, text_hidden(parts, tokens), pool_index(parts, tokens))
        return encode_text_eager(parts, tokens)

    def encode_text_by_length(
        self, tokens: torch.Tensor, encode: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """``encode`` (tokens ``[n, l]`` -> ``[n, E]``) run on the rows of ``tokens [T, L]`` in passes by
        :meth:`text_lengths`, each pass cut to the longest length in it -> ``[T, E]`` in the input's order.

        How a compiled or exported text tower (which runs at the length it is given) gets the
        truncation that :meth:`encode_text` does eagerly.
        """
        lengths = self.text_lengths(tokens)
        out = None
        for length, rows in length_groups(lengths):
            embeddings = encode(tokens[rows, :length])  # [n, E]
            if out is None:
                out = embeddings.new_empty((tokens.shape[0], embeddings.shape[-1]))
            out[rows] = embeddings
        return out

    def tokenize(self, texts: str | list[str], *, warn: bool = True) -> torch.Tensor:
        """Texts -> token ids ``[T, context_length]`` (int64).

        The tokenizer cuts a text longer than the context, so texts that differ only after the cut
        embed identically: with ``warn``, a :class:`PromptTruncatedWarning` names them.
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        tokens = self.tokenizer(texts)
        if warn:
            cut = self.cut_texts(texts, tokens)
            if cut:
                message = describe_cut_texts([texts[i] for i in cut], len(texts), tokens.shape[1])
                warnings.warn(message, PromptTruncatedWarning, stacklevel=2)
        return tokens

    def cut_texts(self, texts: list[str], tokens: torch.Tensor) -> list[int]:
        """Indices of the ``texts`` that the tokenizer cut to fit ``tokens [T, L]`` (its output for them).

        Exact for open_clip's CLIP tokenizer (the only rows checked are those that fill the context);
        other tokenizers (Hugging Face) are not checked and give ``[]``.
        """
        if not isinstance(self.tokenizer, open_clip.SimpleTokenizer):
            return []
        length = tokens.shape[1]
        full = (tokens[:, -1] != 0).nonzero().flatten().tolist()  # 0 pads; a row without padding may be cut
        return [i for i in full if len(self.tokenizer.encode(texts[i])) + 2 > length]  # + start and end tokens

    def text_tensors(self) -> list[torch.Tensor]:
        """The parameters and buffers of the text tower (what :meth:`with_text_dtype` casts)."""
        tensors = []
        for name in text_attributes(self.clip):
            value = getattr(self.clip, name, None)
            if isinstance(value, nn.Module):
                tensors += [*value.parameters(), *value.buffers()]
            elif isinstance(value, torch.Tensor):
                tensors.append(value)
        return tensors

    def with_text_dtype(self, dtype: torch.dtype) -> ClipBackbone:
        """This backbone with its text tower in ``dtype``: the backbone itself when it already is, else a
        view that shares everything but the text tower, whose parameters are cast copies."""
        if self.text_dtype == dtype:
            return self
        clip = copy.copy(self.clip)
        clip._modules = dict(self.clip._modules)
        clip._parameters = dict(self.clip._parameters)
        clip._buffers = dict(self.clip._buffers)
        for name in text_attributes(self.clip):
            if clip._modules.get(name) is not None:
                clip._modules[name] = copy.deepcopy(clip._modules[name]).to(dtype)
            elif clip._parameters.get(name) is not None:
                clip._parameters[name] = nn.Parameter(clip._parameters[name].detach().to(dtype), requires_grad=False)
            elif clip._buffers.get(name) is not None and clip._buffers[name].is_floating_point():
                clip._buffers[name] = clip._buffers[name].to(dtype)
        view = copy.copy(self)
        view._modules = {**self._modules, "clip": clip}
        view._pos_cache = {}
        return view

    def text_weights_digest(self) -> str:
        """sha256 of the text tower's tensors (names, dtypes, shapes, bytes), for keying caches of
        weights that have no name (random init, weights loaded or edited in memory).

        ViT-B-16's text tower is 63M parameters: hashing takes ~0.3-0.7 s on a 2-core CPU, so the
        digest is kept until a tensor is replaced or changed in place (its version counter).
        """
        tensors = {
            name: tensor
            for name, tensor in self.clip.state_dict(keep_vars=True).items()
            if not name.startswith("visual.") and name not in ("logit_scale", "logit_bias")
        }
        stamp = tuple((name, id(tensor), tensor._version) for name, tensor in sorted(tensors.items()))
        cached = self.__dict__.get("_text_digest")
        if cached is not None and cached[0] == stamp:
            return cached[1]
        digest = hashlib.sha256()
        for name in sorted(tensors):
            tensor = tensors[name].detach().contiguous().cpu()
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
        self.__dict__["_text_digest"] = (stamp, digest.hexdigest())
        return self.__dict__["_text_digest"][1]


class FrozenClipModel(nn.Module):
    """What every pacl-fast segmentation model shares: a frozen CLIP registered as ``backbone``, whose text
    tower and global image embedding are used as they are. Subclasses (PACL, the training-free towers)
    define ``encode_image``: normalised pixels -> unit patch embeddings."""

    backbone: ClipBackbone

    @property
    def pixel_multiple(self) -> int:
        """Input sides (canvases, sliding windows) must be multiples of this: the CLIP's patch size (ProxyCLIP:
        the lcm of the CLIP's and its VFM's)."""
        return self.backbone.patch_size

    @property
    def grid_patch(self) -> int:
        """Pixels per cell of the output grid ``[B, H/q, W/q, E]``: the CLIP's patch size (ProxyCLIP: its VFM's)."""
        return self.backbone.patch_size

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids ``[T, L]`` -> unit CLIP text embeddings ``[T, E]`` (frozen)."""
        with torch.no_grad():
            return self.backbone.encode_text(tokens)

    def encode_global(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels ``[B, 3, S, S]`` (native size) -> CLIP's own unit image embeddings ``[B, E]``."""
        with torch.no_grad():
            return self.backbone.encode_global(pixels)


def _random_init_warning(arch: str) -> None:
    warnings.warn(
        f"CLIP {arch} is randomly initialised (clip_weights=None): fine for tests and benchmarks, "
        "meaningless for segmentation. Pass a pretrained tag or a checkpoint path.",
        RandomWeightsWarning,
        stacklevel=4,  # the caller of load_clip (load_clip -> _load_clip -> here)
    )


# --- pretrained tags: their settings, and their weights without hanging on a dead network ----------------


def pretrained_settings(clip: str, tag: str) -> dict[str, Any]:
    """What open_clip records for pretrained ``tag`` of model ``clip`` (``open_clip.pretrained``):
    ``quick_gelu`` (the activation the weights were trained with), ``mean``/``std``/``interpolation``/
    ``resize_mode`` when recorded, and where the weights are (``hf_hub``, ``url`` or ``file``).

    ``ValueError`` naming the model's tags when it has no such tag.
    """
    from open_clip.pretrained import get_pretrained_cfg

    settings = get_pretrained_cfg(clip, tag)
    if settings:
        return dict(settings)
    tags = open_clip.list_pretrained_tags_by_model(clip)
    hint = ""
    for other in (clip.removesuffix("-quickgelu"), f"{clip}-quickgelu"):
        if other != clip and get_pretrained_cfg(other, tag):
            hint = f" ({other} has it)"
    listed = f"its tags: {', '.join(tags)}" if tags else "it has no pretrained tags: pass a local checkpoint file"
    raise ValueError(f"open_clip model {clip!r} has no pretrained tag {tag!r}{hint}; {listed}")


def _weights_source(settings: dict[str, Any]) -> tuple[str, str, bool]:
    """Where open_clip fetches a tag's weights from: (a URL to show, the file's name, whether through the hub)."""
    from open_clip.pretrained import has_hf_hub

    if settings.get("hf_hub") and has_hf_hub():
        from huggingface_hub import constants
        from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

        repo, filename = os.path.split(settings["hf_hub"])
        return f"{constants.ENDPOINT}/{repo}", filename or f"{HF_SAFE_WEIGHTS_NAME} or {HF_WEIGHTS_NAME}", True
    url = settings.get("url", "")
    return url, os.path.basename(url), False


def _offline_reason(settings: dict[str, Any]) -> str | None:
    """Why the tag's weights cannot be downloaded now, or None when the server looks reachable.

    ``HF_HUB_OFFLINE`` set, or the host (or the HTTPS proxy) not accepting a TCP connection within
    :data:`HUB_CONNECT_TIMEOUT` seconds: found in at most that long, instead of the hub client's
    minute of retries.
    """
    address, _, via_hub = _weights_source(settings)
    if via_hub:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return "HF_HUB_OFFLINE is set"
    parsed = urllib.parse.urlsplit(address)
    if not parsed.hostname:
        return None
    host, port = parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parsed.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        proxied = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxied.hostname or host, proxied.port or 80
    try:
        socket.create_connection((host, port), timeout=HUB_CONNECT_TIMEOUT).close()
    except OSError as error:
        return f"no network ({host}:{port} does not answer: {error.strerror or error})"
    return None


@contextlib.contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """The hub client in offline mode (cache only, no requests, no retries) while the block runs.

    It flips ``huggingface_hub.constants.HF_HUB_OFFLINE``, a process-wide setting, and restores it: a hub
    download in another thread during those milliseconds would be refused too (and could be retried)."""
    if not offline:
        yield
        return
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


class _OpenClipNotices(logging.Filter):
    """Drops open_clip's root-logger line that is untrue when pacl-fast loads the weights itself into the model
    open_clip built ("No pretrained weights loaded ... initialized randomly"; random init has its own warning)."""

    DROPPED = ("No pretrained weights loaded for model",)

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "root" and str(record.msg).startswith(self.DROPPED))


@contextlib.contextmanager
def _quiet_open_clip() -> Iterator[None]:
    notices = _OpenClipNotices()
    root = logging.getLogger()
    root.addFilter(notices)
    try:
        yield
    finally:
        root.removeFilter(notices)


def _fetch_pretrained(clip: str, tag: str, settings: dict[str, Any]) -> Path:
    """The local file of a tag's weights: open_clip's own download (hub cache first), in offline mode
    when :func:`_offline_reason` finds no network. :class:`WeightsUnavailableError` when it fails."""
    from open_clip.pretrained import download_pretrained

    reason = _offline_reason(settings) if "file" not in settings else None
    try:
        with _hub_offline(reason is not None), _quiet_open_clip():
            path = download_pretrained(settings)
        if not path:
            raise FileNotFoundError("open_clip records no source for it")
    except Exception as error:
        address, filename, _ = _weights_source(settings)
        source = f"{filename} from {address}" if address else "its weights file"
        local = f"--clip {clip}-quickgelu " if settings.get("quick_gelu") and not clip.endswith("-quickgelu") else ""
        advice = (
            f"download {source} on a connected machine and pass the file: clip_weights=PATH "
            f"({local}--clip-weights PATH)"
        )
        if reason is not None:
            failure = f"{reason}, and they are not in the local hub cache"
        else:
            failure = " ".join(str(error).split())[:300]
        raise WeightsUnavailableError(
            f"cannot get the weights of pretrained tag {tag!r} for {clip}: {failure}. To use them, {advice}"
        ) from error
    return Path(path)


def _identity_of_tag(clip: str, tag: str, settings: dict[str, Any]) -> str:
    """The architecture name recorded for a tag's model: open_clip's ``-quickgelu`` name when the tag's
    weights run QuickGELU, so that ``ViT-B-16`` + ``openai`` and ``ViT-B-16-quickgelu`` + ``openai``
    (the same computation) share caches and PACL weights."""
    if settings.get("quick_gelu") and not clip.endswith("-quickgelu"):
        return f"{clip}-quickgelu"
    return clip


def load_clip(
    clip: str | dict[str, Any] = "ViT-B-16",
    clip_weights: str | os.PathLike | None = None,
    *,
    device: str | torch.device = "cpu",
) -> ClipBackbone:
    """Open a CLIP as a frozen :class:`ClipBackbone`.

    Args:
        clip: an open_clip model name (``"ViT-B-16"``), ``"local-dir:/path"``, or a model config dict.
        clip_weights: a pretrained tag (hub; the model takes the tag's settings, see the module
            docstring), a local checkpoint file, or None for random init. Must be None for
            ``local-dir:`` (the folder carries its weights).
        device: where the model lives.

    Raises:
        WeightsUnavailableError: a tag's weights are neither cached nor downloadable now.
        ValueError: an unknown model or tag, or a weights file that is broken or does not fit.
    """
    from pacl_fast.files import NotARegularFileError

    try:
        return _load_clip(clip, clip_weights).to(device)
    except NotARegularFileError as error:  # a FIFO or device where weights or a config should be
        raise ValueError(str(error)) from None


def _load_clip(clip: str | dict[str, Any], clip_weights: str | os.PathLike | None) -> ClipBackbone:
    if isinstance(clip, dict):
        model_cfg = copy.deepcopy(clip)
        arch = f"custom-{config_digest(model_cfg)}"

        def build(device: str = "cpu") -> nn.Module:
            try:
                return open_clip.CLIP(**copy.deepcopy(model_cfg))
            except TypeError as error:
                raise ValueError(f"clip config is not a valid open_clip model_cfg: {error}") from error

        tokenizer = open_clip.SimpleTokenizer(context_length=model_cfg.get("text_cfg", {}).get("context_length", 77))
        if clip_weights is None:
            model = build()
            _random_init_warning(arch)
            weights_id = "random"
        else:
            path = Path(clip_weights)
            if not path.is_file():
                raise FileNotFoundError(f"clip_weights file not found: {path} (a custom config needs a local file)")
            model = _build_and_load(build, path)
            weights_id = f"sha256:{file_sha256(path)}"
        open_clip.set_model_preprocess_cfg(
            model, {"mean": OPENAI_MEAN, "std": OPENAI_STD, "size": model.visual.image_size}
        )
    elif not isinstance(clip, str):
        raise TypeError(f"clip must be a model name, 'local-dir:PATH' or a config dict, got {type(clip).__name__}")
    elif clip.startswith(LOCAL_DIR_PREFIX):
        folder = Path(clip[len(LOCAL_DIR_PREFIX) :])
        if clip_weights is not None:
            raise ValueError(f"clip_weights must be None with {clip!r}: the folder carries its own weights")
        config_path = folder / "open_clip_config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{clip!r}: expected {config_path} (open_clip's local-dir layout)")
        weights_path = _local_dir_weights(folder)
        if weights_path is None:
            raise FileNotFoundError(f"{clip!r}: no weights file (open_clip_model.safetensors, ...) in {folder}")
        model_cfg = _read_local_config(config_path)
        if weights_path.suffix == ".safetensors":
            check_safetensors(weights_path)
        try:
            with _quiet_open_clip():
                model = _fast_load(
                    lambda device: open_clip.create_model(clip, load_weights=False, device=device), weights_path
                )
                if model is None:
                    model = open_clip.create_model(clip, weights_only=True)
        except (RuntimeError, ValueError, KeyError) as error:  # open_clip's load of a file that does not fit
            message = " ".join(str(error).split())[:400]
            raise ValueError(f"{clip!r}: open_clip cannot build the model from {weights_path}: {message}") from error
        tokenizer = open_clip.get_tokenizer(clip)
        arch = f"custom-{config_digest(model_cfg)}"
        weights_id = f"sha256:{file_sha256(weights_path)}"
    else:
        model_cfg = open_clip.get_model_config(clip)
        if model_cfg is None:
            raise ValueError(f"unknown open_clip model {clip!r}; see open_clip.list_models()")
        arch = clip

        def build(device: str = "cpu") -> nn.Module:
            with _quiet_open_clip():
                return open_clip.create_model(clip, pretrained=None, device=device)

        if clip_weights is None:
            model = build()
            _random_init_warning(arch)
            weights_id = "random"
        elif Path(clip_weights).is_file():
            model = _build_and_load(build, Path(clip_weights))
            weights_id = f"sha256:{file_sha256(clip_weights)}"
        elif os.path.exists(clip_weights):
            raise ValueError(f"clip_weights {clip_weights} is not a regular file")
        else:
            tag = str(clip_weights)
            if tag not in open_clip.list_pretrained_tags_by_model(clip) and (os.sep in tag or "." in tag):
                raise FileNotFoundError(f"clip_weights file not found: {tag}")
            settings = pretrained_settings(clip, tag)  # before any download: an unknown tag fails at once
            checkpoint = _fetch_pretrained(clip, tag, settings)
            if checkpoint.suffix == ".safetensors":
                check_safetensors(checkpoint)
            quick_gelu = bool(settings.get("quick_gelu", False))
            preprocess = {key: settings[key] for key in PREPROCESS_KEYS if settings.get(key) is not None}
            # A file path as ``pretrained`` takes no settings from a tag: the forced ones below are all there are,
            # so the model built empty (pretrained=None) is the one open_clip builds around the file.
            options = {"force_quick_gelu": quick_gelu, "force_preprocess_cfg": preprocess}
            try:
                with _quiet_open_clip():
                    model = _fast_load(
                        lambda device: open_clip.create_model(clip, pretrained=None, device=device, **options),
                        checkpoint,
                        digest=False,
                    )
                    if model is None:
                        model = open_clip.create_model(
                            clip, pretrained=str(checkpoint), weights_only=True, require_pretrained=True, **options
                        )
            except (RuntimeError, ValueError, KeyError) as error:
                message = " ".join(str(error).split())[:400]
                raise ValueError(f"open_clip cannot load {checkpoint} (tag {tag!r} of {clip}): {message}") from error
            if quick_gelu:
                model_cfg = {**model_cfg, "quick_gelu": True}
            arch = _identity_of_tag(clip, tag, settings)
            weights_id = tag
        tokenizer = open_clip.get_tokenizer(clip)
    return ClipBackbone(model, tokenizer, ClipIdentity(arch, weights_id), model_cfg)


# --- construction without random init: the weights file's tensors assigned to a model built on the meta device ----


def _build_and_load(build: Callable[[str], nn.Module], path: Path) -> nn.Module:
    """``build()`` with the weights of ``path`` (our own loading: a model name or config with a local file): built
    empty and assigned when the file fits exactly (:func:`build_assigned`), else built, randomly initialised and loaded
    the plain way (:func:`_load_into`), whose errors say what does not fit."""
    state = _read_state_dict(path)
    model = build_assigned(build, state)
    if model is None:
        model = build("cpu")
        _load_into(model, path, state)
    return model


def _fast_load(build: Callable[[str], nn.Module], path: Path, *, digest: bool = True) -> nn.Module | None:
    """The model open_clip would build and load from ``path`` (a ``local-dir:`` folder's file, a tag's download),
    built empty and assigned, when the file is one ``open_clip.load_checkpoint`` loads as it is (its keys and
    shapes are the model's: its conversions and resizes change nothing then); None otherwise, and for files
    this cannot read, so that open_clip's own loading runs and reports."""
    if path.suffix not in (".safetensors", ".bin", ".pt", ".pth"):
        return None
    try:
        state = _read_state_dict(path, digest=digest)
    except ValueError as error:
        logger.debug("%s: not read here (%s); open_clip loads it", path, error)
        return None
    return build_assigned(build, state)


def build_assigned(build: Callable[[str], nn.Module], state: dict[str, torch.Tensor]) -> nn.Module | None:
    """``build("meta")`` run on the meta device (modules and shapes; no memory, no random init of 150M
    parameters that the weights would overwrite), then ``state``'s tensors assigned as its parameters and
    buffers (no copy), in the model's dtypes, and the non-persistent buffers it needs rebuilt
    (:func:`_rebuild_buffers`). Equal, tensor for tensor, to ``build("cpu")`` + ``load_state_dict(state)``
    (tests/test_backbone.py holds it to that).

    None, for the plain way, when ``state`` is not exactly the model's (keys, shapes), when the model cannot
    be built on the meta device, or when it keeps a tensor this does not know how to rebuild.
    """
    try:
        with torch.device("meta"), _MetaShortcuts():
            model = build("meta")
    except Exception as error:  # a tower that cannot be built without memory (the plain way will say if it is ours)
        logger.debug("building on the meta device failed (%s); built the plain way", error)
        return None
    own = model.state_dict(keep_vars=True)
    if own.keys() != state.keys() or any(own[name].shape != state[name].shape for name in own):
        return None
    model.load_state_dict(_owned(state, own), strict=True, assign=True)
    return model if _rebuild_buffers(model) else None


#: In-place ops that :class:`_MetaShortcuts` answers on a meta tensor with the tensor itself (random fills, ``nn.init``
#: ones included, and the causal mask's ``triu_``): in place, on meta, they change no shape, dtype or device.
_META_IN_PLACE = frozenset({
    "uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
    "xavier_normal_", "orthogonal_", "bernoulli_", "exponential_", "random_", "cauchy_", "log_normal_",
    "geometric_", "triu_", "tril_",
})  # fmt: skip
#: Random factories that :class:`_MetaShortcuts` makes as ``torch.empty`` when the result lands on the meta device.
_META_FACTORIES = frozenset({"randn", "rand"})
#: Elementwise products and sums that :class:`_MetaShortcuts` answers as ``torch.empty`` of the broadcast shape and
#: the promoted dtype (``torch.result_type``) when a meta tensor is among their operands.
_META_ELEMENTWISE = frozenset({"mul", "__mul__", "__rmul__", "add", "__add__", "__radd__"})


class _MetaShortcuts(TorchFunctionMode):
    """While a model is built on the meta device: the few ops open_clip's constructors run on meta tensors, answered
    with what they give there.

    A meta tensor has a shape, a dtype and no values. Torch computes random fills, ``triu_`` and elementwise
    arithmetic on meta through Python decompositions whose first call imports ``torch._dynamo`` (with sympy: about
    1.5 s of a one-image ``pacl-fast segment`` on a 2-core CPU), although they compute no values. Here: an in-place
    op of :data:`_META_IN_PLACE` on a meta tensor returns the tensor; a random factory of :data:`_META_FACTORIES`
    whose result lands on meta is ``torch.empty`` of the same size and options; a product or sum of
    :data:`_META_ELEMENTWISE` with a meta operand is ``torch.empty`` of ``torch.broadcast_shapes`` and
    ``torch.result_type`` on meta: the same shapes, dtypes and devices torch gives. Anything else (and any call
    with ``out=`` or a generator) runs as it is, and tests/test_backbone.py holds a model built this way to one
    built without it.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's protocol
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _META_IN_PLACE:
            target = args[0] if args else kwargs.get("tensor")  # nn.init's functions pass it by name
            if isinstance(target, torch.Tensor) and target.is_meta:
                return target
        if name in _META_FACTORIES and args and not {"out", "generator", "size"} & kwargs.keys():
            size = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)) else args
            if all(isinstance(n, int) for n in size):
                options = ("dtype", "layout", "device", "requires_grad", "pin_memory")
                made = torch.empty(tuple(size), **{key: kwargs[key] for key in options if key in kwargs})
                if made.is_meta:
                    return made
        if name in _META_ELEMENTWISE and not kwargs and len(args) == 2 and _meta_operands(args):
            tensors = [x for x in args if isinstance(x, torch.Tensor)]
            shape = _broadcast_shape([tuple(x.shape) for x in tensors])
            if shape is not None:
                dtype = torch.result_type(*args)
                grad = torch.is_grad_enabled() and any(x.requires_grad for x in tensors)
                return torch.empty(shape, dtype=dtype, device="meta", requires_grad=grad and dtype.is_floating_point)
        return func(*args, **kwargs)


def _broadcast_shape(shapes: list[tuple[int, ...]]) -> tuple[int, ...] | None:
    """The shape ``shapes`` broadcast to (torch's rule), or None when they do not broadcast. (Not
    ``torch.broadcast_shapes``: it imports sympy, 0.2 s.)"""
    out: list[int] = []
    for dims in zip(*(((1,) * (max(map(len, shapes)) - len(shape)) + shape) for shape in shapes)):
        sizes = {n for n in dims if n != 1}
        if len(sizes) > 1:
            return None
        out.append(sizes.pop() if sizes else 1)
    return tuple(out)


def _meta_operands(args: tuple) -> bool:
    """Two operands: tensors on the meta device and Python numbers, at least one of them a tensor."""
    tensors = [x for x in args if isinstance(x, torch.Tensor)]
    numbers_ok = all(isinstance(x, (torch.Tensor, int, float)) for x in args)  # bool is an int, numpy.float64 a float
    return bool(tensors) and numbers_ok and all(x.is_meta for x in tensors)


def _owned(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` as the model's tensors: in their dtypes (what ``copy_`` into them would round to: fp16
    checkpoints become fp32), contiguous, and each in storage of its own (a view of a larger or shared storage
    from a torch file is copied out, so that no tensor keeps another's bytes alive or aliases it)."""
    seen: set[int] = set()
    owned = {}
    for name, value in state.items():
        tensor = value.to(own[name].dtype)
        storage = tensor.untyped_storage()
        if tensor is value and (
            not tensor.is_contiguous()
            or storage.data_ptr() in seen
            or storage.nbytes() != tensor.numel() * tensor.element_size()
        ):
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        seen.add(tensor.untyped_storage().data_ptr())
        owned[name] = tensor.detach()
    return owned


#: open_clip modules whose non-persistent ``attn_mask`` is the text tower's causal mask.
_CAUSAL_MASK_OWNERS = (open_clip.CLIP, TextTransformer)


def _rebuild_buffers(model: nn.Module) -> bool:
    """Fill the tensors a meta-built model does not get from its weights file: open_clip's non-persistent causal
    masks, computed by open_clip's own ``build_causal_mask``. False when anything else is still on the meta
    device (a buffer or attribute of a tower this does not know)."""
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is None or not buffer.is_meta:
                continue
            square = buffer.ndim == 2 and buffer.shape[0] == buffer.shape[1]
            if name != "attn_mask" or not isinstance(module, _CAUSAL_MASK_OWNERS) or not square:
                return False
            mask = TextTransformer.build_causal_mask(types.SimpleNamespace(num_pos=buffer.shape[0]))
            module._buffers[name] = mask.to(buffer.dtype)
        if any(isinstance(value, torch.Tensor) and value.is_meta for value in vars(module).values()):
            return False
    return not any(tensor.is_meta for tensor in (*model.parameters(), *model.buffers()))


def _read_local_config(path: Path) -> dict[str, Any]:
    """The ``model_cfg`` of a ``local-dir:`` folder's ``open_clip_config.json``, checked to be one."""
    try:
        config = json.loads(read_regular_bytes(path, MAX_CONFIG_BYTES))
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not an open_clip config (JSON with a 'model_cfg'): {error}") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_cfg"), dict):
        raise ValueError(f"{path} has no 'model_cfg' object (open_clip's local-dir layout)")
    return config["model_cfg"]


def _load_into(model: nn.Module, path: Path, state: dict[str, torch.Tensor] | None = None) -> None:
    """``state`` (else the file's tensors) copied into ``model``; ValueError naming ``path`` when they do not fit."""
    state = _read_state_dict(path) if state is None else state
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "logit_bias"]
    if missing or unexpected:
        raise ValueError(
            f"CLIP checkpoint {path} does not fit this architecture: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
