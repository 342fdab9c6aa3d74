"""The exact truncated text tower (``ClipBackbone.encode_text``) against open_clip's full-length one,
which towers may be truncated, the text precision option and the text tower through the encoders."""

from __future__ import annotations

import copy
import warnings

import open_clip
import pytest
import torch
import torch.nn.functional as F
from helpers import quiet_load_clip
from torch import nn

from pacl_fast import text_tower
from pacl_fast.backbone import ClipBackbone, ClipIdentity
from pacl_fast.demo import TINY_CLIP_CONFIG
from pacl_fast.encoders import EncoderUnavailableError, TorchEncoder, make_encoder
from pacl_fast.text_tower import PromptTruncatedWarning

EXACT = 0.99999  # cosine of the truncated tower to the full one (fp32)
LABELS = ["cat", "traffic light", "sky", "chest of drawers", "a", "swimming pool", "grass", "person"]


def min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.float(), b.float(), dim=-1).min().item()


_FULL: dict[tuple, torch.Tensor] = {}


def full_tower(backbone: ClipBackbone, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's own text tower at the full context length: the reference (kept per backbone and tokens)."""
    key = (id(backbone), tuple(map(tuple, tokens.tolist())))
    if key not in _FULL:
        with torch.no_grad():
            _FULL[key] = backbone.clip.encode_text(tokens, normalize=True)
    return _FULL[key]


def end_positions(tokens: torch.Tensor) -> list[int]:
    """Where the end-of-text token (the highest id, 49407) sits in each row, found by scanning."""
    return [next(i for i, token in enumerate(row.tolist()) if token == 49407) for row in tokens]


def mixed_tokens(backbone: ClipBackbone) -> torch.Tensor:
    """Prompts of every length in one batch: the empty one (start + end), a row that is only the
    end-of-text token (1 token), one the tokenizer cuts to the full context, and ordinary ones."""
    context = backbone.context_length
    texts = ["", "a photo of a cat.", "a " * 2 * context, "the sky", "a photo of the large red bus on the road."]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        tokens = backbone.tokenize(texts)
    single = torch.zeros(1, context, dtype=torch.long)
    single[0, 0] = 49407
    tokens = torch.cat([tokens, single])
    assert min(end_positions(tokens)) == 0 and max(end_positions(tokens)) == context - 1
    return tokens


@pytest.fixture(scope="module")
def vit_backbone() -> ClipBackbone:
    torch.manual_seed(0)
    return quiet_load_clip("ViT-B-16")


@pytest.fixture(scope="module", params=["tiny", "ViT-B-16"])
def backbone(request, tiny_backbone) -> ClipBackbone:
    return tiny_backbone if request.param == "tiny" else request.getfixturevalue("vit_backbone")


@pytest.fixture(
    params=[(1, 1, 0), (7, 20, 32), (10**4, 10**9, 10**6)], ids=["sequence-per-row", "awkward-splits", "one-pass"]
)
def packing(request, monkeypatch) -> tuple[int, int, int]:
    """How the eager tower packs: ``(PACK_LENGTH, PASS_POSITIONS, PASS_OVERHEAD_TOKENS)``. One row a
    sequence and a pass (each row runs its prefix itself), sequences of 7 positions in passes of 20
    (chains split between sequences, rows of several chains in one), or everything in one pass (and
    the length grouping's one padded pass). All must be exact."""
    length, positions, overhead = request.param
    monkeypatch.setattr(text_tower, "PACK_LENGTH", length)
    monkeypatch.setattr(text_tower, "PASS_POSITIONS", {"cpu": positions, "cuda": positions})
    monkeypatch.setattr(text_tower, "PASS_OVERHEAD_TOKENS", {"cpu": overhead, "cuda": overhead})
    return request.param


# --- exactness -----------------------------------------------------------------------------------


def test_truncated_tower_equals_full_tower_on_mixed_lengths(backbone, packing):
    tokens = mixed_tokens(backbone)
    expected = full_tower(backbone, tokens)
    assert backbone.text_truncatable
    with torch.no_grad():
        got = backbone.encode_text(tokens)
    assert got.shape == expected.shape and min_cosine(got, expected) >= EXACT
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(len(tokens)))
    # Rows given already cut to any length that keeps every end-of-text token.
    longest = max(end_positions(tokens)) + 1
    with torch.no_grad():
        assert min_cosine(backbone.encode_text(tokens[:, :longest]), expected) >= EXACT
        short = tokens[[0, 3, 5]]  # rows that end early: run at 5 columns
        assert min_cosine(backbone.encode_text(short[:, :5]), expected[[0, 3, 5]]) >= EXACT


def test_shared_prefix_is_exact(backbone, packing):
    """One template over many labels (as the embedder sends them): the common prefix runs once."""
    prompts = [f"a photo of the {label}, taken at night." for label in LABELS]
    tokens = backbone.tokenize(prompts)
    with torch.no_grad():
        got = backbone.encode_text(tokens)
        same = backbone.encode_text(tokens[[1, 1, 1]])  # identical rows: all but the end-of-text token shared
    expected = full_tower(backbone, tokens)
    assert min_cosine(got, expected) >= EXACT and min_cosine(same, expected[[1, 1, 1]]) >= EXACT


def random_rows(generator: torch.Generator, rows: int, context: int, stems: int = 3) -> torch.Tensor:
    """Token rows shaped like a prompt list's, but random: the start token, then the first tokens (none
    to all) of one of a few random stems, so that rows share prefixes of every length, random tokens,
    the end-of-text token at a random position (0: a row of the end token alone) and random tokens
    after it; the last row repeats the first."""
    start, end = 49406, 49407
    stem = torch.randint(1, start, (stems, context), generator=generator)
    tokens = torch.randint(1, start, (rows, context), generator=generator)
    for row in range(rows):
        shared = int(torch.randint(0, context + 1, (1,), generator=generator))
        tokens[row, :shared] = stem[int(torch.randint(0, stems, (1,), generator=generator)), :shared]
    tokens[:, 0] = start
    tokens[torch.arange(rows), torch.randint(0, context, (rows,), generator=generator)] = end
    if rows > 2:
        tokens[-1] = tokens[0]
    return tokens


@pytest.mark.parametrize("rows", [1, 2, 7, 33])
def test_eager_tower_on_random_rows(tiny_backbone, packing, rows):
    """Fresh random rows of every length and sharing, in every packing: each row as open_clip's full
    tower computes it (rows the packing never wrote would be NaN)."""
    tokens = random_rows(torch.Generator().manual_seed(rows), rows, tiny_backbone.context_length)
    with torch.no_grad():
        got = tiny_backbone.encode_text(tokens)
        expected = tiny_backbone.clip.encode_text(tokens, normalize=True)
    assert got.shape == expected.shape and not got.isnan().any()
    assert min_cosine(got, expected) >= EXACT


def test_each_shared_prefix_runs_once(tiny_backbone, monkeypatch):
    """A template-major prompt list: every prompt takes at least its template's beginning from a chain,
    and with room in the sequences each chain runs once: the positions run are the plan's, far fewer
    than the rows' own."""
    monkeypatch.setattr(text_tower, "PACK_LENGTH", 10**4)
    templates = ["a photo of a {}.", "a blurry photo of the {}.", "{} in the wild", "itap of my {}"]
    tokens = tiny_backbone.tokenize([template.format(label) for template in templates for label in LABELS])
    index = tokens.argmax(dim=-1)
    plan = text_tower.plan_text(tokens, index)
    for number, template in enumerate(templates):
        lead = 1 + len(tiny_backbone.tokenizer.encode(template.split("{}")[0]))  # the start token and the words
        assert (plan.prefix[number * len(LABELS) : (number + 1) * len(LABELS)] >= lead).all()
    passes = text_tower.pack_text(tokens, plan)
    assert sum(step.filled for step in passes) == plan.positions
    assert plan.positions < 0.6 * int((index + 1).sum())


def test_text_lengths_are_end_positions_plus_one(tiny_backbone):
    tokens = mixed_tokens(tiny_backbone)
    assert tiny_backbone.text_lengths(tokens).tolist() == [p + 1 for p in end_positions(tokens)]


@pytest.mark.parametrize(
    "tokens,error",
    [
        (torch.zeros(3, dtype=torch.long), ValueError),
        (torch.zeros(2, 17, dtype=torch.long), ValueError),
        (torch.zeros(2, 0, dtype=torch.long), ValueError),
        (torch.zeros(2, 16), TypeError),
    ],
)
def test_bad_tokens_are_named(tiny_backbone, tokens, error):
    with pytest.raises(error, match="tokens"):
        tiny_backbone.encode_text(tokens)


# --- which towers may be truncated -----------------------------------------------------------------

#: Real open_clip configs of each kind, shrunk (widths, layers, vocabulary) to build in a blink.
CONFIG_KINDS = [
    "ViT-B-16",  # CLIP, causal, argmax pooling
    "ViT-L-14-worldwide",  # CLIP, causal, eos pooling
    "EVA02-B-16",  # CustomTextCLIP, causal, argmax pooling
    "ViT-L-14-CLIPA",  # CLIP, bidirectional, last-token pooling
    "ViT-B-16-SigLIP",  # CustomTextCLIP, bidirectional, last-token pooling
    "MobileCLIP-S1",  # CustomTextCLIP, bidirectional, argmax pooling
    "coca_ViT-B-32",  # an appended class token
    "ViT-B-16:last",  # causal, but pooling the last position
]


def shrunk_clip(name: str) -> tuple[nn.Module, dict]:
    """``name``, or ``name:pool_type`` for that config with another pooling."""
    name, _, pool_type = name.partition(":")
    config = open_clip.get_model_config(name)
    text = {k: v for k, v in config["text_cfg"].items() if k not in ("hf_tokenizer_name", "tokenizer_kwargs")}
    text.pop("output_tokens", None)
    text.update(width=64, heads=2, layers=2, vocab_size=1000, context_length=min(text.get("context_length", 77), 16))
    if pool_type:
        text["pool_type"] = pool_type
    model_cfg = {"embed_dim": 64, "vision_cfg": dict(TINY_CLIP_CONFIG["vision_cfg"]), "text_cfg": text}
    cls = open_clip.CustomTextCLIP if config.get("custom_text") else open_clip.CLIP
    torch.manual_seed(0)
    return cls(**copy.deepcopy(model_cfg)).eval(), model_cfg


def end_token_rows(model_cfg: dict, context: int, garbage: bool) -> torch.Tensor:
    """Rows ending (end token, then padding) at positions 1, 4, 6 and the last; with ``garbage``, random
    tokens instead of the padding."""
    text = model_cfg["text_cfg"]
    end = text.get("eos_id", 2) if text.get("pool_type") == "eos" else 999  # eos id, or the highest id
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, 998, (4, context), generator=generator)
    for row, position in enumerate([1, 4, context - 1, 6]):
        tokens[row, position] = end
        tokens[row, position + 1 :] = (
            torch.randint(3, 998, (context - position - 1,), generator=generator) if garbage else 0
        )
    return tokens


@pytest.mark.parametrize("name", CONFIG_KINDS)
def test_truncation_decided_from_the_config(name):
    """A tower may be truncated exactly when what follows the pooled token changes nothing, which
    is measured here on open_clip's own full-length tower; the backbone must agree, and give open_clip's
    numbers either way."""
    clip, model_cfg = shrunk_clip(name)
    backbone = ClipBackbone(clip, None, ClipIdentity(name, "random"), model_cfg)
    context = backbone.context_length
    padded, noisy = end_token_rows(model_cfg, context, False), end_token_rows(model_cfg, context, True)
    with torch.no_grad():
        expected = clip.encode_text(padded, normalize=True)
        invariant = min_cosine(clip.encode_text(noisy, normalize=True), expected) >= EXACT
        assert backbone.text_truncatable == invariant
        assert min_cosine(backbone.encode_text(padded), expected) >= EXACT
    if invariant:
        assert backbone.text_lengths(padded).tolist() == [2, 5, context, 7]
    else:
        assert backbone.text_lengths(padded).tolist() == [context] * 4
        with pytest.raises(ValueError, match="full context"):
            backbone.encode_text(padded[:, :8])


class MeanPoolingTower(nn.Module):
    """A stand-in for a Hugging Face text tower (open_clip's HFTextEncoder needs transformers):
    bidirectional, mean pooling."""

    def __init__(self):
        super().__init__()
        self.context_length, self.vocab_size = 16, 1000
        self.embedding = nn.Embedding(1000, 64)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embedding(tokens).mean(dim=1)


def test_other_text_towers_keep_the_full_length():
    clip, model_cfg = shrunk_clip("EVA02-B-16")
    clip.text = MeanPoolingTower()
    backbone = ClipBackbone(clip, None, ClipIdentity("hf-like", "random"), model_cfg)
    tokens = end_token_rows(model_cfg, 16, False)
    assert not backbone.text_truncatable
    assert backbone.text_lengths(tokens).tolist() == [16] * 4
    with torch.no_grad():
        torch.testing.assert_close(backbone.encode_text(tokens), F.normalize(clip.text(tokens), dim=-1))


# --- the tokenizer's cut -----------------------------------------------------------------------------


def test_tokenize_names_the_texts_it_cuts(tiny_backbone):
    context = tiny_backbone.context_length  # 16: start + 14 one-token words + end fit exactly
    fits, cut = " ".join(["a"] * (context - 2)), " ".join(["a"] * (context - 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokens = tiny_backbone.tokenize(["a cat", fits])  # exactly full: no warning
    assert tokens.shape == (2, context) and tokens[1, -1] == 49407
    with pytest.warns(PromptTruncatedWarning, match=r"1 of 3 texts .*16-token.*'a a a") as record:
        tiny_backbone.tokenize(["a cat", fits, cut])
    assert len(record) == 1 and repr(fits) not in str(record[0].message)
    texts = ["a cat", fits, cut]
    assert tiny_backbone.cut_texts(texts, tiny_backbone.tokenize(texts, warn=False)) == [2]


# --- text precision and the encoders ----------------------------------------------------------------


def test_text_runs_in_float32_by_default_and_bf16_on_request(tiny_model):
    tokens = mixed_tokens(tiny_model.backbone)
    expected = full_tower(tiny_model.backbone, tokens)
    weights_before = {k: v.clone() for k, v in tiny_model.state_dict().items()}

    encoder = TorchEncoder(tiny_model, torch.bfloat16)  # bf16 images, float32 text
    assert encoder.text_dtype == torch.float32 and encoder.model.backbone.text_dtype == torch.bfloat16
    got = encoder.encode_text(tokens)
    assert got.dtype == torch.float32 and min_cosine(got, expected) >= EXACT

    for dtype, threshold in ((torch.bfloat16, 0.999), (torch.float16, 0.999)):
        encoder = TorchEncoder(tiny_model, text_dtype=dtype)
        assert encoder.text_dtype == dtype and encoder._text_model.backbone.text_dtype == dtype
        assert encoder._text_model.backbone.visual is tiny_model.backbone.visual  # only the text tower is copied
        assert min_cosine(encoder.encode_text(tokens), expected) >= threshold
    assert TorchEncoder(tiny_model, torch.bfloat16, text_dtype=None).text_dtype == torch.bfloat16
    for name, tensor in tiny_model.state_dict().items():  # the model given is never changed
        assert tensor.dtype == weights_before[name].dtype and torch.equal(tensor, weights_before[name])
    with pytest.raises(ValueError, match="dtype"):
        TorchEncoder(tiny_model, text_dtype="int8")


def test_onnxruntime_text_graph_takes_any_length(tiny_model, tmp_path):
    try:
        encoder = make_encoder("onnxruntime", tiny_model, cache_dir=tmp_path)
    except EncoderUnavailableError as error:
        pytest.skip(str(error))
    reference = TorchEncoder(tiny_model)
    tokens = mixed_tokens(tiny_model.backbone)
    assert encoder.text_session().get_inputs()[0].shape == ["batch", "length"]
    expected = full_tower(tiny_model.backbone, tokens)
    assert min_cosine(encoder.encode_text(tokens), expected) >= 0.999
    for length in (3, 9):  # the graph itself at two lengths, without the encoder's grouping
        rows = tokens[tiny_model.backbone.text_lengths(tokens) <= length][:, :length]
        texts = torch.empty(rows.shape[0], tiny_model.backbone.embed_dim)
        encoder._run(encoder.text_session(), ("tokens", "texts"), rows.contiguous(), texts)
        assert rows.shape[0] >= 2 and min_cosine(texts, reference.encode_text(rows)) >= 0.999


@pytest.mark.slow
def test_compiled_text_tower_runs_trimmed_groups(tiny_model):
    encoder = TorchEncoder(tiny_model, compile=True)
    tokens = mixed_tokens(tiny_model.backbone)
    assert min_cosine(encoder.encode_text(tokens), full_tower(tiny_model.backbone, tokens)) >= 0.999
