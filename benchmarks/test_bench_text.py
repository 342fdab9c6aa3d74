"""Micro-benchmarks of the text side (see benchmarks/conftest.py for how to run and compare).

Random-init open_clip ViT-B-16. Groups:

* the text tower on 32 prompts of one template (ADE20K names): open_clip's own tower at the full
  77 tokens (the baseline) against ``ClipBackbone.encode_text`` (each prompt up to its end-of-text
  token, what prompts share run once, packed into sequences), in fp32 and with bf16 text, and
  through onnxruntime;
* class embeddings of 8 labels x 10 templates: today's path (open_clip's tower in
  ``ensemble_text_embeddings``, the baseline) against ``TextEmbedder`` cold (an empty disk cache
  each round), warm from disk (a fresh embedder each round) and from its memory.

The full-benchmark counterpart, with 20 and 150 ADE20K names x 80 templates, cold in a new process, is
``python -m benchmarks.text``.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from pacl_fast.data.segmentation import ADE20K_CLASSES
from pacl_fast.encoders import EncoderUnavailableError, TorchEncoder, make_encoder
from pacl_fast.prompts import IMAGENET_TEMPLATES, TextEmbedder, ensemble_text_embeddings

PROMPTS = [f"a photo of the {name}." for name in ADE20K_CLASSES[:32]]
LABELS, TEMPLATES = list(ADE20K_CLASSES[:8]), IMAGENET_TEMPLATES[:10]


@pytest.mark.parametrize("path", ["open_clip 77 tokens", "truncated fp32", "truncated bf16", "onnxruntime"])
def test_text_tower(benchmark, model, tmp_path_factory, path: str) -> None:
    benchmark.group = f"text tower ViT-B-16, {len(PROMPTS)} prompts of one template"
    benchmark.extra_info["baseline"] = path == "open_clip 77 tokens"
    backbone = model.backbone
    tokens = backbone.tokenize(PROMPTS)
    if path == "open_clip 77 tokens":

        def run() -> torch.Tensor:
            with torch.inference_mode():
                return backbone.clip.encode_text(tokens, normalize=True)

    elif path == "onnxruntime":
        try:
            encoder = make_encoder("onnxruntime", model, cache_dir=tmp_path_factory.getbasetemp() / "text-onnx")
        except EncoderUnavailableError as error:
            pytest.skip(str(error))
        encoder.encode_text(tokens)  # export outside the timing
        run = lambda: encoder.encode_text(tokens)  # noqa: E731
    else:
        encoder = TorchEncoder(model, text_dtype=torch.bfloat16 if path.endswith("bf16") else torch.float32)
        run = lambda: encoder.encode_text(tokens)  # noqa: E731
    texts = benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    assert texts.shape == (len(PROMPTS), backbone.embed_dim)


@pytest.mark.parametrize("path", ["today", "cold", "warm disk", "memory"])
def test_class_embeddings(benchmark, model, tmp_path_factory, path: str) -> None:
    benchmark.group = f"class embeddings ViT-B-16, {len(LABELS)} labels x {len(TEMPLATES)} templates"
    benchmark.extra_info["baseline"] = path == "today"
    backbone, encoder = model.backbone, TorchEncoder(model)
    if path == "today":

        def today() -> torch.Tensor:
            with torch.inference_mode():
                encode = lambda p: backbone.clip.encode_text(backbone.tokenize(p), normalize=True)  # noqa: E731
                return ensemble_text_embeddings(encode, LABELS, TEMPLATES)

        embeddings = benchmark.pedantic(today, rounds=3, warmup_rounds=0)
    elif path == "cold":
        folders = (tmp_path_factory.mktemp("text-cold") for _ in itertools.count())

        def fresh() -> tuple[tuple, dict]:  # an empty disk cache each round, outside the timing
            return (TextEmbedder.for_model(backbone, encoder, cache_dir=next(folders), progress=False),), {}

        embeddings = benchmark.pedantic(lambda text: text(LABELS, TEMPLATES), setup=fresh, rounds=3)
    else:
        folder = tmp_path_factory.mktemp("text-warm")
        filled = TextEmbedder.for_model(backbone, encoder, cache_dir=folder, progress=False)
        filled(LABELS, TEMPLATES)
        if path == "memory":
            embeddings = benchmark(filled, LABELS, TEMPLATES)
        else:

            def fresh() -> tuple[tuple, dict]:  # a new embedder each round: nothing in memory
                return (TextEmbedder.for_model(backbone, encoder, cache_dir=folder, progress=False),), {}

            embeddings = benchmark.pedantic(lambda text: text(LABELS, TEMPLATES), setup=fresh, rounds=20)
    assert embeddings.shape == (len(LABELS), backbone.embed_dim)
