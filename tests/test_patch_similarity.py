"""``kernels/patch_similarity.py`` (embedder + L2 norm + cosine, Triton) held to ``kernels/reference.py``.

Which path each test proves:

* float32 and float16 cases under the Triton interpreter (CPU, ``TRITON_INTERPRET=1`` from
  ``conftest.py``) run the kernels' code as written: ``tl.dot`` on fp32 / fp16 operands with fp32
  accumulation, the fp16 rounding of the GELU output before the second GEMM included.
* bfloat16 cases under the interpreter prove the *cast-to-float32 operand* path: triton 3.8's
  interpreter returns garbage for ``tl.dot`` on bf16 operands, so the kernels cast bf16 tiles to
  fp32 before the dot when interpreting. The bf16 tensor-core path (bf16 operands, fp32
  accumulation) is proven only by the ``gpu``-marked tests, which ``benchmarks/gpu_check.sh`` runs.

Outputs are poisoned (NaN) before each call. Tolerances on cosines are per dtype and variant, a small
factor above what is measured on these cases (``TOLERANCE``); the compiled kernels keep looser ones
until a GPU run measures them (``CUDA_TOLERANCE``).
"""

from __future__ import annotations

import pytest
import torch

from kernels.reference import embedder_logits, patch_logits
from pacl_fast.head import Head
from pacl_fast.model import VisionEmbedder

try:
    from kernels._triton import interpreting
    from kernels.patch_similarity import EmbedderWeights, cosine_similarity, patch_similarity
except ImportError:  # no triton installed
    interpreting = None

HAS_TRITON = interpreting is not None
needs_interpreter = pytest.mark.skipif(
    not HAS_TRITON or not interpreting(),
    reason="Triton interpreter not active in this process (conftest sets TRITON_INTERPRET=1 without CUDA)",
)


def cuda_test(test):
    """Marks a test of the compiled kernels: needs CUDA, and triton not in interpreter mode."""
    for mark in (
        pytest.mark.gpu,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        pytest.mark.skipif(not HAS_TRITON or interpreting(), reason="no triton, or TRITON_INTERPRET=1"),
    ):
        test = mark(test)
    return test


# Under the interpreter, (dtype, variant) -> atol on cosines. Largest error measured over CASES (triton 3.8,
# torch 2.14 CPU), then the tolerance about 4x above it:
# * fp32: 1.8e-7 (both variants): float32 operands, IEEE products.
# * fp16 fused: 1.4e-4: fp16 operands, the GELU output rounded to fp16 before the second GEMM.
# * fp16 cublas: 2.5e-4: torch's fp16 GEMMs round h and v to fp16 as well.
# * bf16 fused: 2.4e-7: the interpreter casts bf16 tiles to fp32 before tl.dot, so only the inputs are bf16.
# * bf16 cublas: 3.1e-3: torch's bf16 GEMMs round h and v to bf16 (8 bits of mantissa).
TOLERANCE = {
    (torch.float32, "fused"): 1e-6,
    (torch.float32, "cublas"): 1e-6,
    (torch.float16, "fused"): 5e-4,
    (torch.float16, "cublas"): 1e-3,
    (torch.bfloat16, "fused"): 1e-6,
    (torch.bfloat16, "cublas"): 1e-2,
}
# Compiled kernels on CUDA: not measured yet (no GPU where this was written); bf16 tensor-core dots round the
# GELU output to bf16, so the fused bf16 error there is that of the cublas variant, not the interpreter's.
CUDA_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# (B, h, w, D, hidden, E, C): grids 1x1 .. 40x30, widths that are not multiples of any block.
CASES = [
    (1, 1, 1, 8, 12, 8, 1),
    (3, 2, 5, 24, 40, 20, 7),
    (2, 7, 3, 40, 50, 33, 300),
    (1, 40, 30, 16, 16, 16, 3),
    (2, 13, 11, 72, 24, 40, 21),
    (1, 9, 14, 33, 65, 17, 150),
    (3, 1, 6, 48, 48, 48, 171),
    (1, 5, 1, 100, 36, 70, 2),
    (2, 4, 4, 20, 80, 24, 64),
    (1, 17, 13, 12, 20, 36, 9),
    (1, 3, 3, 130, 10, 12, 45),
    (2, 6, 9, 28, 28, 28, 250),
    (1, 2, 2, 64, 64, 64, 1),
    (3, 3, 7, 9, 17, 65, 13),
    (1, 11, 5, 56, 30, 18, 99),
    (2, 8, 6, 40, 120, 40, 5),
    (1, 1, 23, 24, 24, 96, 37),
    (1, 12, 12, 18, 33, 10, 200),
    (2, 5, 7, 80, 16, 50, 16),
    (1, 19, 2, 36, 44, 22, 130),
    (3, 4, 5, 15, 15, 15, 290),
]


def make_inputs(index: int) -> tuple[torch.Tensor, EmbedderWeights, torch.Tensor, torch.dtype]:
    batch, h, w, token_dim, hidden_dim, embed_dim, classes = CASES[index]
    dtype = DTYPES[index % 3]
    generator = torch.Generator().manual_seed(2000 + index)

    def randn(*shape: int, scale: float) -> torch.Tensor:
        return (scale * torch.randn(*shape, generator=generator)).to(dtype)

    weights = EmbedderWeights(
        linear=randn(embed_dim, token_dim, scale=token_dim**-0.5),
        fc1=randn(hidden_dim, token_dim, scale=token_dim**-0.5),
        fc1_bias=randn(hidden_dim, scale=0.1),
        fc2=randn(embed_dim, hidden_dim, scale=hidden_dim**-0.5),
        fc2_bias=randn(embed_dim, scale=0.1),
    )
    tokens = randn(batch, h * w, token_dim, scale=1.0)  # [B, N, D]
    class_embeddings = torch.randn(classes, embed_dim, generator=generator)
    return tokens, weights, class_embeddings, dtype


def reference_of(tokens: torch.Tensor, weights: EmbedderWeights, class_embeddings: torch.Tensor) -> torch.Tensor:
    cpu = [t.cpu() for t in (tokens, weights.linear, weights.fc1, weights.fc1_bias, weights.fc2, weights.fc2_bias)]
    return embedder_logits(*cpu, class_embeddings.cpu())


def check(index: int, variant: str, device: str) -> None:
    tokens, weights, class_embeddings, dtype = make_inputs(index)
    want = reference_of(tokens, weights, class_embeddings)  # [B, N, C]
    on_device = EmbedderWeights(*(t.to(device) for t in vars(weights).values()))
    out = torch.full(want.shape, float("nan"), device=device)
    got = patch_similarity(tokens.to(device), on_device, class_embeddings.to(device), variant=variant, out=out)
    assert got is out and got.dtype == torch.float32
    assert torch.isfinite(got).all(), "unwritten outputs"
    atol = CUDA_TOLERANCE[dtype] if device == "cuda" else TOLERANCE[dtype, variant]
    torch.testing.assert_close(got.cpu(), want, atol=atol, rtol=0)


@needs_interpreter
@pytest.mark.parametrize("variant", ["fused", "cublas"])
@pytest.mark.parametrize("index", range(len(CASES)), ids=lambda i: "x".join(map(str, CASES[i])))
def test_patch_similarity_matches_reference(index, variant):
    check(index, variant, "cpu")


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES)
def test_cosine_similarity_matches_patch_logits(dtype):
    generator = torch.Generator().manual_seed(9)
    embeddings = torch.randn(2, 7, 5, 40, generator=generator).to(dtype)
    classes = torch.randn(33, 40, generator=generator)
    out = torch.full((2, 7, 5, 33), float("nan"))
    got = cosine_similarity(embeddings, classes, out=out)
    assert got is out
    # float32 products whatever the input dtype: as exact as the reference, which upcasts first (measured
    # 1.5e-7 at most).
    torch.testing.assert_close(got, patch_logits(embeddings, classes), atol=1e-6, rtol=0)


@needs_interpreter
def test_head_embed_similarity_uses_the_vision_embedder():
    """Head("triton").embed_similarity on a real VisionEmbedder equals the reference backend's."""
    torch.manual_seed(0)
    embedder = VisionEmbedder(token_dim=24, embed_dim=20, hidden_dim=36)
    torch.nn.init.normal_(embedder.fc2.weight, std=0.1)  # the MLP branch starts silent; wake it
    tokens, classes = torch.randn(2, 6, 5, 24), torch.randn(11, 20)
    with torch.no_grad():
        want = Head("reference").embed_similarity(tokens, embedder, classes)
        got = Head("triton").embed_similarity(tokens, embedder, classes)
        direct = patch_logits(embedder(tokens), classes)
    assert got.shape == (2, 6, 5, 11)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)  # fp32: measured 1.2e-7
    torch.testing.assert_close(want, direct, atol=1e-6, rtol=0)  # the same float32 ops: measured 0


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_mismatched_weights_are_named():
    tokens, weights, classes, _ = make_inputs(0)
    bad = EmbedderWeights(weights.linear, weights.fc1, weights.fc1_bias, weights.fc2.T.contiguous(), weights.fc2_bias)
    with pytest.raises(ValueError, match=r"embedder weight fc2 must be \[8, 12\]"):
        patch_similarity(tokens, bad, classes)
    with pytest.raises(ValueError, match=r"class_embeddings must be \[C, 8\]"):
        patch_similarity(tokens, weights, torch.randn(3, 9))
    with pytest.raises(ValueError, match="variant must be one of"):
        patch_similarity(tokens, weights, classes, variant="magic")
    with pytest.raises(ValueError, match="embedder weight linear is torch.float16"):
        half = EmbedderWeights(*(t.half() for t in vars(weights).values()))
        patch_similarity(tokens, half, classes)


@cuda_test
@pytest.mark.parametrize("variant", ["fused", "cublas"])
@pytest.mark.parametrize("index", range(len(CASES)), ids=lambda i: "x".join(map(str, CASES[i])))
def test_cuda_patch_similarity_matches_reference(index, variant):
    """Compiled kernels, bf16 on tensor cores included."""
    check(index, variant, "cuda")


@cuda_test
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_patch_similarity_at_vit_b_scale(dtype):
    """ViT-B/16 widths (D=768, E=512) on 2 x 14 x 14 tokens, 150 classes."""
    generator = torch.Generator().manual_seed(1)
    weights = EmbedderWeights(
        *(
            (torch.randn(*shape, generator=generator) * scale).to(dtype).cuda()
            for shape, scale in (
                ((512, 768), 0.036),
                ((512, 768), 0.036),
                ((512,), 0.1),
                ((512, 512), 0.044),
                ((512,), 0.1),
            )
        )
    )
    tokens = torch.randn(2, 196, 768, generator=generator).to(dtype).cuda()
    classes = torch.randn(150, 512, generator=generator).cuda()
    want = reference_of(tokens, weights, classes)
    for variant in ("fused", "cublas"):
        got = patch_similarity(tokens, weights, classes, variant=variant)
        torch.testing.assert_close(got.cpu(), want, atol=CUDA_TOLERANCE[dtype], rtol=0)
