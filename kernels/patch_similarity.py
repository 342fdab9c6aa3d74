"""Triton: PACL's vision embedder + L2 norm + cosine with the class embeddings, ``[M, D] -> [M, C]``.

``v = W_lin x + W_2 GELU(W_1 x + b_1) + b_2``; logits ``= <v / |v|, t_c>`` for unit class
embeddings ``t_c``. Two variants, because which is faster depends on the GPU and the shapes and
has not been measured yet (no GPU in the session that wrote this; ``benchmarks/head.py`` times
both on CUDA, and the slower one should then go):

* ``"fused"``: one kernel per block of tokens; the hidden activations and ``v`` live in
  registers, only ``[M, C]`` logits are written.
* ``"cublas"``: the two GEMMs through torch (cuBLAS), then :func:`cosine_similarity`, a Triton
  epilogue that normalises ``v`` and multiplies with the classes in one pass. It writes ``h`` and
  ``v`` (``2 * M * E`` half floats) but gets cuBLAS's tuned GEMMs.

Inputs are float32, float16 or bfloat16, with float32 accumulation. Float32 operands use IEEE
products (not TF32) so that float32 results hold to 1e-4. The cosine itself is always a float32
IEEE product of the normalised embedding with the classes: at logit scale 100 a 1e-3 error in a
cosine moves a softmax score by 10%, and ``E * C`` per token is small next to the embedder.
Half operands of the embedder's GEMMs go to the tensor cores as they are; under the Triton
interpreter bfloat16 operands are cast to float32 before ``tl.dot`` because triton 3.8's
interpreter returns garbage for bfloat16 dots (float16 and float32 are exact).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels._triton import interpreting, launchable, next_power_of_2

VARIANTS = ("fused", "cublas")
_DOT_TYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@dataclass(frozen=True)
class EmbedderWeights:
    """The tensors of ``pacl_fast.model.VisionEmbedder`` (``linear`` has no bias)."""

    linear: torch.Tensor  # [E, D]
    fc1: torch.Tensor  # [Hd, D]
    fc1_bias: torch.Tensor  # [Hd]
    fc2: torch.Tensor  # [E, Hd]
    fc2_bias: torch.Tensor  # [E]

    @classmethod
    def from_module(cls, embedder: torch.nn.Module) -> EmbedderWeights:
        """From any module with ``linear``, ``fc1``, ``fc2`` ``nn.Linear`` children (no import of pacl_fast)."""
        return cls(
            embedder.linear.weight.detach(),
            embedder.fc1.weight.detach(),
            embedder.fc1.bias.detach(),
            embedder.fc2.weight.detach(),
            embedder.fc2.bias.detach(),
        )

    def check(self, token_dim: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int]:
        """Shapes, dtype and device against the tokens; returns ``(hidden, embed)`` widths."""
        embed_dim, hidden_dim = self.linear.shape[0], self.fc1.shape[0]
        expected = {
            "linear": (embed_dim, token_dim),
            "fc1": (hidden_dim, token_dim),
            "fc1_bias": (hidden_dim,),
            "fc2": (embed_dim, hidden_dim),
            "fc2_bias": (embed_dim,),
        }
        for name, shape in expected.items():
            tensor = getattr(self, name)
            if tuple(tensor.shape) != shape:
                raise ValueError(f"embedder weight {name} must be {list(shape)}, got {list(tensor.shape)}")
            if tensor.dtype != dtype or tensor.device != device:
                raise ValueError(
                    f"embedder weight {name} is {tensor.dtype} on {tensor.device}; tokens are {dtype} on {device}"
                )
        return hidden_dim, embed_dim


@triton.jit
def _accumulate_tokens_times_weight(
    acc,  # [BM, BN] float32
    token_rows,  # [BM, 1] pointers to the rows' first token element
    row_inside,  # [BM]
    weight_ptr,  # [N, D]: acc += x @ W[n]^T over the columns n of this block
    n,  # [BN] int
    n_inside,  # [BN]
    token_dim,
    BLOCK_K: tl.constexpr,
    DOT_TYPE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``acc + x @ W^T`` for a block of token rows and a block of W's rows, over all of D."""
    for k0 in range(0, token_dim, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_inside = k < token_dim
        x = tl.load(token_rows + k[None, :], mask=row_inside[:, None] & k_inside[None, :], other=0.0)
        w = tl.load(
            weight_ptr + n[None, :] * token_dim + k[:, None], mask=k_inside[:, None] & n_inside[None, :], other=0.0
        )
        acc = tl.dot(x.to(DOT_TYPE), w.to(DOT_TYPE), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _store_cosines(
    embedding,  # [BM, BE] float32
    rows,
    row_inside,
    e,
    e_inside,
    classes_ptr,  # [C, E] float32, unit rows
    out_ptr,  # [M, C] float32
    embed_dim,
    num_classes,
    BLOCK_C: tl.constexpr,
):
    """Both kernels' epilogue: each row's embedding L2-normalised (F.normalize's eps), its cosine with
    every class stored, ``BLOCK_C`` classes at a time."""
    norm = tl.sqrt(tl.sum(embedding * embedding, axis=1))
    unit = embedding / tl.maximum(norm, 1e-12)[:, None]  # [BM, BE]
    out_rows = out_ptr + rows.to(tl.int64)[:, None] * num_classes
    for c0 in range(0, num_classes, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_inside = c < num_classes
        classes = tl.load(
            classes_ptr + c[None, :] * embed_dim + e[:, None], mask=e_inside[:, None] & c_inside[None, :], other=0.0
        )
        logits = tl.dot(unit, classes, input_precision="ieee")  # [BM, BC], float32 products
        tl.store(out_rows + c[None, :], logits, mask=row_inside[:, None] & c_inside[None, :])


@triton.jit
def _embed_similarity(
    tokens_ptr,  # [M, D]
    linear_ptr,  # [E, D]
    fc1_ptr,  # [Hd, D]
    fc1_bias_ptr,  # [Hd]
    fc2_ptr,  # [E, Hd]
    fc2_bias_ptr,  # [E]
    classes_ptr,  # [C, E] float32, unit rows
    out_ptr,  # [M, C] float32
    num_rows,
    token_dim,
    hidden_dim,
    embed_dim,
    num_classes,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_C: tl.constexpr,
    DOT_TYPE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_inside = rows < num_rows
    token_rows = tokens_ptr + rows.to(tl.int64)[:, None] * token_dim  # [BM, 1]
    e = tl.arange(0, BLOCK_E)
    e_inside = e < embed_dim
    embedding = tl.full((BLOCK_M, BLOCK_E), 0.0, tl.float32)

    # Linear path: x @ W_lin^T
    embedding = _accumulate_tokens_times_weight(
        embedding, token_rows, row_inside, linear_ptr, e, e_inside, token_dim, BLOCK_K, DOT_TYPE, PRECISION
    )

    # MLP path, one block of hidden units at a time: GELU(x @ W_1^T + b_1) @ W_2^T
    for h0 in range(0, hidden_dim, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        h_inside = h < hidden_dim
        hidden = tl.full((BLOCK_M, BLOCK_H), 0.0, tl.float32)
        hidden = _accumulate_tokens_times_weight(
            hidden, token_rows, row_inside, fc1_ptr, h, h_inside, token_dim, BLOCK_K, DOT_TYPE, PRECISION
        )
        hidden += tl.load(fc1_bias_ptr + h, mask=h_inside, other=0.0).to(tl.float32)[None, :]
        gelu = 0.5 * hidden * (1.0 + tl.math.erf(hidden * 0.7071067811865476))  # exact GELU, as F.gelu
        w2 = tl.load(
            fc2_ptr + e[None, :] * hidden_dim + h[:, None], mask=h_inside[:, None] & e_inside[None, :], other=0.0
        )
        embedding = tl.dot(gelu.to(DOT_TYPE), w2.to(DOT_TYPE), embedding, input_precision=PRECISION)
    embedding += tl.load(fc2_bias_ptr + e, mask=e_inside, other=0.0).to(tl.float32)[None, :]

    # Epilogue: L2 norm (F.normalize's eps) and cosine with the classes.
    _store_cosines(embedding, rows, row_inside, e, e_inside, classes_ptr, out_ptr, embed_dim, num_classes, BLOCK_C)


@triton.jit
def _cosine(
    embeddings_ptr,  # [M, E]
    classes_ptr,  # [C, E] float32, unit rows
    out_ptr,  # [M, C] float32
    num_rows,
    embed_dim,
    num_classes,
    BLOCK_M: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_inside = rows < num_rows
    e = tl.arange(0, BLOCK_E)
    e_inside = e < embed_dim
    inside = row_inside[:, None] & e_inside[None, :]
    embedding = tl.load(embeddings_ptr + rows.to(tl.int64)[:, None] * embed_dim + e[None, :], mask=inside, other=0.0)
    embedding = embedding.to(tl.float32)
    _store_cosines(embedding, rows, row_inside, e, e_inside, classes_ptr, out_ptr, embed_dim, num_classes, BLOCK_C)


def _blocks(embed_dim: int, num_classes: int, dot_type) -> dict:  # noqa: ANN001 - a triton dtype
    """Block sizes: a [BLOCK_M, BLOCK_E] fp32 accumulator of 16K elements (64 registers a thread
    at 8 warps) and operand tiles (``[BLOCK_K, BLOCK_E]``, ``[BLOCK_E, BLOCK_C]``) of at most
    32 KiB each, so that two pipeline stages fit in shared memory."""
    block_e = max(16, next_power_of_2(embed_dim))
    tile = 32768 // (block_e * (4 if dot_type == tl.float32 else 2))  # rows of a 32 KiB operand tile
    return {
        "BLOCK_M": max(16, min(64, 16384 // block_e)),
        "BLOCK_E": block_e,
        "BLOCK_K": max(16, min(32, tile)),
        "BLOCK_C": max(16, min(64, 32768 // (block_e * 4), next_power_of_2(num_classes))),  # fp32 classes
        "num_warps": 8 if block_e >= 256 else 4,
        "num_stages": 2,
    }


def _dot_type(dtype: torch.dtype):  # noqa: ANN202 - a triton dtype
    """Operand type of ``tl.dot`` for inputs of ``dtype`` (see the module docstring)."""
    if dtype == torch.bfloat16 and interpreting():
        return tl.float32
    return _DOT_TYPES[dtype]


def _unit_classes(class_embeddings: torch.Tensor, embed_dim: int, device: torch.device) -> torch.Tensor:
    if class_embeddings.ndim != 2 or class_embeddings.shape[1] != embed_dim:
        raise ValueError(f"class_embeddings must be [C, {embed_dim}], got {list(class_embeddings.shape)}")
    if class_embeddings.shape[0] < 1:
        raise ValueError("class_embeddings is empty: need at least one class")
    return F.normalize(class_embeddings.to(device, torch.float32), dim=-1).contiguous()  # [C, E]


def _check_float(name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype not in _DOT_TYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {tensor.dtype}")


def _output(out: torch.Tensor | None, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=torch.float32, device=device)
    if tuple(out.shape) != shape or out.dtype != torch.float32 or out.device != device or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous float32 {list(shape)} tensor on {device}, got {out.dtype} {list(out.shape)}"
        )
    return out


def cosine_similarity(
    embeddings: torch.Tensor, class_embeddings: torch.Tensor, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``[..., E] x [C, E] -> [..., C]`` float32 cosines, in one pass (norm + matmul fused).

    ``kernels.reference.patch_logits`` is the reference.
    """
    _check_float("embeddings", embeddings)
    embed_dim = embeddings.shape[-1]
    classes = _unit_classes(class_embeddings, embed_dim, embeddings.device)
    flat = embeddings.reshape(-1, embed_dim).contiguous()  # [M, E]
    num_rows, num_classes = flat.shape[0], classes.shape[0]
    logits = _output(out, (*embeddings.shape[:-1], num_classes), embeddings.device)
    blocks = _blocks(embed_dim, num_classes, tl.float32)
    del blocks["BLOCK_K"]
    launchable(_cosine, embeddings.device)[(triton.cdiv(num_rows, blocks["BLOCK_M"]),)](
        flat, classes, logits, num_rows, embed_dim, num_classes, **blocks
    )
    return logits


def embed_torch(tokens: torch.Tensor, weights: EmbedderWeights) -> torch.Tensor:
    """The embedder through torch's GEMMs (cuBLAS on CUDA): ``[M, D] -> [M, E]`` in the tokens' dtype."""
    hidden = F.gelu(torch.addmm(weights.fc1_bias, tokens, weights.fc1.T))  # [M, Hd]
    return torch.addmm(weights.fc2_bias, hidden, weights.fc2.T).addmm_(tokens, weights.linear.T)  # [M, E]


def patch_similarity(
    tokens: torch.Tensor,
    weights: EmbedderWeights,
    class_embeddings: torch.Tensor,
    *,
    variant: str = "fused",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """CLIP patch tokens -> cosine logits with the classes, through PACL's embedder.

    Args:
        tokens: ``[..., D]`` (e.g. ``[B, N, D]``), float32/float16/bfloat16.
        weights: the embedder's tensors, same dtype and device as ``tokens``.
        class_embeddings: ``[C, E]`` (normalised here, in float32).
        variant: ``"fused"`` or ``"cublas"`` (see the module docstring).
        out: optional float32 ``[..., C]`` to write into.
    Returns:
        ``[..., C]`` float32; ``kernels.reference.embedder_logits`` is the reference.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    _check_float("tokens", tokens)
    token_dim = tokens.shape[-1]
    hidden_dim, embed_dim = weights.check(token_dim, tokens.dtype, tokens.device)
    flat = tokens.reshape(-1, token_dim).contiguous()  # [M, D]
    if variant == "cublas":
        embeddings = embed_torch(flat, weights).view(*tokens.shape[:-1], embed_dim)
        return cosine_similarity(embeddings, class_embeddings, out=out)
    classes = _unit_classes(class_embeddings, embed_dim, tokens.device)
    num_rows, num_classes = flat.shape[0], classes.shape[0]
    logits = _output(out, (*tokens.shape[:-1], num_classes), tokens.device)
    dot_type = _dot_type(tokens.dtype)
    blocks = _blocks(embed_dim, num_classes, dot_type)
    launchable(_embed_similarity, tokens.device)[(triton.cdiv(num_rows, blocks["BLOCK_M"]),)](
        flat,
        weights.linear.contiguous(),
        weights.fc1.contiguous(),
        weights.fc1_bias.contiguous(),
        weights.fc2.contiguous(),
        weights.fc2_bias.contiguous(),
        classes,
        logits,
        num_rows,
        token_dim,
        hidden_dim,
        embed_dim,
        num_classes,
        BLOCK_H=blocks["BLOCK_K"],  # [BLOCK_H, BLOCK_E] tiles of W_2, as large as those of W_lin
        DOT_TYPE=dot_type,
        PRECISION="ieee" if dot_type == tl.float32 else "tf32",
        **blocks,
    )
    return logits
