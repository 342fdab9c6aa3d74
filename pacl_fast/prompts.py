"""Prompt templates and class-name text embeddings (DESIGN §2, step 3).

A label's embedding is the mean of its unit prompt embeddings over the templates, renormalised
(CLIP's prompt ensembling). :class:`TextEmbedder` is the one way to get them: it runs the text
tower on the prompts no cache holds (many templates a call: the eager tower runs the beginning
that prompts share once and each prompt only up to its end-of-text token, see
``ClipBackbone.encode_text``) and keeps the results in memory and on disk
(:mod:`pacl_fast.text_cache`). :func:`template_set` and :func:`validate_labels` are what every door
(library, CLI, service) calls on a user's templates and labels, before any model is loaded.
"""

from __future__ import annotations

import functools
import math
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

from pacl_fast.choices import TEMPLATE_PRESETS
from pacl_fast.text_cache import DEFAULT_MAX_BYTES, TextCache, templates_key, text_model_key
from pacl_fast.text_tower import PromptTruncatedWarning

#: CLIP's 80 ImageNet prompt templates (Radford et al. 2021), as format strings.
IMAGENET_TEMPLATES: tuple[str, ...] = tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)
#: CLIP's short set of 7 templates.
SHORT_TEMPLATES: tuple[str, ...] = tuple(t("{}") for t in SIMPLE_IMAGENET_TEMPLATES)
#: One template, the cheapest.
SINGLE_TEMPLATE: tuple[str, ...] = ("a photo of a {}.",)


def _preset(name: str) -> tuple[str, ...]:
    """The templates of a preset of :data:`pacl_fast.choices.TEMPLATE_PRESETS`."""
    if name == "synthetic":  # the synthetic world's own (its module needs numpy: imported when asked for)
        from pacl_fast.data.synthetic import SYNTHETIC_TEMPLATES

        return SYNTHETIC_TEMPLATES
    return {"imagenet": IMAGENET_TEMPLATES, "short": SHORT_TEMPLATES, "single": SINGLE_TEMPLATE}[name]


def _check_template(template: object) -> str:
    """A template that formats one label, else ValueError naming it."""
    problem = None
    if not isinstance(template, str):
        problem = f"is not a string ({type(template).__name__})"
    elif template.count("{}") != 1:
        problem = "must have exactly one '{}' (where the label goes)"
    else:
        try:
            template.format("label")
        except (IndexError, KeyError, ValueError) as error:
            problem = f"does not format a label ({type(error).__name__}: {error}; a literal brace is {{{{ or }}}})"
    if problem is not None:
        raise ValueError(f"template {template!r} {problem}")
    return template


def template_set(templates: str | Sequence[str]) -> tuple[str, ...]:
    """A preset name (:data:`pacl_fast.choices.TEMPLATE_PRESETS`: ``imagenet``, ``short``, ``single``,
    ``synthetic``), one template with ``{}`` where the label goes, or a list of them -> the templates.

    The one way every door (``predict``, ``segment``, ``eval``, the service) turns what a user gave into
    templates; the result is what cache keys and embeddings are made from."""
    if isinstance(templates, str):
        if templates in TEMPLATE_PRESETS:
            return _preset(templates)
        if "{" not in templates:
            raise ValueError(
                f"templates must be one of {', '.join(TEMPLATE_PRESETS)} or a template with '{{}}' where the label "
                f"goes, got {templates!r}"
            )
        return (_check_template(templates),)
    if isinstance(templates, (bytes, bytearray)) or not isinstance(templates, Sequence):
        raise TypeError(f"templates must be a preset name, a template or a list of templates, got {type(templates)}")
    resolved = tuple(_check_template(template) for template in templates)
    if not resolved:
        raise ValueError("templates is empty: give at least one template, or a preset name")
    return resolved


@functools.lru_cache(maxsize=1)
def clip_tokenizer() -> Callable[[list[str]], torch.Tensor]:
    """open_clip's CLIP tokenizer (BPE, lowercasing, whitespace cleaning; ~0.1 s to build, once): what
    :func:`validate_labels` compares labels with when it is not given a model's own."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def validate_labels(
    labels: Sequence[str], tokenizer: Callable[[list[str]], torch.Tensor] | None = None
) -> tuple[str, ...]:
    """Class names as a tuple; empty lists, blank names and duplicates are errors, also labels that the
    tokenizer makes identical (``Circle`` and ``circle``; ``a  b`` and ``a b``): they would get one
    embedding and split the pixels between them.

    Needs a tokenizer only, no model, so every door can call it before loading one: ``tokenizer``
    (texts -> token ids ``[T, L]``, a model's own) or open_clip's CLIP tokenizer (:func:`clip_tokenizer`).
    """
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
    same = same_to_tokenizer(labels, tokenizer)
    if same:
        shown = "; ".join(f"{a!r} and {b!r}" for a, b in same[:5]) + ("; ..." if len(same) > 5 else "")
        raise ValueError(
            f"labels has duplicates to the tokenizer, which lowercases and cleans whitespace: {shown} "
            "are the same text to the model (one embedding, the pixels split between them); keep one of each"
        )
    return labels


def same_to_tokenizer(
    labels: Sequence[str], tokenizer: Callable[[list[str]], torch.Tensor] | None = None
) -> list[tuple[str, str]]:
    """Each label whose tokens equal an earlier label's, as ``(earlier, label)``, in order; a label given twice too.

    The one rule for "the same class named twice" (:func:`validate_labels`, the CLI's ``--labels``): the tokenizer
    (``tokenizer`` or :func:`clip_tokenizer`) decides, as it lowercases, fixes unicode and HTML entities, cleans
    whitespace and truncates; a hand-made approximation (casefold, say) refuses ``Straße, STRASSE``, which it keeps
    apart, and lets ``café`` composed and decomposed through, which it makes one.
    """
    labels = list(labels)
    if len(labels) < 2:  # nothing to pair (and no tokenizer to build)
        return []
    tokens = (tokenizer or clip_tokenizer())(labels)  # [C, L]
    _, group = torch.unique(tokens, dim=0, return_inverse=True)  # [C]: equal rows, equal group
    first: dict[int, int] = {}
    return [
        (labels[first[g]], label)
        for index, (label, g) in enumerate(zip(labels, group.tolist()))
        if first.setdefault(g, index) != index
    ]


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
    return ensemble(embeddings.reshape(len(labels), len(templates), -1))


def ensemble(embeddings: torch.Tensor) -> torch.Tensor:
    """Prompt embeddings ``[C, T, E]`` -> ``[C, E]``: each normalised, the mean over templates normalised."""
    return F.normalize(F.normalize(embeddings, dim=-1).mean(dim=1), dim=-1)


#: Show progress when more prompts than this are to be encoded (ADE20K with CLIP's templates: 12,000).
PROGRESS_MIN_PROMPTS = 300


class TextEmbedder:
    """Class names x templates -> unit class embeddings ``[C, E]`` (float32), cached in memory and on disk.

    Each label's embedding is the template ensemble (each prompt's embedding normalised, the mean
    over templates normalised again, as :func:`ensemble_text_embeddings`). Labels that neither cache
    holds are encoded in chunks of whole labels (balanced) of at most ``batch_size`` prompts where the
    templates allow, each chunk's prompts tokenized at once and sent in ``encode_text`` calls of at most
    ``batch_size`` prompts, template-major (the eager tower runs what prompts share once, however
    many templates a call holds), with tqdm progress past :data:`PROGRESS_MIN_PROMPTS` prompts; each
    chunk's entries are written as it finishes, so an interrupted run resumes from them.
    :attr:`seconds` says where the time went (tokenizing, the tower, cache reads and writes).

    Build it with :meth:`for_model` for a CLIP and an encoder; the arguments below are the parts.

    Args:
        encode_text: token ids ``[T, context]`` -> text embeddings ``[T, E]`` (an encoder's
            ``encode_text``; the encoders trim each prompt to its end-of-text token).
        tokenize: prompts -> token ids ``[T, context]``.
        model_key: everything that defines the embeddings (see :func:`pacl_fast.text_cache.text_model_key`):
            cache entries are only shared between equal keys. A function is called once, on first use
            (a key may need a hash of the weights, which a run that never embeds text should not pay).
        find_cut: ``(prompts, tokens) -> indices`` of prompts the tokenizer cut; such labels are
            named in a :class:`~pacl_fast.text_tower.PromptTruncatedWarning`, also when read from a cache.
        embed_dim: E, checked on every cache read (None: any length).
        context_length: the tokenizer's context, for the warning.
        cache_dir: the disk cache's folder (default ``$PACL_FAST_CACHE/text`` or ``~/.cache/pacl-fast/text``).
        use_disk_cache: False keeps embeddings in memory only.
        max_cache_bytes: the disk cache's size cap (least recently used entries are removed past it).
        batch_size: most prompts per ``encode_text`` call (a chunk's labels x templates, when that fits).
        progress: show a progress bar (None: when more than :data:`PROGRESS_MIN_PROMPTS` prompts are encoded).
        memory_entries: labels kept in memory (least recently used dropped first).
        device: where returned embeddings live.
    """

    def __init__(
        self,
        encode_text: Callable[[torch.Tensor], torch.Tensor],
        tokenize: Callable[[list[str]], torch.Tensor],
        model_key: str | Callable[[], str],
        *,
        find_cut: Callable[[list[str], torch.Tensor], list[int]] | None = None,
        embed_dim: int | None = None,
        context_length: int | None = None,
        cache_dir: str | Path | None = None,
        use_disk_cache: bool = True,
        max_cache_bytes: int = DEFAULT_MAX_BYTES,
        batch_size: int = 1024,
        progress: bool | None = None,
        memory_entries: int = 8192,
        device: str | torch.device = "cpu",
    ):
        if not callable(model_key) and (not isinstance(model_key, str) or not model_key):
            raise ValueError(f"model_key must be a non-empty string or a function giving one, got {model_key!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.encode_text = encode_text
        self.tokenize = tokenize
        self._model_key = model_key
        self.find_cut = find_cut
        self.embed_dim = embed_dim
        self.context_length = context_length
        self.disk = TextCache(cache_dir, max_cache_bytes) if use_disk_cache else None
        self.batch_size = batch_size
        self.progress = progress
        self.memory_entries = memory_entries
        self.device = torch.device(device)
        self._memory: OrderedDict[tuple[str, str], dict] = OrderedDict()
        self._lock = threading.Lock()
        self.encoded_prompts = 0  # prompts run through the text tower so far (cache misses x templates)
        self.seconds = dict.fromkeys(("tokenize", "encode", "cache_read", "cache_write"), 0.0)  # spent so far

    @classmethod
    def for_model(
        cls,
        backbone,  # noqa: ANN001 - pacl_fast.backbone.ClipBackbone
        encoder,  # noqa: ANN001 - pacl_fast.encoders.Encoder
        *,
        hash_weights: bool | None = None,
        **options,
    ) -> TextEmbedder:
        """The embedder of a CLIP's text through an encoder, keyed by the text tower's identity, the
        encoder's name and its text precision (``encoder.text_dtype``, else ``encoder.dtype``).

        ``hash_weights`` (see :func:`~pacl_fast.text_cache.text_model_key`): True for weights edited in
        memory; ``options``: the constructor's keywords (``cache_dir``, ``use_disk_cache``, ...).
        """
        text_dtype = getattr(encoder, "text_dtype", encoder.dtype)
        model_key = functools.partial(
            text_model_key, backbone, backend=encoder.name, dtype=text_dtype, hash_weights=hash_weights
        )
        options.setdefault("device", backbone.visual.conv1.weight.device)
        return cls(
            encoder.encode_text,
            functools.partial(backbone.tokenize, warn=False),  # the embedder names the labels instead
            model_key,
            find_cut=backbone.cut_texts,
            embed_dim=backbone.embed_dim,
            context_length=backbone.context_length,
            **options,
        )

    @property
    def model_key(self) -> str:
        """The cache key of the model (computed on first use when given as a function)."""
        if callable(self._model_key):
            key = self._model_key()
            if not isinstance(key, str) or not key:
                raise ValueError(f"model_key() must give a non-empty string, got {key!r}")
            self._model_key = key
        return self._model_key

    def __call__(self, labels: Sequence[str], templates: str | Sequence[str] = "imagenet") -> torch.Tensor:
        """Class names (and a template set name or list) -> unit embeddings ``[C, E]`` float32."""
        labels = validate_labels(labels, self.tokenize)
        templates = template_set(templates)
        key = templates_key(templates)
        with self._lock:
            entries = {label: self._cached(key, label) for label in labels}
            missing = [label for label, entry in entries.items() if entry is None]
            if missing:
                entries.update(self._compute(missing, templates, key))
                if self.disk is not None:
                    began = time.perf_counter()
                    self.disk.evict()
                    self.seconds["cache_write"] += time.perf_counter() - began
        cut = [label for label in labels if entries[label]["cut"]]
        if cut:
            shown = ", ".join(repr(label) for label in cut[:10]) + (", ..." if len(cut) > 10 else "")
            context = f"{self.context_length}-token " if self.context_length else ""
            message = (
                f"{len(cut)} of {len(labels)} labels make prompts longer than the text tower's {context}context, "
                f"which the tokenizer cut (labels that differ only after the cut embed identically): {shown}"
            )
            warnings.warn(message, PromptTruncatedWarning, stacklevel=2)
        return torch.stack([entries[label]["embedding"] for label in labels]).to(self.device)  # [C, E]

    def _cached(self, key: str, label: str) -> dict | None:
        """The entry from memory, else from disk (then kept in memory), else None."""
        entry = self._memory.get((key, label))
        if entry is not None:
            self._memory.move_to_end((key, label))
            return entry
        if self.disk is not None:
            model_key = self.model_key
            start = time.perf_counter()
            entry = self.disk.load(model_key, key, label, self.embed_dim)
            self.seconds["cache_read"] += time.perf_counter() - start
            if entry is not None:
                self._remember(key, label, entry)
        return entry

    def _remember(self, key: str, label: str, entry: dict) -> None:
        self._memory[(key, label)] = entry
        self._memory.move_to_end((key, label))
        while len(self._memory) > self.memory_entries:
            self._memory.popitem(last=False)

    def _compute(self, labels: list[str], templates: tuple[str, ...], key: str) -> dict[str, dict]:
        """Encode every prompt of ``labels``; store each label's entry as its chunk finishes."""
        from tqdm.auto import tqdm

        count = len(templates)
        total = len(labels) * count
        show = self.progress if self.progress is not None else total > PROGRESS_MIN_PROMPTS
        chunks = math.ceil(len(labels) / max(1, self.batch_size // count))
        per_chunk = math.ceil(len(labels) / chunks)  # balanced chunks of whole labels
        computed = {}
        with tqdm(total=total, desc="text embeddings", unit="prompt", disable=not show) as bar:
            for start in range(0, len(labels), per_chunk):
                chunk = labels[start : start + per_chunk]
                n = len(chunk)
                prompts = [template.format(label) for template in templates for label in chunk]  # template-major
                began = time.perf_counter()
                tokens = self.tokenize(prompts)  # [count * n, context]
                cut_rows = set(self.find_cut(prompts, tokens)) if self.find_cut is not None else set()
                self.seconds["tokenize"] += time.perf_counter() - began
                units = []  # [m, E] per call
                for first in range(0, len(prompts), self.batch_size):
                    batch = tokens[first : first + self.batch_size]  # [m, context]: whole templates mostly
                    began = time.perf_counter()
                    units.append(F.normalize(self.encode_text(batch).float().cpu(), dim=-1))
                    self.seconds["encode"] += time.perf_counter() - began
                    bar.update(len(batch))
                self.encoded_prompts += count * n
                embeddings = ensemble(torch.cat(units).reshape(count, n, -1).transpose(0, 1))  # [n, E]
                for j, label in enumerate(chunk):
                    entry = {
                        "embedding": embeddings[j].clone(),
                        "cut": any(t * n + j in cut_rows for t in range(count)),
                    }
                    computed[label] = entry
                    self._remember(key, label, entry)
                    if self.disk is not None:
                        began = time.perf_counter()
                        self.disk.store(self.model_key, key, label, entry["embedding"], entry["cut"])
                        self.seconds["cache_write"] += time.perf_counter() - began
        return computed
