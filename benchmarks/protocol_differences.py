"""What each difference between ``--protocol`` and the training-free papers' own pipelines does to the answer,
measured on the synthetic world with the demo CLIP (``pacl_fast.protocols.DIFFERENCES`` records the results).

    python -m benchmarks.protocol_differences --clip local-dir:pacl_fast/assets/demo/clip --scenes 500 \\
        --json benchmarks/results/protocol_differences.json

The presets are the papers', scaled to the demo CLIP (64 px, patch 8; ViT-B/16 is 224 px, patch 16): short side
96 where SCLIP and NACLIP use 336 (1.5x the native size), 128 where ClearCLIP uses 448 (2x); windows 64/32 where
they use 224/112, 128/64 for ClearCLIP's 448/224; logit scale 40 (SCLIP, NACLIP) or 50 (ClearCLIP); NACLIP's PAMR
(10 steps, dilations 8 and 16); CLIP's 80 ImageNet templates. The world has no background class, so no threshold
(the VOC20 / Context59 presets); prompts are the world's own templates (the CLIP was trained on its captions,
as the papers' CLIPs on web captions, whose analogue the ImageNet templates are). Held-out scenes of world seed
1, mIoU over the six shape classes. The world's surface patterns have a period of about 4 pixels at any image
size, so every resize moves them away from what the CLIP was trained on: the absolute numbers are lower than at
the CLIP's own 64 px (README, "Results"); what the rows measure is how far each difference moves the answer.

Each row changes one thing from what the engine runs under ``--protocol`` (mmcv's resize, NACLIP's PAMR guide,
float32) and reports the mIoU with and without it, and the share of scored pixels whose label changes. The
authors' window loop (``forward_slide``: each window's logits upsampled to its pixels, summed, divided by the
count; the patch embedding dropping pixels past the last whole patch, or ClearCLIP's centred padding) is written
out here in plain torch on the same encoder.
"""

from __future__ import annotations

import argparse
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from benchmarks.common import machine_line, write_results
from pacl_fast.backbone import RandomWeightsWarning
from pacl_fast.data.synthetic import (
    CLASS_NAMES,
    IGNORE_INDEX,
    SYNTHETIC_TEMPLATES,
    SyntheticSegmentation,
    WorldConfig,
)
from pacl_fast.images import Prepared, SegmentationPreprocess, SlidingWindow
from pacl_fast.metrics import SegmentationMetrics, confusion_matrix
from pacl_fast.protocols import protocol_labels
from pacl_fast.refine import pamr, resized_input_guide
from pacl_fast.segmenter import Segmenter

#: NACLIP's, SCLIP's and ClearCLIP's SegDataPreProcessor constants (0..255 units), e.g. naclip.py l. 24.
ROUNDED_MEAN = (122.771 / 255, 116.746 / 255, 104.094 / 255)
ROUNDED_STD = (68.501 / 255, 66.632 / 255, 70.323 / 255)


@dataclass(frozen=True)
class Setting:
    """One paper's protocol scaled to the demo CLIP."""

    name: str
    method: str
    short_side: int
    window: tuple[int, int] | None  # (crop, stride) in pixels, or None: the whole image
    logit_scale: float
    pamr: bool
    remainder: str  # "drop" (SCLIP, NACLIP: the patch embedding drops it) or "pad" (ClearCLIP)


SETTINGS = (
    Setting("sclip", "sclip", 96, (64, 32), 40.0, False, "drop"),
    Setting("naclip (whole image)", "naclip", 96, None, 40.0, True, "drop"),
    Setting("naclip (windows)", "naclip", 96, (64, 32), 40.0, True, "drop"),
    Setting("clearclip", "clearclip", 128, (128, 64), 50.0, False, "pad"),
)


class Scorer:
    """Confusion matrices of named variants, and how many scored pixels each changes against the baseline."""

    def __init__(self) -> None:
        self.confusion: dict[str, np.ndarray] = {}
        self.changed: dict[str, int] = {}
        self.scored = 0

    def add(self, variant: str, labels: np.ndarray, truth: np.ndarray, baseline: np.ndarray | None) -> None:
        counts = confusion_matrix(labels, truth, len(CLASS_NAMES), IGNORE_INDEX).numpy()
        self.confusion[variant] = self.confusion.get(variant, 0) + counts
        if baseline is not None:
            scored = truth != IGNORE_INDEX
            self.changed[variant] = self.changed.get(variant, 0) + int((labels != baseline)[scored].sum())

    def miou(self, variant: str) -> float:
        return SegmentationMetrics(CLASS_NAMES, self.confusion[variant]).miou


def engine_logits(segmenter: Segmenter, texts: torch.Tensor, prepared: Prepared, setting: Setting) -> torch.Tensor:
    """Cosine logits ``[C, H, W]`` at the image size, as ``evaluate_segmentation`` gets them under a protocol."""
    window = None if setting.window is None else SlidingWindow(*setting.window)
    return segmenter.image_logits(prepared, texts, window)


def authors_logits(segmenter: Segmenter, texts: torch.Tensor, prepared: Prepared, setting: Setting) -> torch.Tensor:
    """The repositories' ``forward_slide`` / ``forward_feature`` then the resize to the image, written out.

    On the network input (the resized, normalised image, no padding): windows placed as theirs (the last flush
    with the border), each window cut to whole patches (``drop``: the stride-p convolution never sees the
    rest, and the window's logits are stretched over all its pixels) or padded in the middle with zeros
    (``pad``: ClearCLIP, the logits cropped back), upsampled bilinearly to the window's pixels, summed and
    divided by the count; then resized to the original image (bilinear, ``align_corners=False``).
    """
    height, width = prepared.geometry.resized_size
    image = prepared.pixels[None, :, :height, :width]  # [1, 3, h, w]
    p = segmenter.patch_size
    crop, stride = setting.window if setting.window is not None else (max(height, width), 1)

    def window_logits(pixels: torch.Tensor) -> torch.Tensor:  # [1, 3, H, W] -> [1, C, H, W]
        rows, cols = pixels.shape[-2:]
        if setting.remainder == "pad":
            pad_w, pad_h = (-cols) % p, (-rows) % p
            left, top = pad_w // 2, pad_h // 2
            padded = F.pad(pixels, (left, pad_w - left, top, pad_h - top))
            logits = patch_logits(padded)
            logits = F.interpolate(logits, size=padded.shape[-2:], mode="bilinear", align_corners=False)
            return logits[..., top : top + rows, left : left + cols]
        logits = patch_logits(pixels[..., : rows - rows % p, : cols - cols % p])
        return F.interpolate(logits, size=(rows, cols), mode="bilinear", align_corners=False)

    def patch_logits(pixels: torch.Tensor) -> torch.Tensor:  # [1, 3, H, W] (patch multiples) -> [1, C, h, w]
        embeddings = segmenter.encoder.encode_image(pixels.to(segmenter.device)).float()  # [1, h, w, E]
        return (embeddings @ texts.float().T).permute(0, 3, 1, 2)

    rows_n = max(height - crop + stride - 1, 0) // stride + 1
    cols_n = max(width - crop + stride - 1, 0) // stride + 1
    total = torch.zeros(1, texts.shape[0], height, width)
    count = torch.zeros(1, 1, height, width)
    for i in range(rows_n):
        for j in range(cols_n):
            y2, x2 = min(i * stride + crop, height), min(j * stride + crop, width)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            total[..., y1:y2, x1:x2] += window_logits(image[..., y1:y2, x1:x2])
            count[..., y1:y2, x1:x2] += 1
    logits = total / count
    return F.interpolate(logits, size=prepared.geometry.original_size, mode="bilinear", align_corners=False)[0]


def labels_of(logits: torch.Tensor, prepared: Prepared, setting: Setting, guide: str = "naclip") -> np.ndarray:
    """PAMR (NACLIP) with the named guide, then the protocols' softmax and argmax -> labels ``[H, W]``."""
    if setting.pamr:
        height, width = prepared.geometry.resized_size
        if guide == "naclip":
            image = resized_input_guide(prepared.pixels[None, :, :height, :width], prepared.geometry.original_size)
        else:
            image = prepared.image[None].float()
        logits = pamr(image, logits[None].float(), 10, (8, 16))[0]
    classes = np.arange(logits.shape[0])
    return protocol_labels(logits, classes, logit_scale=setting.logit_scale).numpy()


#: The side of the scenes rendered for the shrink rows (the short side of VOC's 500 x 375 photos goes to 336: 0.9x;
#: 144 px scenes go to 96: 0.67x, as 500 px long sides go to 336).
LARGE_SCENES = 144

_SEGMENTERS: dict[tuple[str, str, str], Segmenter] = {}


def segmenter_for(clip: str, method: str, dtype: str) -> Segmenter:
    """One segmenter per (CLIP, method, precision); fp16 runs the text tower in fp16 too."""
    key = (clip, method, dtype)
    if key not in _SEGMENTERS:
        options = {"text_dtype": torch.float16} if dtype == "float16" else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RandomWeightsWarning)
            _SEGMENTERS[key] = Segmenter(clip, method=method, device="cpu", dtype=dtype, encoder_options=options)
    return _SEGMENTERS[key]


def measure(
    clip: str, scenes: int, setting: Setting, progress: bool
) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """mIoU of every variant of ``setting``, their share of changed pixels, and seconds spent."""
    fp32, fp16 = segmenter_for(clip, setting.method, "float32"), segmenter_for(clip, setting.method, "float16")
    texts = fp32.encode_labels(list(CLASS_NAMES), SYNTHETIC_TEMPLATES)  # [C, E]
    texts16 = fp16.encode_labels(list(CLASS_NAMES), SYNTHETIC_TEMPLATES)
    mean, std, patch = fp32.mean, fp32.std, fp32.patch_size

    def prepare(kernel: str, short: int, image_mean=mean, image_std=std) -> SegmentationPreprocess:
        limit = 2048 if kernel == "mmcv" else None
        return SegmentationPreprocess(short, patch, image_mean, image_std, keep_image=True, kernel=kernel,
                                      max_long_side=limit)  # fmt: skip

    def labels(segmenter: Segmenter, text: torch.Tensor, prepared: Prepared, guide: str = "naclip") -> np.ndarray:
        return labels_of(engine_logits(segmenter, text, prepared, setting), prepared, setting, guide)

    off_grid = setting.short_side + patch // 2  # sides of 12.5 patches: a remainder in every window
    scorer, seconds = Scorer(), {"engine": 0.0, "authors": 0.0}
    world = SyntheticSegmentation(scenes, seed=1)
    large_world = SyntheticSegmentation(scenes, seed=1, config=WorldConfig(image_size=LARGE_SCENES))
    for index in tqdm(range(scenes), desc=setting.name, disable=not progress):
        image, truth = world[index]
        prepared = prepare("mmcv", setting.short_side)(image)
        start = time.perf_counter()
        base = labels(fp32, texts, prepared)
        seconds["engine"] += time.perf_counter() - start
        scorer.add("engine", base, truth, None)
        scorer.add("bicubic", labels(fp32, texts, prepare("bicubic", setting.short_side)(image)), truth, base)
        if setting.pamr:
            scorer.add("original_guide", labels(fp32, texts, prepared, guide="original"), truth, base)
        logits16 = engine_logits(fp16, texts16, prepared, setting).half().float()  # fp16 tower, text, cosines
        scorer.add("fp16", labels_of(logits16, prepared, setting), truth, base)
        start = time.perf_counter()
        authors = authors_logits(fp32, texts, prepared, setting)
        seconds["authors"] += time.perf_counter() - start
        scorer.add("authors_windows", labels_of(authors, prepared, setting), truth, base)
        rounded = prepare("mmcv", setting.short_side, ROUNDED_MEAN, ROUNDED_STD)(image)
        scorer.add("rounded_norm", labels(fp32, texts, rounded), truth, base)
        odd = prepare("mmcv", off_grid)(image)
        odd_base = labels(fp32, texts, odd)
        scorer.add("engine_off_grid", odd_base, truth, None)
        scorer.add("authors_off_grid", labels_of(authors_logits(fp32, texts, odd, setting), odd, setting), truth,
                   odd_base)  # fmt: skip
        large, large_truth = large_world[index]
        shrunk = labels(fp32, texts, prepare("mmcv", setting.short_side)(large))
        scorer.add("engine_shrink", shrunk, large_truth, None)
        scorer.add("bicubic_shrink", labels(fp32, texts, prepare("bicubic", setting.short_side)(large)), large_truth,
                   shrunk)  # fmt: skip
    mious = {variant: scorer.miou(variant) for variant in scorer.confusion}
    scored = int(sum((world[i][1] != IGNORE_INDEX).sum() for i in range(scenes)))
    scored_large = int(sum((large_world[i][1] != IGNORE_INDEX).sum() for i in range(scenes)))
    changed = {v: n / (scored_large if v.endswith("_shrink") else scored) for v, n in scorer.changed.items()}
    return mious, changed, seconds


#: variant -> (its baseline, what it changes)
ROWS = {
    "bicubic": ("engine", "resize: the engine's own bicubic, antialiased (before this fix) instead of mmcv's"),
    "bicubic_shrink": ("engine_shrink", f"the same, on {LARGE_SCENES} px scenes shrunk to the short side"),
    "original_guide": ("engine", "PAMR guided by the original image (before this fix) instead of NACLIP's"),
    "fp16": ("engine", "fp16 image and text towers, fp16 cosines (the repositories run CLIP in fp16 on CUDA)"),
    "authors_windows": ("engine", "logits upsampled to pixels per window, then averaged (the repositories)"),
    "authors_off_grid": ("engine_off_grid", "the same with sides of 12.5 patches: remainder dropped / padded"),
    "rounded_norm": ("engine", "mean/std rounded to 3 decimals in 0..255 units (the repositories' constants)"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clip", default="local-dir:pacl_fast/assets/demo/clip", help="the CLIP (no PACL weights)")
    parser.add_argument("--scenes", type=int, default=500, help="held-out scenes of world seed 1")
    parser.add_argument("--settings", default=",".join(s.name for s in SETTINGS), help="which presets, by name")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    chosen = [s for s in SETTINGS if s.name in args.settings.split(",")]
    print(machine_line(torch.device("cpu")))
    print(f"clip={args.clip} scenes={args.scenes} (world seed 1)")
    results = {}
    for setting in chosen:
        mious, changed, seconds = measure(args.clip, args.scenes, setting, not args.no_progress)
        results[setting.name] = {"setting": setting.__dict__, "miou": mious, "changed": changed, "seconds": seconds}
    print("| preset | difference | mIoU (engine) | mIoU (with it) | change | pixels changed |")
    print("|---|---|---:|---:|---:|---:|")
    for name, result in results.items():
        mious, changed = result["miou"], result["changed"]
        for variant, (baseline, description) in ROWS.items():
            if variant not in mious:
                continue
            delta = mious[variant] - mious[baseline]
            print(f"| {name} | {description} | {mious[baseline]:.4f} | {mious[variant]:.4f} | {delta:+.4f} | "
                  f"{100 * changed[variant]:.2f}% |")  # fmt: skip
    if args.json is not None:
        write_results(args.json, {"machine": machine_line(torch.device("cpu")), "clip": args.clip,
                                  "scenes": args.scenes, "rows": ROWS, "results": results})  # fmt: skip


if __name__ == "__main__":
    main()
