"""Prompt templates and class-name text embeddings (DESIGN §2, step 3).

A label's embedding is the mean of its unit prompt embeddings over the templates, renormalised
(CLIP's prompt ensembling). Results are cached by (model id, labels, templates).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

#: CLIP's 80 ImageNet prompt templates (Radford et al. 2021), as format strings.
IMAGENET_TEMPLATES: tuple[str, ...] = tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)
#: CLIP's short set of 7 templates.
SHORT_TEMPLATES: tuple[str, ...] = tuple(t("{}") for t in SIMPLE_IMAGENET_TEMPLATES)
#: One template, the cheapest.
SINGLE_TEMPLATE: tuple[str, ...] = ("a photo of a {}.",)

TEMPLATE_SETS = {"imagenet": IMAGENET_TEMPLATES, "short": SHORT_TEMPLATES, "single": SINGLE_TEMPLATE}


def resolve_templates(templates: str | Sequence[str]) -> tuple[str, ...]:
    """A named template set (``imagenet``, ``short``, ``single``) or a list of ``{}`` templates."""
    if isinstance(templates, str):
        if templates in TEMPLATE_SETS:
            return TEMPLATE_SETS[templates]
        if "{}" in templates:
            return (templates,)
        raise ValueError(f"templates must be one of {sorted(TEMPLATE_SETS)} or contain '{{}}', got {templates!r}")
    resolved = tuple(templates)
    if not resolved:
        raise ValueError("templates is empty")
    for template in resolved:
        if not isinstance(template, str) or template.count("{}") != 1:
            raise ValueError(f"each template must be a string with exactly one '{{}}', got {template!r}")
    return resolved


def validate_labels(labels: Sequence[str]) -> tuple[str, ...]:
    """Class names as a tuple; empty lists, blank names and duplicates are errors."""
    if isinstance(labels, str):
        raise TypeError("labels must be a list of class names, not one string (split 'a,b,c' first)")
    labels = tuple(labels)
    if not labels:
        raise ValueError("labels is empty: give at least one class name")
    for label in labels:
        if not isinstance(label, str) or not label.strip():
            raise ValueError(f"labels must be non-empty strings, got {label!r}")
    seen: set[str] = set()
    duplicates = [label for label in labels if label in seen or seen.add(label)]
    if duplicates:
        raise ValueError(f"labels has duplicates: {sorted(set(duplicates))}")
    if len(labels) > 32767:
        raise ValueError(f"at most 32767 labels fit int16 label maps, got {len(labels)}")
    return labels


def ensemble_text_embeddings(
    encode: Callable[[list[str]], torch.Tensor],
    labels: Sequence[str],
    templates: Sequence[str],
    *,
    batch_size: int = 256,
) -> torch.Tensor:
    """Per-label template ensemble: ``[C, E]`` unit vectors.

    Args:
        encode: prompts -> unit text embeddings ``[P, E]``.
        labels: C class names.
        templates: T format strings with one ``{}``.
    """
    prompts = [template.format(label) for label in labels for template in templates]
    embeddings = torch.cat(
        [encode(prompts[i : i + batch_size]).float() for i in range(0, len(prompts), batch_size)]
    )  # [C*T, E]
    embeddings = F.normalize(embeddings, dim=-1).reshape(len(labels), len(templates), -1)
    return F.normalize(embeddings.mean(dim=1), dim=-1)  # [C, E]


class TextEmbeddingCache:
    """An LRU cache of label embeddings keyed by (model id, labels, templates)."""

    def __init__(self, max_entries: int = 64):
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def get_or_compute(
        self, model_id: str, labels: tuple[str, ...], templates: tuple[str, ...], compute: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        key = (model_id, labels, templates)
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        value = compute()
        self._entries[key] = value
        if len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._entries)
