"""Zero-shot classification, the paper's second claim: PACL's compatibility beside plain CLIP.

Both score the same CLIP-preprocessed pixels (short side to the CLIP's size, bicubic; centre
crop; CLIP mean/std) against the same prompt-ensembled class embeddings:

* ``pacl``: ``phi(x, y)``, the compatibility of the image's patch embeddings with the class text
  (``pacl_fast.model.compatibility``: softmax-over-patches pooling, then cosine);
* ``clip``: cosine of CLIP's global image embedding with the class text.

A class asked for with several names (synonyms) scores the best of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pacl_fast.data.names import ClassQueries
from pacl_fast.images import ClipPreprocess, ImageInput
from pacl_fast.model import compatibility
from pacl_fast.segmenter import Segmenter

METHODS = ("pacl", "clip")


class ZeroShotClassifier:
    """Scores images against class names with PACL and with CLIP.

    Example::

        classifier = ZeroShotClassifier(Segmenter("ViT-B-16", "laion2b_s34b_b88k", "pacl.safetensors"))
        top = classifier.classify(["cat.jpg"], ["cat", "dog", "car"], top_k=2)
        top[0]["pacl"]   # [("cat", 0.93), ("dog", 0.05)]
    """

    def __init__(self, segmenter: Segmenter):
        if segmenter.method != "pacl":
            raise ValueError(
                f"zero-shot classification scores PACL's compatibility beside CLIP; this segmenter runs "
                f"{segmenter.method!r}: build it with method='pacl' and PACL weights"
            )
        self.segmenter = segmenter
        self.model = segmenter.model
        backbone = self.model.backbone
        # CLIP's global embedding needs its native grid, so both methods see the native size.
        self.preprocess = ClipPreprocess(backbone.image_size, *backbone.mean_std, segmenter.max_pixels)
        # Read once: a float() of a CUDA tensor per batch is a host-device sync (the model is frozen).
        self.patch_logit_scale = float(self.model.patch_logit_scale.detach())

    def encode_classes(self, classes: ClassQueries, templates: str | Sequence[str] = "imagenet") -> torch.Tensor:
        """Unit text embeddings of every query ``[Q, E]`` (prompt ensembles, cached)."""
        return self.segmenter.encode_labels(classes.queries, templates)

    @torch.inference_mode()
    def score(
        self, pixels: torch.Tensor, class_embeddings: torch.Tensor, classes: ClassQueries
    ) -> dict[str, torch.Tensor]:
        """``[B, 3, S, S]`` preprocessed pixels -> ``{"pacl": [B, C], "clip": [B, C]}`` float32 scores in [-1, 1]."""
        encoder = self.segmenter.encoder
        texts = class_embeddings.to(self.segmenter.device).float()  # [Q, E]
        patches = encoder.encode_image(pixels).flatten(1, 2).float()  # [B, N, E]
        pacl = compatibility(patches, texts, self.patch_logit_scale)  # [B, Q]
        image = encoder.encode_global(pixels).to(texts.device)  # [B, E]
        clip = image @ texts.T  # [B, Q]
        return {"pacl": classes.scores_to_classes(pacl), "clip": classes.scores_to_classes(clip)}

    def logit_scales(self) -> dict[str, float]:
        """The temperature each method was trained with (turns scores into probabilities)."""
        return {"pacl": self.segmenter.logit_scale, "clip": float(self.model.backbone.clip.logit_scale.exp())}

    def classify(
        self,
        images: Sequence[ImageInput],
        labels: Sequence[str | Sequence[str]],
        *,
        templates: str | Sequence[str] = "imagenet",
        top_k: int = 5,
    ) -> list[dict[str, list[tuple[str, float]]]]:
        """Top-k ``(class, probability)`` per image and method; a class is a name or a list of synonyms."""
        classes = ClassQueries.from_names(labels)
        embeddings = self.encode_classes(classes, templates)
        names = [synonyms[0] for synonyms in classes.names]
        k = min(top_k, classes.num_classes)
        scales = self.logit_scales()
        results = []
        batch_size = self.segmenter.batch_size
        for start in range(0, len(images), batch_size):
            pixels = torch.stack([self.preprocess(image) for image in images[start : start + batch_size]])
            scores = self.score(pixels, embeddings, classes)
            batch = [{} for _ in range(pixels.shape[0])]
            for method in METHODS:
                probabilities = torch.softmax(scores[method] * scales[method], dim=-1).cpu()
                values, indices = probabilities.topk(k, dim=-1)
                for row, (v, i) in enumerate(zip(values.tolist(), indices.tolist())):
                    batch[row][method] = [(names[c], p) for c, p in zip(i, v)]
            results.extend(batch)
        return results
