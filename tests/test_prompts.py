import pytest
import torch
import torch.nn.functional as F

from pacl_fast.prompts import (
    IMAGENET_TEMPLATES,
    SHORT_TEMPLATES,
    TextEmbeddingCache,
    ensemble_text_embeddings,
    resolve_templates,
    validate_labels,
)


def test_template_sets():
    assert len(IMAGENET_TEMPLATES) == 80 and len(set(IMAGENET_TEMPLATES)) == 80
    assert len(SHORT_TEMPLATES) == 7
    assert all(t.count("{}") == 1 for t in IMAGENET_TEMPLATES + SHORT_TEMPLATES)
    assert resolve_templates("imagenet") == IMAGENET_TEMPLATES
    assert resolve_templates("a sketch of a {}.") == ("a sketch of a {}.",)
    with pytest.raises(ValueError, match="exactly one"):
        resolve_templates(["no placeholder"])
    with pytest.raises(ValueError, match="templates must be one of"):
        resolve_templates("imagenet80")


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


def test_cache_keys_model_labels_templates():
    cache = TextEmbeddingCache(max_entries=2)
    calls = []

    def compute(tag):
        return lambda: calls.append(tag) or torch.tensor([float(len(calls))])

    a = cache.get_or_compute("m1", ("cat",), ("{}",), compute("a"))
    assert cache.get_or_compute("m1", ("cat",), ("{}",), compute("again")) is a
    cache.get_or_compute("m2", ("cat",), ("{}",), compute("other model"))
    cache.get_or_compute("m1", ("cat",), ("a {}",), compute("other templates"))
    assert calls == ["a", "other model", "other templates"] and len(cache) == 2
    cache.get_or_compute("m1", ("cat",), ("{}",), compute("evicted"))
    assert calls[-1] == "evicted"


@pytest.mark.parametrize(
    "labels,message",
    [([], "empty"), (["cat", "dog", "cat"], "duplicates"), (["cat", " "], "non-empty"), ("cat,dog", "not one string")],
)
def test_bad_labels(labels, message):
    with pytest.raises((ValueError, TypeError), match=message):
        validate_labels(labels)
