import contextlib
import copy
import json
import logging
import os
import re
import signal
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import quiet_load_clip
from safetensors.torch import save

from pacl_fast.backbone import ClipIdentity
from pacl_fast.encoders import TorchEncoder
from pacl_fast.model import PACL
from pacl_fast.prompts import (
    IMAGENET_TEMPLATES,
    SHORT_TEMPLATES,
    TextEmbedder,
    clip_tokenizer,
    ensemble_text_embeddings,
    template_set,
    validate_labels,
)
from pacl_fast.text_cache import TextCache, templates_key, text_model_key
from pacl_fast.text_tower import PromptTruncatedWarning


def test_template_sets():
    assert len(IMAGENET_TEMPLATES) == 80 and len(set(IMAGENET_TEMPLATES)) == 80
    assert len(SHORT_TEMPLATES) == 7
    assert all(t.count("{}") == 1 for t in IMAGENET_TEMPLATES + SHORT_TEMPLATES)
    assert template_set("imagenet") == IMAGENET_TEMPLATES
    assert template_set("a sketch of a {}.") == ("a sketch of a {}.",)
    assert template_set(["a {}.", "the {} {{here}}"]) == ("a {}.", "the {} {{here}}")
    with pytest.raises(ValueError, match="exactly one"):
        template_set(["no placeholder"])
    with pytest.raises(ValueError, match="templates must be one of imagenet, short, single, synthetic"):
        template_set("imagenet80")


def test_every_preset_the_doors_offer_is_accepted():
    """``choices.TEMPLATE_PRESETS`` is what the CLI and the service offer: the library takes each of them
    (``synthetic`` was refused by ``predict`` although the service answered with it)."""
    from pacl_fast.choices import TEMPLATE_PRESETS
    from pacl_fast.data.synthetic import SYNTHETIC_TEMPLATES

    for name in TEMPLATE_PRESETS:
        templates = template_set(name)
        assert templates and all(isinstance(t, str) and t.count("{}") == 1 for t in templates), name
    assert template_set("synthetic") == SYNTHETIC_TEMPLATES
    assert template_set("short") == SHORT_TEMPLATES and template_set("single") == ("a photo of a {}.",)


@pytest.mark.parametrize(
    "templates,error,message",
    [
        ("a {} and {}", ValueError, "'a {} and {}' must have exactly one"),
        (["a {}", "the {0}"], ValueError, "'the {0}' must have exactly one"),
        (["{} of {name}"], ValueError, "'{} of {name}' does not format a label (KeyError"),
        (["a {}", 3], ValueError, "template 3 is not a string"),
        ([], ValueError, "templates is empty"),
        (b"a {}", TypeError, "templates must be a preset name"),
        ("photo", ValueError, "templates must be one of"),
    ],
)
def test_bad_templates_are_named(templates, error, message):
    with pytest.raises(error, match=re.escape(message)):
        template_set(templates)


def test_ensemble_is_mean_of_unit_embeddings_renormalised():
    torch.manual_seed(0)
    table = {}

    def encode(prompts):
        return torch.stack([table.setdefault(p, torch.randn(6) * (1 + len(p))) for p in prompts])

    labels, templates = ["cat", "dog"], ["a {}.", "the {} here.", "my {}"]
    got = ensemble_text_embeddings(encode, labels, templates, batch_size=4)
    for i, label in enumerate(labels):
        units = torch.stack([F.normalize(table[t.format(label)], dim=0) for t in templates])
        torch.testing.assert_close(got[i], F.normalize(units.mean(0), dim=0))
    assert got.shape == (2, 6)


@pytest.mark.parametrize(
    "labels,message",
    [([], "empty"), (["cat", "dog", "cat"], "duplicates"), (["cat", " "], "non-empty"), ("cat,dog", "not one string")],
)
def test_bad_labels(labels, message):
    with pytest.raises((ValueError, TypeError), match=message):
        validate_labels(labels)


@pytest.mark.parametrize(
    "labels,pair",
    [
        (["Circle", "square", "circle"], "'Circle' and 'circle'"),  # the tokenizer lowercases
        (["ice  cream", "cake", "ice cream "], "'ice  cream' and 'ice cream '"),  # and cleans whitespace
        (["stop sign!", "stop sign !"], "'stop sign!' and 'stop sign !'"),  # punctuation is its own token
    ],
)
def test_labels_the_tokenizer_makes_identical_are_refused_before_any_model(labels, pair):
    """Such labels would get one embedding and split the pixels between them. Only the tokenizer is
    needed (no model is built here); both labels are named."""
    with pytest.raises(ValueError, match=f"duplicates to the tokenizer.*{pair}"):
        validate_labels(labels)
    distinct = ("circle", "Circles", "ice cream", "icecream")
    assert validate_labels(list(distinct)) == distinct


def test_the_embedder_checks_labels_with_its_models_tokenizer(tiny_model, encoder, tmp_path):
    calls = []

    def tokenize(texts):
        calls.append(list(texts))
        return clip_tokenizer()(texts)[:, :16]  # the tiny model's context

    text = TextEmbedder(encoder.encode_text, tokenize, "tiny", cache_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="'Cat' and 'cat'"):
        text(["Cat", "dog", "cat"], TEMPLATES)
    assert calls == [["Cat", "dog", "cat"]] and text.encoded_prompts == 0  # refused before any prompt runs


# --- TextEmbedder: the template ensemble through the text tower, cached in memory and on disk ---------

CLASSES = ["cat", "traffic light", "sky", "chest of drawers", "grass", "person", "swimming pool"]  # 7: odd
TEMPLATES = ("a photo of a {}.", "itap of the {}", "{}", "a blurry photo of my {}, seen from far away.", "the {}!")


@pytest.fixture(scope="module")
def encoder(tiny_model):
    return TorchEncoder(tiny_model)


def embedder(tiny_model, encoder, cache_dir, **options) -> TextEmbedder:
    return TextEmbedder.for_model(tiny_model.backbone, encoder, cache_dir=cache_dir, progress=False, **options)


def reference_embeddings(backbone, labels, templates) -> torch.Tensor:
    """Today's path: open_clip's own full-length tower, one prompt list, the plain ensemble."""
    clip, tokenizer = backbone.clip, backbone.tokenizer
    with torch.no_grad():
        return ensemble_text_embeddings(lambda p: clip.encode_text(tokenizer(p), normalize=True), labels, templates)


def test_embedder_equals_the_full_tower_ensemble(tiny_model, encoder, tmp_path):
    text = embedder(tiny_model, encoder, tmp_path, batch_size=3)  # a label a chunk, calls of 3 and 2 prompts
    got = text(CLASSES, TEMPLATES)
    expected = reference_embeddings(tiny_model.backbone, CLASSES, TEMPLATES)
    assert got.shape == (7, 64) and got.dtype == torch.float32
    assert F.cosine_similarity(got, expected, dim=-1).min() >= 0.99999
    assert text.encoded_prompts == 35
    # Any order and subset of labels: the same rows, from memory.
    torch.testing.assert_close(text(CLASSES[::-2], TEMPLATES), got.flip(0)[::2].contiguous())
    assert text.encoded_prompts == 35


def test_disk_cache_serves_a_fresh_embedder_and_keys_what_matters(tiny_model, encoder, tmp_path):
    first = embedder(tiny_model, encoder, tmp_path)(CLASSES, TEMPLATES)
    assert len(list(tmp_path.rglob("*.safetensors"))) == 7
    fresh = embedder(tiny_model, encoder, tmp_path)
    assert torch.equal(fresh(CLASSES, TEMPLATES), first) and fresh.encoded_prompts == 0
    other_templates = embedder(tiny_model, encoder, tmp_path)
    other_templates(CLASSES[:2], TEMPLATES[:4])
    assert other_templates.encoded_prompts == 8
    bf16 = embedder(tiny_model, TorchEncoder(tiny_model, text_dtype=torch.bfloat16), tmp_path)
    bf16(CLASSES[:2], TEMPLATES)
    assert bf16.encoded_prompts == 10  # another text precision: another key
    torch.manual_seed(5)
    other_weights = PACL(quiet_load_clip(tiny_model.backbone.model_cfg)).eval()
    other = embedder(other_weights, TorchEncoder(other_weights), tmp_path)
    other(CLASSES[:3], TEMPLATES)
    assert other.encoded_prompts == 15  # other random weights: another key
    off = embedder(tiny_model, encoder, tmp_path / "off", use_disk_cache=False)
    torch.testing.assert_close(off(CLASSES, TEMPLATES), first)
    assert off.encoded_prompts == 35 and not (tmp_path / "off").exists()


def test_model_key_names_weights_or_hashes_them(tiny_model):
    backbone = tiny_model.backbone
    key = text_model_key(backbone, backend="torch", dtype=torch.float32)
    assert key == text_model_key(backbone, backend="torch", dtype=torch.float32)
    assert key != text_model_key(backbone, backend="onnxruntime", dtype=torch.float32)
    original = backbone.clip.ln_final.weight.detach().clone()
    try:
        with torch.no_grad():
            backbone.clip.ln_final.weight.mul_(1.5)  # edited in place: the digest follows
        edited = text_model_key(backbone, backend="torch", dtype=torch.float32)
        assert edited != key
        with torch.no_grad():
            backbone.clip.visual.ln_post.weight.add_(1.0)  # the image tower does not define text embeddings
        assert text_model_key(backbone, backend="torch", dtype=torch.float32) == edited
    finally:
        with torch.no_grad():
            backbone.clip.ln_final.weight.copy_(original)
            backbone.clip.visual.ln_post.weight.sub_(1.0)
    named = copy.copy(backbone)
    named.identity = ClipIdentity("ViT-tiny", "laion2b_s34b_b88k")  # a pretrained tag names the weights
    assert "laion2b_s34b_b88k" in text_model_key(named, backend="torch", dtype=torch.float32)
    assert "tensors-sha256" in text_model_key(named, backend="torch", dtype=torch.float32, hash_weights=True)


def test_a_bf16_build_keeps_the_text_tower_of_the_loaded_weights(tiny_config, tmp_path):
    """A bf16 image side must not round the text weights: a weights file cached by an fp32 run must give a
    bf16 run the embeddings it would compute itself (the text key names the file, not its tensors)."""
    from safetensors.torch import save_file

    from pacl_fast.build import build

    torch.manual_seed(3)
    weights = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in quiet_load_clip(tiny_config).clip.state_dict().items()}, str(weights))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fp32 = build(tiny_config, str(weights), dtype="float32", device="cpu")
        bf16 = build(tiny_config, str(weights), dtype="bfloat16", device="cpu")
    assert bf16.model.backbone.visual.conv1.weight.dtype == torch.bfloat16
    assert bf16.encoder.model is bf16.model  # still one copy of the model
    fresh = {
        name: embedder(parts.model, parts.encoder, tmp_path / name, use_disk_cache=False)(CLASSES[:4], TEMPLATES)
        for name, parts in (("fp32", fp32), ("bf16", bf16))
    }
    torch.testing.assert_close(fresh["bf16"], fresh["fp32"], rtol=0, atol=0)
    shared = tmp_path / "shared"
    embedder(fp32.model, fp32.encoder, shared)(CLASSES[:4], TEMPLATES)
    cached = embedder(bf16.model, bf16.encoder, shared)
    torch.testing.assert_close(cached(CLASSES[:4], TEMPLATES), fresh["bf16"], rtol=0, atol=0)
    assert cached.encoded_prompts == 0  # served from the fp32 run's entries, and they are right
    rounded = copy.copy(fp32.model.backbone).with_text_dtype(torch.bfloat16)  # text weights held in bf16
    assert text_model_key(rounded, backend="torch", dtype=torch.float32) != text_model_key(
        fp32.model.backbone, backend="torch", dtype=torch.float32
    )


def test_model_key_is_computed_on_first_use(tiny_config, tmp_path):
    """Random weights are hashed for the key: only when text is embedded, once."""
    torch.manual_seed(3)
    model = PACL(quiet_load_clip(tiny_config)).eval()
    text = embedder(model, TorchEncoder(model), tmp_path)
    assert "_text_digest" not in model.backbone.__dict__
    text(CLASSES[:1], TEMPLATES)
    assert "_text_digest" in model.backbone.__dict__
    assert text.model_key == text_model_key(model.backbone, backend="torch", dtype=torch.float32)


def entry_paths(text: TextEmbedder, labels) -> list[Path]:
    key = templates_key(TEMPLATES)
    return [text.disk.path(text.model_key, key, label) for label in labels]


def rewrite_entry(path: Path, tensors: dict, **metadata) -> None:
    meta = {"format": "1", "cut": "0", **metadata}
    path.write_bytes(save(tensors, metadata=meta))


def test_broken_entries_are_recomputed_and_rewritten(tiny_model, encoder, tmp_path, caplog):
    text = embedder(tiny_model, encoder, tmp_path)
    expected = text(CLASSES, TEMPLATES)
    paths = entry_paths(text, CLASSES)
    good = {"model": text.model_key, "templates": templates_key(TEMPLATES)}
    unit = F.normalize(torch.randn(64), dim=0)
    paths[0].write_bytes(paths[0].read_bytes()[:50])  # truncated
    paths[1].write_bytes(b"\x00garbage" * 20)  # not safetensors
    rewrite_entry(paths[2], {"embedding": F.normalize(torch.randn(65), dim=0)}, label=CLASSES[2], **good)
    rewrite_entry(paths[3], {"embedding": torch.full((64,), float("nan"))}, label=CLASSES[3], **good)
    rewrite_entry(paths[4], {"embedding": unit.half()}, label=CLASSES[4], **good)
    rewrite_entry(paths[5], {"embedding": unit}, label=CLASSES[0], **good)  # another label's entry
    rewrite_entry(paths[6], {"embedding": unit * 2}, label=CLASSES[6], **good)  # not unit length
    fresh = embedder(tiny_model, encoder, tmp_path)
    with caplog.at_level(logging.WARNING, logger="pacl_fast.text_cache"):
        got = fresh(CLASSES, TEMPLATES)
    assert fresh.encoded_prompts == 35  # all seven recomputed, none trusted
    torch.testing.assert_close(got, expected)
    named = [record.getMessage() for record in caplog.records]
    assert all(any(str(path) in message for message in named) for path in paths), named
    again = embedder(tiny_model, encoder, tmp_path)  # rewritten whole
    torch.testing.assert_close(again(CLASSES, TEMPLATES), expected)
    assert again.encoded_prompts == 0


class Blocked(Exception):  # noqa: N818 - not an OSError, so no reader's error handling can swallow it
    """A block ran past its :func:`deadline`."""


@contextlib.contextmanager
def deadline(seconds: float):
    """Raise :class:`Blocked` in the test if the block takes longer (a blocking open is interrupted), so
    a regression fails instead of hanging the run."""

    def expire(signum, frame):
        raise Blocked(f"still blocked after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are POSIX")
def test_entries_that_are_not_regular_files_are_broken_entries_not_hangs(tiny_model, encoder, tmp_path, caplog):
    """A FIFO where an entry is expected blocked the reader forever (in the service, every later request).
    It is now a broken entry: named in a warning, computed again and replaced; a folder in an entry's
    place is left alone and that label alone goes uncached."""
    text = embedder(tiny_model, encoder, tmp_path)
    expected = text(CLASSES[:3], TEMPLATES)
    fifo, folder = entry_paths(text, CLASSES[:2])
    fifo.unlink()
    os.mkfifo(fifo)
    folder.unlink()
    folder.mkdir()
    fresh = embedder(tiny_model, encoder, tmp_path)
    with deadline(30), caplog.at_level(logging.WARNING, logger="pacl_fast.text_cache"):
        got = fresh(CLASSES[:3], TEMPLATES)
    torch.testing.assert_close(got, expected)
    assert fresh.encoded_prompts == 10  # the two broken ones, not the third
    messages = "\n".join(record.getMessage() for record in caplog.records)
    assert f"{fifo} cannot be read" in messages and "FIFO" in messages and str(folder) in messages
    assert fifo.is_file() and folder.is_dir() and fresh.disk.writable
    again = embedder(tiny_model, encoder, tmp_path)
    with deadline(30):
        torch.testing.assert_close(again(CLASSES[:1], TEMPLATES), expected[:1])
    assert again.encoded_prompts == 0  # served by the entry that replaced the FIFO


def test_size_cap_evicts_least_recently_used(tiny_model, encoder, tmp_path):
    text = embedder(tiny_model, encoder, tmp_path)
    text(CLASSES, TEMPLATES)
    paths = entry_paths(text, CLASSES)
    size = paths[0].stat().st_size
    now = time.time()
    for age, path in enumerate(reversed(paths)):  # CLASSES[0] is the oldest
        os.utime(path, (now - 100 * (age + 1), now - 100 * (age + 1)))
    cache = TextCache(tmp_path, max_bytes=4 * size + size // 2)
    assert cache.load(text.model_key, templates_key(TEMPLATES), CLASSES[1], 64) is not None  # read: now recent
    (tmp_path / "x" / ".stale.safetensors.tmp").parent.mkdir()
    stale = tmp_path / "x" / ".stale.safetensors.tmp"
    stale.write_bytes(b"half")
    os.utime(stale, (now - 7200, now - 7200))
    assert cache.evict() == 3
    left = {path for path in paths if path.exists()}
    assert left == {paths[1], paths[4], paths[5], paths[6]} and not stale.exists()
    assert cache.size() <= cache.max_bytes
    fresh = embedder(tiny_model, encoder, tmp_path, max_cache_bytes=4 * size + size // 2)
    fresh(CLASSES, TEMPLATES)
    assert fresh.encoded_prompts == 15  # the three evicted
    assert sum(path.exists() for path in paths) == 4  # the cap holds after writing them back


def test_concurrent_writers_and_readers_see_whole_entries(tmp_path, caplog):
    """Writers publishing the same entries while readers read: every read is whole (no broken-entry
    warning), and what is left is valid, with no temporary files."""
    labels = [f"label {i}" for i in range(20)]
    vectors = {label: F.normalize(torch.randn(512), dim=0) for label in labels}
    errors = []

    def write():
        cache = TextCache(tmp_path)
        for _ in range(10):
            for label in labels:
                cache.store("model", "templates", label, vectors[label])

    def read():
        cache = TextCache(tmp_path)
        for _ in range(30):
            for label in labels:
                entry = cache.load("model", "templates", label, 512)
                if entry is not None and not torch.equal(entry["embedding"], vectors[label]):
                    errors.append(label)

    threads = [threading.Thread(target=write) for _ in range(3)] + [threading.Thread(target=read) for _ in range(2)]
    with caplog.at_level(logging.WARNING, logger="pacl_fast.text_cache"):
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not errors and not caplog.records
    cache = TextCache(tmp_path)
    assert all(
        torch.equal(cache.load("model", "templates", label, 512)["embedding"], vectors[label]) for label in labels
    )
    assert not list(tmp_path.rglob("*.tmp"))


def test_cut_labels_are_named_cold_and_warm(tiny_model, encoder, tmp_path):
    long_label = "very " * 20 + "long name"
    labels = ["cat", long_label]
    with pytest.warns(PromptTruncatedWarning, match=r"1 of 2 labels .*16-token .*'very very") as record:
        embedder(tiny_model, encoder, tmp_path)(labels, TEMPLATES)
    assert "'cat'" not in str(record[0].message)
    warm = embedder(tiny_model, encoder, tmp_path)
    with pytest.warns(PromptTruncatedWarning, match="very very"):
        warm(labels, TEMPLATES)
    assert warm.encoded_prompts == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warm(["cat"], TEMPLATES)


def test_progress_bar_past_a_few_hundred_prompts(tiny_model, encoder, tmp_path, capsys):
    text = TextEmbedder.for_model(tiny_model.backbone, encoder, cache_dir=tmp_path)
    text(CLASSES[:2], TEMPLATES)  # 10 prompts: quiet
    assert "text embeddings" not in capsys.readouterr().err
    text([f"thing {i}" for i in range(61)], TEMPLATES)  # 305 prompts
    assert "text embeddings" in capsys.readouterr().err


def test_memory_lru_falls_back_to_disk(tiny_model, encoder, tmp_path):
    text = embedder(tiny_model, encoder, tmp_path, memory_entries=2)
    first = text(CLASSES[:3], TEMPLATES)
    assert len(text._memory) == 2
    torch.testing.assert_close(text(CLASSES[:3], TEMPLATES), first)
    assert text.encoded_prompts == 15


@pytest.mark.parametrize(
    "options,message",
    [({"batch_size": 0}, "batch_size"), ({"max_cache_bytes": -1}, "max_bytes")],
)
def test_bad_embedder_options(tiny_model, encoder, tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        embedder(tiny_model, encoder, tmp_path, **options)
    with pytest.raises(ValueError, match="model_key"):
        TextEmbedder(encoder.encode_text, tiny_model.backbone.tokenize, "")


def test_evict_walks_the_cache_only_when_its_known_size_passes_the_cap(tmp_path):
    """The size is known after one walk plus this process's stores: no walk (a stat per entry) per call,
    and the cap still holds once this process's own writes pass it."""
    unit = F.normalize(torch.randn(64), dim=0)
    cache = TextCache(tmp_path, max_bytes=10_000)
    cache.store("m", "t", "first", unit)
    entry = cache.path("m", "t", "first").stat().st_size
    assert cache.evict() == 0  # first use: one walk
    outsider = cache.path("m", "t", "outsider")  # another process's entries, seen only at the next walk
    outsider.write_bytes(cache.path("m", "t", "first").read_bytes() * (10_000 // entry))
    os.utime(outsider, (1, 1))  # the oldest
    assert cache.evict() == 0  # under the cap as far as this process knows: no walk, nothing removed
    assert outsider.exists()
    for i in range(10_000 // entry + 1):  # this process alone passes the cap: the next evict walks
        cache.store("m", "t", f"label {i}", unit)
    assert cache.evict() >= 1 and not outsider.exists() and cache.size() <= cache.max_bytes


def test_a_new_process_trusts_the_size_hint_instead_of_walking_the_cache(tmp_path):
    """Walking the cache to learn its size (a stat per entry, seconds for a large cache) was the first
    evict() of every process that computed a label. The last walk's total, with what was stored since,
    is kept in size.json: a new process walks only when that passes the cap, or the walk is a day old,
    or the hint is not a hint (garbage, a FIFO: read without blocking)."""
    from pacl_fast.text_cache import SIZE_HINT, WALK_EVERY_SECONDS

    unit = F.normalize(torch.randn(64), dim=0)
    first = TextCache(tmp_path, max_bytes=10_000)
    first.store("m", "t", "a", unit)
    assert first.evict() == 0  # no hint yet: a walk, which writes one
    entry = first.path("m", "t", "a").stat().st_size
    first.store("m", "t", "b", unit)
    assert first.evict() == 0
    hint = json.loads((tmp_path / SIZE_HINT).read_text())
    assert hint["bytes"] == 2 * entry  # the walk's entry, then this process's second store

    outsider = first.path("m", "t", "outsider")  # written behind every process's back: seen by a walk only
    outsider.write_bytes(first.path("m", "t", "a").read_bytes() * (10_000 // entry))
    os.utime(outsider, (1, 1))  # the oldest
    second = TextCache(tmp_path, max_bytes=10_000)
    second.store("m", "t", "c", unit)
    assert second.evict() == 0 and outsider.exists()  # trusted the hint: no walk
    assert json.loads((tmp_path / SIZE_HINT).read_text())["bytes"] == 3 * entry

    for broken in (b"{garbage", json.dumps({"bytes": 10, "walked": time.time() - WALK_EVERY_SECONDS - 1}).encode()):
        (tmp_path / SIZE_HINT).write_bytes(broken)
        assert TextCache(tmp_path, max_bytes=10_000).evict() == 1 and not outsider.exists()  # walked
        outsider.write_bytes(first.path("m", "t", "a").read_bytes() * (10_000 // entry))
        os.utime(outsider, (1, 1))
    (tmp_path / SIZE_HINT).unlink()
    os.mkfifo(tmp_path / SIZE_HINT)
    with deadline(30):
        assert TextCache(tmp_path, max_bytes=10_000).evict() == 1 and not outsider.exists()
    assert (tmp_path / SIZE_HINT).is_file()  # the walk's total replaced the FIFO
