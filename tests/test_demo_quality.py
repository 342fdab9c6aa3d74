"""The shipped demo weights segment: a quality regression on held-out synthetic scenes.

The full table (500 scenes, probes, chance) is ``python -m benchmarks.synthetic_quality``; this
checks, through the whole product path (Segmenter, fast head, evaluator), that PACL on the
shipped CLIP stays far above the same CLIP's own projection (the MaskCLIP-style baseline, which
is exactly an untrained PACL: linear path at CLIP's proj, silent MLP).
"""

import warnings

import pytest

from pacl_fast.backbone import RandomWeightsWarning
from pacl_fast.build import DEMO_CLIP
from pacl_fast.data.segmentation import open_dataset
from pacl_fast.demo import demo_segmenter
from pacl_fast.evaluate import evaluate_segmentation
from pacl_fast.segmenter import Segmenter

SCENES = 60


@pytest.fixture(scope="module")
def validation():
    return open_dataset("synthetic", None, "val")


def test_shipped_pacl_segments_the_validation_scenes(validation):
    report = evaluate_segmentation(demo_segmenter(), validation, limit=SCENES, progress=False)
    assert report.metrics.miou >= 0.70, report.metrics.table()
    assert report.metrics.aacc >= 0.80


def test_shipped_pacl_beats_the_clip_projection_baseline(validation):
    pacl = evaluate_segmentation(demo_segmenter(), validation, limit=SCENES, progress=False).metrics.miou
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        baseline_segmenter = Segmenter(f"local-dir:{DEMO_CLIP}", method="pacl", device="cpu")
    baseline = evaluate_segmentation(baseline_segmenter, validation, limit=SCENES, progress=False).metrics.miou
    assert pacl >= 2.0 * baseline, (pacl, baseline)
