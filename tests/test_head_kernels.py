"""The fused head (``kernels/tiled.py``, ``kernels/upsample_argmax.py``) held to ``kernels/reference.py``.

Which path each test proves:

* ``tiled``: the CPU path that ``Head("fast")`` uses without CUDA, in eager torch (``PACL_FAST_NATIVE=off``,
  set for every test here); its labels-only mode (``with_scores=False``) is ``kernels/separable.py`` (the
  ``test_separable_*`` tests stress it).
* ``native``: the same entry point with the native kernel (``kernels/native.py``, built once per session
  in the tests' cache folder; skipped, with the reason, where no C compiler builds it).
* ``triton``: the Triton kernel's logic, run by the Triton interpreter on CPU tensors
  (``TRITON_INTERPRET=1``, set by ``conftest.py`` before triton is imported). The kernel reads
  the logits as float32 whatever their dtype, so the fp16/bf16 cases prove the same code as on a
  GPU; what the interpreter cannot prove (compilation, the GPU's float rounding) is covered by the
  ``gpu``-marked tests at the end, which ``benchmarks/gpu_check.sh`` runs on CUDA. The interpreter runs
  each program in Python, so its costliest cases are smaller versions of the CPU paths' (``INTERPRETER_SHAPES``:
  the same classes, dtypes, batches, extents, scales and thresholds on fewer grid points).

With scores, the tiled path is ``kernels/scores.py``: a dense evaluation (every class) where cells
keep most classes, blocks of gathered classes elsewhere; tests force each, and the
native kernel's two (every class, or each cell's list): ``test_each_score_path_*``.

Every call writes into outputs poisoned beforehand (labels 12345, scores NaN), so an unwritten
pixel fails. Labels must equal the reference wherever the reference's top-2 margin exceeds 1e-6
(for half inputs too: both sides upcast the same half logits), and elsewhere must be a class within
1e-6 of the best; scores must be within 1e-6 of the reference's, which computes them in float64
(issue 20: "scores within 1e-6").
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
import torch.nn.functional as F

from kernels import cells, native
from kernels.reference import BACKGROUND, segment_reference, upsample_logits
from kernels.tiled import segment_tiled
from pacl_fast.head import Head
from pacl_fast.profiling import TensorMemoryTracker

try:
    from kernels._triton import interpreting
    from kernels.upsample_argmax import segment_triton
except ImportError:  # no triton installed
    interpreting, segment_triton = None, None

POISON_LABEL = 12345
MARGIN = 1e-6
SCORE_ATOL = 1e-6

needs_interpreter = pytest.mark.skipif(
    segment_triton is None or not interpreting(),
    reason="Triton interpreter not active in this process (TRITON_INTERPRET=1 must be set before triton is "
    "imported; conftest does so without CUDA): CPU runs of the Triton kernels are skipped",
)


@pytest.fixture(autouse=True)
def eager_cpu_head(monkeypatch):
    """Every test here picks its CPU path: ``tiled`` is eager torch unless a test runs ``native``."""
    monkeypatch.setenv(native.ENV, "off")


@contextlib.contextmanager
def native_kernel():
    """The native kernel on (``$PACL_FAST_NATIVE=on``) for the block. Skips where no C compiler is found;
    fails where one is and the kernel still does not build, load or pass its self-test."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(native.ENV, "on")
        if native.kernel() is None:
            if native.compiler() is None:
                pytest.skip(f"no native kernel: {native.status()}")
            pytest.fail(f"the native kernel does not build here: {native.status()}")
        yield


def cuda_test(test):
    """Marks a test of the compiled kernels: needs CUDA, and triton not in interpreter mode."""
    for mark in (
        pytest.mark.gpu,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        pytest.mark.skipif(
            segment_triton is None or interpreting(),
            reason="no triton, or TRITON_INTERPRET=1: the kernels would not be compiled",
        ),
    ):
        test = mark(test)
    return test


def make_logits(
    generator: torch.Generator,
    batch: int,
    h: int,
    w: int,
    classes: int,
    kind: str,
    dtype: torch.dtype,
    noise_level: float = 0.05,
) -> torch.Tensor:
    """Test logits ``[B, h, w, C]``: ``"scene"`` (regions won by one class, plus noise) or ``"soft"``
    (small iid noise, so that at ``logit_scale`` 100 many classes share the probability)."""
    noise = torch.randn(batch, h, w, classes, generator=generator)
    if kind == "soft":
        return (0.02 * noise).to(dtype)
    regions = min(classes, 4)
    seeds = torch.rand(batch, regions, 2, generator=generator) * torch.tensor([h, w])
    yy, xx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    distance = (yy - seeds[..., 0, None, None]) ** 2 + (xx - seeds[..., 1, None, None]) ** 2  # [B, R, h, w]
    region_class = torch.randint(classes, (batch, regions), generator=generator)
    winner = region_class.gather(1, distance.argmin(1).flatten(1)).view(batch, h, w)
    return (noise_level * noise + 0.25 * F.one_hot(winner, classes)).to(dtype)


def poisoned(
    batch: int, size: tuple[int, int], device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.full((batch, *size), POISON_LABEL, dtype=torch.int16, device=device)
    return labels, torch.full((batch, *size), float("nan"), device=device)


def assert_matches_reference(
    labels: torch.Tensor,
    scores: torch.Tensor,
    logits: torch.Tensor,
    out_size: tuple[int, int],
    grid_extent: tuple[float, float] | None,
    logit_scale: float,
    background_threshold: float | None,
    score_atol: float = SCORE_ATOL,
) -> None:
    logits = logits.cpu()
    labels, scores = labels.cpu(), scores.cpu()
    want_labels, want_scores = segment_reference(
        logits,
        out_size,
        grid_extent=grid_extent,
        logit_scale=logit_scale,
        background_threshold=background_threshold,
    )
    assert scores.dtype == torch.float32 and scores.shape == want_scores.shape
    assert torch.isfinite(scores).all(), f"{int((~torch.isfinite(scores)).sum())} scores never written"
    torch.testing.assert_close(scores, want_scores, atol=score_atol, rtol=0)
    assert_labels_match(labels, want_labels, logits, out_size, grid_extent, want_scores, background_threshold)


def assert_labels_match(
    labels: torch.Tensor,
    want_labels: torch.Tensor,
    logits: torch.Tensor,
    out_size: tuple[int, int],
    grid_extent: tuple[float, float] | None,
    want_scores: torch.Tensor | None = None,
    background_threshold: float | None = None,
) -> None:
    """Labels equal the reference's where its top-2 margin is clear; elsewhere within it of the best."""
    assert labels.dtype == torch.int16 and labels.shape == want_labels.shape
    assert not (labels == POISON_LABEL).any(), f"{int((labels == POISON_LABEL).sum())} labels never written"
    upsampled = upsample_logits(logits, out_size, grid_extent)  # [B, C, H, W]
    if upsampled.shape[1] > 1:
        top2 = upsampled.topk(2, dim=1).values
        margin = top2[:, 0] - top2[:, 1]
    else:
        margin = torch.full_like(upsampled[:, 0], torch.inf)
    decided = margin > MARGIN
    if background_threshold is not None:
        decided &= (want_scores - background_threshold).abs() > SCORE_ATOL
    wrong = (labels != want_labels) & decided
    assert not wrong.any(), (
        f"{int(wrong.sum())} of {int(decided.sum())} decided labels differ, first at {wrong.nonzero()[0].tolist()}"
    )
    # Undecided pixels: still a class within the margin of the best (or background).
    classes = labels.long().clamp_min(0)
    chosen = upsampled.gather(1, classes[:, None]).squeeze(1)
    near_best = (chosen >= upsampled.amax(1) - MARGIN) | (labels == BACKGROUND)
    assert near_best.all(), f"{int((~near_best).sum())} labels are not within {MARGIN} of the best class"


# (B, h, w, C, H, W, kind): awkward on purpose. Grids from 1x1 to 40x30, never multiples of the
# kernels' blocks; outputs with non-integer scales, equal sizes (ATen's copy shortcut), 1-pixel sides.
CASES = [
    (1, 1, 1, 1, 1, 1, "scene"),
    (3, 1, 1, 5, 7, 3, "soft"),
    (2, 1, 7, 4, 1, 29, "scene"),
    (1, 7, 1, 9, 33, 1, "soft"),
    (2, 3, 5, 2, 10, 17, "soft"),
    (1, 5, 3, 300, 11, 7, "scene"),
    (1, 40, 30, 13, 9, 7, "scene"),
    (2, 9, 13, 150, 37, 29, "scene"),
    (1, 9, 14, 21, 50, 83, "scene"),
    (3, 6, 4, 3, 6, 4, "soft"),
    (1, 6, 9, 7, 6, 23, "scene"),
    (2, 11, 7, 33, 19, 101, "scene"),
    (1, 4, 4, 64, 64, 64, "scene"),
    (1, 12, 19, 5, 31, 45, "scene"),
    (1, 2, 2, 17, 5, 3, "soft"),
    (2, 5, 6, 12, 21, 14, "soft"),
    (1, 13, 9, 171, 26, 18, "scene"),
    (1, 3, 40, 8, 7, 79, "scene"),
    (2, 8, 8, 1, 30, 30, "scene"),
    (1, 10, 12, 40, 1, 1, "scene"),
    (1, 11, 15, 250, 47, 35, "scene"),
    (3, 7, 5, 6, 13, 13, "soft"),
]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# The interpreter's versions of the cases whose grids cost it most (5-25 s each at full size): the same
# batch, classes and kind (and, by index, dtype, extent, scale and threshold) on 3-6 grid points a side,
# outputs at non-integer scales again. The CPU paths and CUDA run every case at full size.
INTERPRETER_SHAPES = {
    7: (2, 4, 6, 150, 17, 13, "scene"),
    8: (1, 4, 6, 21, 22, 37, "scene"),
    11: (2, 5, 3, 33, 9, 43, "scene"),
    13: (1, 5, 6, 5, 13, 15, "scene"),
    16: (1, 6, 4, 171, 13, 9, "scene"),
    18: (2, 4, 4, 1, 15, 15, "scene"),
    20: (1, 5, 6, 250, 21, 14, "scene"),
}


def case_shape(index: int, backend: str = "tiled") -> tuple:
    """``CASES[index]``, or its smaller version for the Triton interpreter."""
    if backend == "triton" and interpreting is not None and interpreting():
        return INTERPRETER_SHAPES.get(index, CASES[index])
    return CASES[index]


def case_arguments(index: int, backend: str = "tiled") -> tuple[torch.Tensor, tuple[int, int], dict]:
    """Logits and head arguments of case ``index``: dtype, crop extent, scale and background vary."""
    batch, h, w, classes, height, width, kind = case_shape(index, backend)
    generator = torch.Generator().manual_seed(1000 + index)
    logits = make_logits(generator, batch, h, w, classes, kind, DTYPES[index % 3])
    extent = None
    if index % 2 == 1:  # a padded model input: the original covers part of the grid
        extent = tuple(round(n * (0.55 + 0.45 * float(torch.rand((), generator=generator))), 3) for n in (h, w))
    logit_scale = (100.0, 37.5, 100.0, 7.0)[index % 4]
    threshold = round(0.2 + 0.6 * float(torch.rand((), generator=generator)), 3) if index % 3 == 2 else None
    return (
        logits,
        (height, width),
        {"grid_extent": extent, "logit_scale": logit_scale, "background_threshold": threshold},
    )


def run_segment(backend: str, logits: torch.Tensor, out_size: tuple[int, int], **kwargs):
    """``backend`` ("tiled", "native" or "triton") into poisoned outputs."""
    out = poisoned(logits.shape[0], out_size, logits.device)
    segment = segment_triton if backend == "triton" else segment_tiled
    with native_kernel() if backend == "native" else contextlib.nullcontext():
        returned = segment(logits, out_size, out=out, **kwargs)
    assert returned[0] is out[0] and returned[1] is out[1]
    return out


CPU_BACKENDS = ["tiled", "native"]
BACKENDS = [*CPU_BACKENDS, pytest.param("triton", marks=needs_interpreter)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("index", range(len(CASES)), ids=lambda i: "x".join(map(str, CASES[i][:6])))
def test_segment_matches_reference(backend, index):
    logits, out_size, kwargs = case_arguments(index, backend)
    labels, scores = run_segment(backend, logits, out_size, **kwargs)
    assert_matches_reference(labels, scores, logits, out_size, **kwargs)


def run_labels_only(backend: str, logits: torch.Tensor, out_size: tuple[int, int], **kwargs) -> torch.Tensor:
    """``with_scores=False`` into poisoned buffers: the labels are written, the scores left alone."""
    labels, scores = poisoned(logits.shape[0], out_size, logits.device)
    segment = segment_triton if backend == "triton" else segment_tiled
    with native_kernel() if backend == "native" else contextlib.nullcontext():
        returned = segment(logits, out_size, out=(labels, scores), with_scores=False, **kwargs)
    assert returned[0] is labels and returned[1] is None
    assert torch.isnan(scores).all(), "a labels-only call wrote into the scores buffer"
    return labels


@pytest.mark.parametrize("kind", ["scene", "random"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("index", range(len(CASES)), ids=lambda i: "x".join(map(str, CASES[i][:6])))
def test_labels_only_matches_reference(backend, index, kind):
    """Labels without scores: the same labels as the reference's upsample + argmax, on scene-like
    logits and on structureless ones (where the score bound keeps almost every class)."""
    logits, out_size, kwargs = case_arguments(index, backend)
    if kind == "random":
        generator = torch.Generator().manual_seed(2000 + index)
        logits = (torch.randn(logits.shape, generator=generator) * 0.04).to(logits.dtype)
    kwargs.pop("background_threshold")
    labels = run_labels_only(backend, logits, out_size, **kwargs)
    want_labels, no_scores = segment_reference(logits, out_size, with_scores=False, **kwargs)
    assert no_scores is None
    assert_labels_match(labels, want_labels, logits.float(), out_size, kwargs["grid_extent"])


# Cells larger than one Triton tile (the interpreter's tiles are at most 32 rows x 64 columns): every case
# has cells over 32 rows and over 64 columns, so pixel tiles start inside a cell and the last one is ragged.
# (B, h, w, C, H, W, grid_extent, dtype): 2x2 -> 80x150 (cells of 60x112 at the border); a 2x3 grid whose
# middle column of cells is 65 wide (a 64 + 1 split); a padded input (the crop maps through the cells); a
# 3x3 grid at the cell size of a 480x640 photo on ViT-B/16 (14x14 grid: 34 x 46 pixels a cell, 51 x 69 at
# the border), and one at that of a 7x9 grid on 480x640 (68 x 71, 103 x 107 at the border: 4 x 2 tiles).
# The whole photos are in the slow test_photo_sized_outputs (the interpreter takes 15-30 s on each).
LARGE_CELL_CASES = [
    (1, 2, 2, 7, 80, 150, None, torch.float32),
    (2, 2, 3, 4, 70, 195, None, torch.float16),
    (2, 3, 4, 9, 101, 203, (2.6, 3.3), torch.bfloat16),
    (1, 3, 3, 40, 103, 137, None, torch.float32),
    (1, 3, 3, 5, 206, 213, None, torch.float32),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", LARGE_CELL_CASES, ids=lambda c: "x".join(map(str, c[:6])))
def test_cells_larger_than_a_tile(backend, case):
    """Labels and scores (with a background threshold), and labels alone, where cells span several tiles."""
    batch, h, w, classes, height, width, extent, dtype = case
    generator = torch.Generator().manual_seed(h * 100 + w)
    logits = make_logits(generator, batch, h, w, classes, "scene", dtype)
    axes = zip((h, w), (height, width), extent or (h, w))
    spans = [cells.axis_sampling(n, out, e).largest_span for n, out, e in axes]
    assert spans[0] > 32 and spans[1] > 64, spans  # the case crosses tile boundaries in both directions
    kwargs = {"grid_extent": extent, "logit_scale": 100.0, "background_threshold": 0.6}
    labels, scores = run_segment(backend, logits, (height, width), **kwargs)
    assert_matches_reference(labels, scores, logits, (height, width), **kwargs)
    assert (labels == BACKGROUND).any() and (labels >= 0).any()  # the threshold splits the pixels
    labels = run_labels_only(backend, logits, (height, width), grid_extent=extent)
    want_labels, _ = segment_reference(logits, (height, width), grid_extent=extent, with_scores=False)
    assert_labels_match(labels, want_labels, logits.float(), (height, width), extent)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grid", [(14, 14), (7, 9)], ids=lambda g: f"{g[0]}x{g[1]}")
def test_photo_sized_outputs(backend, grid):
    """A 480x640 photo on ViT-B/16's 14x14 grid at 224 px (cells of 34-51 rows, 46-69 columns), and on a 7x9 grid
    (68-103 x 71-107)."""
    generator = torch.Generator().manual_seed(14)
    logits = make_logits(generator, 1, *grid, 21, "scene", torch.float16)
    labels, scores = run_segment(backend, logits, (480, 640), logit_scale=100.0)
    assert_matches_reference(labels, scores, logits, (480, 640), None, 100.0, None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_bands_match_one_band(backend, monkeypatch):
    """Bands of cell rows are an implementation detail: a budget forcing 2-5 rows per band gives
    the same labels as one band (with and without scores) and the same scores to rounding."""
    import kernels.scores
    import kernels.upsample_argmax

    logits, out_size, kwargs = case_arguments(16, backend)  # 13 x 9 grid (interpreter: 6 x 4), 171 classes
    one_band = run_segment(backend, logits, out_size, **kwargs)
    labels_only = run_labels_only(backend, logits, out_size, grid_extent=kwargs["grid_extent"])
    if backend != "triton":  # 3 rows of refined cells a band (17 refined columns), chunks of 2-3 blocks
        monkeypatch.setattr(kernels.scores, "BAND_ELEMENTS", 3 * 17 * 172)  # native labels: 5 grid rows a band
        monkeypatch.setattr(kernels.scores, "CHUNK_ELEMENTS", 3 * 7 * 172)
    else:  # 2 rows of refined cells a band with scores (7 refined columns), 3 grid rows without
        monkeypatch.setattr(kernels.upsample_argmax, "PRUNE_ELEMENTS", 2 * 4 * 7 * 171)
    banded = run_segment(backend, logits, out_size, **kwargs)
    assert torch.equal(banded[0], one_band[0])
    # Bands group pixels differently, so a score's sum runs over differently padded slots: ulps.
    torch.testing.assert_close(banded[1], one_band[1], atol=1e-6, rtol=0)
    banded_labels = run_labels_only(backend, logits, out_size, grid_extent=kwargs["grid_extent"])
    assert torch.equal(banded_labels, labels_only)


def test_bands_are_balanced():
    assert cells.balanced_band_rows(32, 100, 1000) == 8  # at most 10 rows a band: 4 bands of 8
    assert cells.balanced_band_rows(11, 100, 1000) == 6  # 2 bands (6 + 5), not 10 + 1
    assert cells.balanced_band_rows(5, 100, 10_000) == 5  # everything in one band
    assert cells.balanced_band_rows(3, 100, 10) == 1  # the budget is under one row: a row a band


def test_reference_labels_only_is_upsample_then_argmax():
    generator = torch.Generator().manual_seed(5)
    logits = make_logits(generator, 2, 6, 7, 30, "scene", torch.float32)
    labels, scores = segment_reference(logits, (25, 19), with_scores=False)
    plain = F.interpolate(logits.permute(0, 3, 1, 2), size=(25, 19), mode="bilinear", align_corners=False)
    assert scores is None and torch.equal(labels, plain.argmax(dim=1).to(torch.int16))
    assert torch.equal(labels, segment_reference(logits, (25, 19))[0])


def test_labels_only_keeps_only_classes_that_can_win():
    """Without scores the pruning keeps a subset of what the score bound keeps, and on
    structureless logits far fewer classes (the reason the mode exists)."""
    generator = torch.Generator().manual_seed(6)
    logits = torch.randn(1, 16, 16, 150, generator=generator) * 0.04
    rows = range(0, 16)
    with_scores = cells.cell_candidates(logits, rows, 100.0)
    labels_only = cells.cell_candidates(logits, rows, 100.0, score_tolerance=None)
    assert (labels_only.count <= with_scores.count).all()
    # Measured: 61 of 150 classes per cell against 150 (iid logits are the bounds' worst case).
    assert labels_only.count.float().mean() * 2 < with_scores.count.float().mean(), (
        labels_only.count.float().mean(),
        with_scores.count.float().mean(),
    )
    for cell in [(0, 0, 0), (0, 7, 3), (0, 15, 15)]:
        kept = set(labels_only.classes[cell][: labels_only.count[cell]].tolist())
        assert kept <= set(with_scores.classes[cell][: with_scores.count[cell]].tolist())


@pytest.mark.parametrize("backend", ["reference", "tiled", pytest.param("triton", marks=needs_interpreter)])
def test_background_threshold_needs_scores(backend):
    segment = {"reference": segment_reference, "tiled": segment_tiled, "triton": segment_triton}[backend]
    logits = torch.randn(1, 3, 3, 4)
    with pytest.raises(ValueError, match="background_threshold needs the scores"):
        segment(logits, (5, 5), background_threshold=0.5, with_scores=False)


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_ties_go_to_the_lowest_index(backend):
    """Exact ties resolve as torch.argmax does: the lowest class index wins."""
    generator = torch.Generator().manual_seed(7)
    logits = 0.05 * torch.randn(2, 5, 6, 8, generator=generator)
    logits[..., 6] = logits[..., 2] = 1.0 + logits[..., 2]  # classes 2 and 6 tie and win everywhere
    logits[1, ..., 5] = logits[1, ..., 3]
    logits[1, :, :3, 5] = logits[1, :, :3, 3] = 3.0  # on part of image 1, 3 and 5 tie above them
    if backend == "reference":
        labels, scores = segment_reference(logits, (17, 23), logit_scale=30.0)
    else:
        labels, scores = run_segment(backend, logits, (17, 23), logit_scale=30.0)
    upsampled = upsample_logits(logits, (17, 23))
    assert torch.equal(labels.long(), upsampled.argmax(1))
    assert set(labels.unique().tolist()) == {2, 3}
    assert (labels[0] == 2).all()
    probabilities = torch.softmax(upsampled * 30.0, dim=1)
    torch.testing.assert_close(scores, probabilities.amax(1), atol=SCORE_ATOL, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_near_ties_just_above_the_margin_are_exact(backend):
    """Two classes 2e-4..1e-3 apart with random sign: the pruning must never drop the true winner."""
    generator = torch.Generator().manual_seed(3)
    logits = 0.01 * torch.randn(1, 9, 11, 6, generator=generator)
    gap = (2e-4 + 8e-4 * torch.rand(1, 9, 11, generator=generator)) * torch.randn(1, 9, 11, generator=generator).sign()
    logits[..., 4] = 0.5 + gap
    logits[..., 1] = 0.5
    labels, scores = run_segment(backend, logits, (19, 25), logit_scale=100.0)
    assert_matches_reference(labels, scores, logits, (19, 25), None, 100.0, None)
    assert set(labels.unique().tolist()) == {1, 4}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_score_pruning_stays_within_its_tolerance(backend):
    """Soft logits over many classes: the dropped classes provably move no score by more than the
    tolerance, and the pruning does drop classes (so the bound is what is being tested)."""
    generator = torch.Generator().manual_seed(5)
    logits = make_logits(generator, 1, 6, 7, 120, "scene", torch.float32)
    _, want = segment_reference(logits, (31, 29), logit_scale=100.0)
    for tolerance in (1e-5, 1e-3, 3e-2):
        candidates = cells.cell_candidates(logits, range(6), 100.0, tolerance)
        assert candidates.count.float().mean() < 120
        with native_kernel() if backend == "native" else contextlib.nullcontext():
            _, scores = segment_tiled(logits, (31, 29), logit_scale=100.0, score_tolerance=tolerance)
            kernel = native.kernel() if backend == "native" else None
        assert (scores - want).abs().max() <= tolerance + 2e-6
        if kernel is not None:  # the kernel's own pruning drops classes too (Triton's count above is not its)
            from kernels import scores as score_module

            tally, out = [0, 0], poisoned(1, (31, 29))
            rows, cols = cells.axis_sampling(6, 31, 6.0), cells.axis_sampling(7, 29, 7.0)
            score_module.segment(logits, rows, cols, *out, 100.0, tolerance, tally, kernel=kernel)
            assert tally[0] / tally[1] < 120
    assert cells.cell_candidates(logits, range(6), 100.0, 1e-5).count.sum() > candidates.count.sum()


@pytest.mark.parametrize(
    "grid, out, extent",
    [(6, 6, 4.5), (9, 20, 7.0), (5, 1, 5.0), (1, 13, 1.0), (7, 3, 6.2), (32, 512, 32.0), (14, 224, 13.3)],
)
def test_axis_sampling_is_atens(grid, out, extent):
    """Bilinear weights from ``cells.axis_sampling`` rebuild ``upsample_bilinear2d`` (both axes)."""
    values = torch.randn(1, grid, grid, 2)
    rows = cells.axis_sampling(grid, out, extent)
    image = values[0].permute(2, 0, 1)  # [C, h, w]
    r0, r1, wy = rows.index0, rows.index1, rows.lambda1[:, None]
    dense = (
        image[:, r0][:, :, r0] * (1 - wy) * (1 - wy.T)
        + image[:, r0][:, :, r1] * (1 - wy) * wy.T
        + image[:, r1][:, :, r0] * wy * (1 - wy.T)
        + image[:, r1][:, :, r1] * wy * wy.T
    )
    torch.testing.assert_close(dense, upsample_logits(values, (out, out), (extent, extent))[0], atol=1e-5, rtol=0)
    assert torch.equal(rows.end - rows.start, torch.bincount(r0, minlength=grid))


def test_bad_arguments_are_named():
    logits = torch.randn(1, 3, 3, 4)
    with pytest.raises(ValueError, match=r"logits must be a \[B, h, w, C\]"):
        segment_tiled(logits[0], (5, 5))
    with pytest.raises(ValueError, match="out_size"):
        segment_tiled(logits, (0, 5))
    with pytest.raises(ValueError, match="grid_extent"):
        segment_tiled(logits, (5, 5), grid_extent=(2.0, -1.0))
    with pytest.raises(ValueError, match="logit_scale"):
        segment_tiled(logits, (5, 5), logit_scale=float("nan"))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        segment_tiled(logits.double(), (5, 5))
    with pytest.raises(ValueError, match="out labels must be torch.int16"):
        segment_tiled(logits, (5, 5), out=(torch.empty(1, 5, 5), torch.empty(1, 5, 5)))
    with pytest.raises(ValueError, match="backend must be one of"):
        Head("cuda-magic")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fast_head_on_cpu_is_the_tiled_path(backend):
    generator = torch.Generator().manual_seed(11)
    logits = make_logits(generator, 2, 7, 9, 10, "scene", torch.float32)
    with native_kernel() if backend == "native" else contextlib.nullcontext():
        kwargs = {"grid_extent": (6.5, 8.0), "logit_scale": 50.0, "background_threshold": 0.4}
        fast = Head("fast").segment(logits, (20, 30), **kwargs)
        tiled = segment_tiled(logits, (20, 30), **kwargs)
        path = Head("fast").path(logits.device)
        assert path.startswith("tiled: native kernel" if backend == "native" else "tiled: eager torch"), path
    assert Head("reference").path(logits.device).startswith("reference")
    assert torch.equal(fast[0], tiled[0]) and torch.equal(fast[1], tiled[1])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cpu_path_never_allocates_classes_times_pixels(backend):
    """1000 classes on a 1024 x 2048 output: C*H*W floats would be 8 GiB; the tiled head's peak of
    live tensors stays under 160 MiB (1/50 of that is 164 MiB) and no tensor exceeds 64 MiB."""
    generator = torch.Generator().manual_seed(2)
    logits = make_logits(generator, 1, 32, 64, 1000, "scene", torch.float32, noise_level=0.01)
    head = Head("fast")
    with native_kernel() if backend == "native" else contextlib.nullcontext(), TensorMemoryTracker() as tracker:
        labels, scores = head.segment(logits, (1024, 2048), logit_scale=100.0)
    full = 1000 * 1024 * 2048 * 4
    assert labels.shape == (1, 1024, 2048) and scores.shape == (1, 1024, 2048)
    assert tracker.peak_bytes < min(full / 50, 160 * 2**20), (tracker.peak_bytes, tracker.largest_shape)
    assert tracker.largest_bytes < 64 * 2**20, (tracker.largest_bytes, tracker.largest_shape)
    # The same logits, on a crop small enough for the reference, still agree with it.
    crop = logits[:, :4, :8]
    labels, scores = run_segment(backend, crop, (128, 256), logit_scale=100.0)
    assert_matches_reference(labels, scores, crop, (128, 256), None, 100.0, None)


# ---- Labels only on the CPU: kernels/separable.py (what segment_tiled(with_scores=False) runs in eager torch),
# and the native kernel's labels (kernels/scores.segment without scores) where the tests take both ----

# (B, h, w, C, H, W, grid_extent, dtype): 1xN and Nx1 grids, 1 to 300 classes, downsampling on one or both
# axes, non-integer scales whose cells alternate 2 and 3 pixels (so some cells are cut into two segments),
# portrait outputs (worked along the columns: W * h < 3/4 H * w), padded extents, half inputs.
SEPARABLE_CASES = [
    (1, 1, 9, 7, 5, 61, None, torch.float32),
    (2, 9, 1, 5, 61, 4, None, torch.float16),
    (1, 1, 1, 300, 3, 5, None, torch.float32),
    (1, 2, 2, 1, 7, 9, None, torch.float32),
    (1, 6, 5, 2, 15, 13, (5.5, 4.2), torch.bfloat16),
    (2, 7, 6, 150, 17, 15, None, torch.float32),
    (1, 12, 10, 300, 30, 25, (11.0, 9.5), torch.float16),
    (1, 16, 14, 40, 9, 31, None, torch.float32),
    (1, 5, 16, 33, 43, 7, None, torch.bfloat16),
    (1, 4, 4, 64, 97, 13, None, torch.float32),
    (1, 3, 8, 21, 40, 160, (2.5, 7.1), torch.float32),
    (2, 11, 13, 3, 11, 13, None, torch.float16),
]


def near_tie_logits(generator: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Few distinct values: many classes tie exactly at grid points, and others are 1e-4..1e-3 apart."""
    coarse = torch.randint(0, 4, shape, generator=generator) * 0.01
    fine = torch.randint(-3, 4, shape, generator=generator) * 2.5e-4
    return (coarse + fine).to(dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ["iid", "near_ties", "scene"])
@pytest.mark.parametrize("case", SEPARABLE_CASES, ids=lambda c: "x".join(map(str, c[:6])))
def test_separable_labels_match_reference(case, kind, backend):
    batch, h, w, classes, height, width, extent, dtype = case
    generator = torch.Generator().manual_seed(h * 1000 + w * 10 + classes)
    if kind == "iid":
        logits = (0.04 * torch.randn(batch, h, w, classes, generator=generator)).to(dtype)
    elif kind == "near_ties":
        logits = near_tie_logits(generator, (batch, h, w, classes), dtype)
    else:
        logits = make_logits(generator, batch, h, w, classes, "scene", dtype)
    labels = run_labels_only(backend, logits, (height, width), grid_extent=extent)
    want, _ = segment_reference(logits, (height, width), grid_extent=extent, with_scores=False)
    assert_labels_match(labels, want, logits.float(), (height, width), extent)


def tangent_logits(classes: int, scale: float = 10.0) -> torch.Tensor:
    """A 2x2 grid ``[1, 2, 2, C]`` on which every class is on the upper envelope of each output row.

    Class ``c`` is the tangent at ``tau_c`` to ``scale * t^2`` (t in [0, 1]: left to right column), so
    it is the highest near ``t = tau_c`` and nowhere else; the bottom row is the top row plus a
    class-dependent slope, so the rows in between see other tangent lines, still all on the envelope.
    """
    tau = (torch.arange(classes, dtype=torch.float64) + 0.5) / classes
    tau = tau[torch.randperm(classes, generator=torch.Generator().manual_seed(classes))]  # not in class order
    left, right = -scale * tau**2, scale * (2 * tau - tau**2)  # the tangent's values at t = 0 and t = 1
    top = torch.stack([left, right])  # [2 columns, C]
    bottom = top + 0.1 * torch.stack([tau, tau])  # still each class's best near its own tau
    return torch.stack([top, bottom])[None].float()  # [1, 2 rows, 2 columns, C]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("classes", [3, 40, 150])
def test_separable_keeps_every_class_on_the_envelope(classes, backend):
    """All C classes win somewhere in every row: the pruning must keep each where it wins. A test
    that checked only one kink (or dropped the second round's other side) loses classes here."""
    logits = tangent_logits(classes)
    out_size = (9, 40 * classes)
    labels = run_labels_only(backend, logits, out_size)
    want, _ = segment_reference(logits, out_size, with_scores=False)
    assert_labels_match(labels, want, logits, out_size, None)
    for row in labels[0]:
        assert set(row.tolist()) == set(range(classes))
    transposed = run_labels_only(backend, logits.transpose(1, 2).contiguous(), out_size[::-1])  # by columns
    if backend == "tiled":  # the same rows, read as columns: the same arithmetic
        assert torch.equal(transposed[0].T, labels[0])
    else:  # the kernel interpolates along its own x first: exact crossings may round the other way
        assert_labels_match(transposed.transpose(1, 2), want, logits, out_size, None)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_separable_exact_ties_go_to_the_lowest_index(dtype, backend):
    """Duplicated classes tie exactly everywhere: the lowest index wins, as torch.argmax.

    The judge is argmax over a float64 upsampling in channels-first layout, where duplicated
    channels stay bitwise equal. (The float32 reference upsamples channels-last, where channels 8
    and up can round differently from the first 8, so it breaks exact ties between them.)"""
    generator = torch.Generator().manual_seed(8)
    logits = 0.05 * torch.randn(2, 5, 6, 12, generator=generator)
    logits[..., 9] = logits[..., 4] = logits[..., 4] + 0.5  # 4 and 9 tie, above the rest
    # In image 1, 2, 7 and 11 are one class three times, the highest on the right half.
    logits[1, ..., 7] = logits[1, ..., 11] = logits[1, ..., 2] = logits[1, ..., 2] + 1.0 * (torch.arange(6) >= 3)
    logits = logits.to(dtype)
    labels = run_labels_only(backend, logits, (19, 31))
    channels_first = logits.double().permute(0, 3, 1, 2).contiguous()
    upsampled = F.interpolate(channels_first, size=(19, 31), mode="bilinear", align_corners=False)
    distinct = upsampled[:, [c for c in range(12) if c not in (7, 9, 11)]].topk(2, dim=1).values
    decided = distinct[:, 0] - distinct[:, 1] > MARGIN  # clear of the crossings between distinct classes
    assert decided.float().mean() > 0.9
    assert torch.equal(labels[decided], upsampled.argmax(1)[decided].to(torch.int16))
    assert not torch.isin(labels, torch.tensor([7, 9, 11], dtype=torch.int16)).any()
    assert set(labels[0].unique().tolist()) == {4} and 2 in labels[1].unique().tolist()


def test_separable_bands_and_chunks_are_an_implementation_detail(monkeypatch):
    """Bands of 1-2 output rows, and chunks of 3-4 (row, cell) pairs, give the labels of one band of all
    rows in one chunk."""
    import kernels.separable

    generator = torch.Generator().manual_seed(9)
    logits = 0.04 * torch.randn(2, 7, 9, 60, generator=generator)
    whole = run_labels_only("tiled", logits, (45, 37), grid_extent=(6.3, 8.9))
    monkeypatch.setattr(kernels.separable, "BAND_ELEMENTS", 60 * 9 * 2)
    banded = run_labels_only("tiled", logits, (45, 37), grid_extent=(6.3, 8.9))
    assert torch.equal(banded, whole)
    monkeypatch.setattr(kernels.separable, "ITEM_PIXELS", 17)
    chunked = run_labels_only("tiled", logits, (45, 37), grid_extent=(6.3, 8.9))
    assert torch.equal(chunked, whole)


def test_separable_gives_the_callers_threads_back():
    """The labels-only path runs its many small ops on one intra-op thread (``cells.one_intra_op_thread``)
    and sets the caller's thread count back afterwards, after an error too."""
    from kernels import separable

    threads = torch.get_num_threads()
    rows, cols = cells.axis_sampling(3, 9, 3.0), cells.axis_sampling(4, 11, 4.0)
    try:
        torch.set_num_threads(2)
        separable.segment_labels(torch.randn(1, 3, 4, 5), rows, cols, torch.empty(1, 9, 11, dtype=torch.int16))
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError):
            separable.segment_labels(torch.randn(1, 3, 4, 5), rows, cols, torch.empty(1, 9, 11))  # not int16
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_separable_never_trusts_its_workspace():
    """The workspace kept between calls holds the last call's tables: poisoned with NaN, and after a
    larger call, a call still gives the reference's labels."""
    import kernels.separable

    generator = torch.Generator().manual_seed(10)
    logits = 0.04 * torch.randn(1, 6, 7, 30, generator=generator)
    kernels.separable.release_workspace()
    kernels.separable._workspace_buffer(1 << 16, logits.device).fill_(float("nan"))
    labels = run_labels_only("tiled", logits, (23, 29))
    want, _ = segment_reference(logits, (23, 29), with_scores=False)
    assert_labels_match(labels, want, logits, (23, 29), None)
    run_labels_only("tiled", 0.04 * torch.randn(1, 9, 9, 80, generator=generator), (50, 50))
    assert torch.equal(run_labels_only("tiled", logits, (23, 29)), labels)


def test_separable_evaluates_few_classes_on_structureless_logits():
    """The point of the path: on iid logits at C=150 (the benchmark's worst case) each pixel evaluates
    about 3.5 classes (the 2-D cell bound keeps 69), on scene-like ones about 1.2."""
    from benchmarks.head import random_logits, scene_logits
    from kernels import separable

    for logits, most in ((random_logits(150), 5.0), (scene_logits(150), 1.5)):
        rows, cols = (cells.axis_sampling(32, 512, 32.0) for _ in range(2))
        labels, tally = torch.empty(1, 512, 512, dtype=torch.int16), [0, 0]
        separable.segment_labels(logits, rows, cols, labels, tally)
        per_pixel = (512 * 512 - tally[1] + tally[0]) / (512 * 512)
        assert 1.0 <= per_pixel < most, per_pixel


def test_separable_memory_is_bounded():
    """1000 classes on a 1024 x 2048 output: the labels-only path's live tensors (its workspace
    included, made afresh here) peak under 40 MiB, none over 16 MiB."""
    from kernels import separable

    generator = torch.Generator().manual_seed(12)
    logits = 0.04 * torch.randn(1, 16, 32, 1000, generator=generator)
    separable.release_workspace()
    with TensorMemoryTracker() as tracker:
        labels, scores = Head("fast").segment(logits, (1024, 2048), with_scores=False)
    assert scores is None and labels.shape == (1, 1024, 2048)
    assert tracker.peak_bytes < 40 * 2**20, (tracker.peak_bytes, tracker.largest_shape)
    assert tracker.largest_bytes < 16 * 2**20, (tracker.largest_bytes, tracker.largest_shape)
    assert separable.workspace_bytes() <= 2 * 4 * separable.BAND_ELEMENTS * 1.1
    crop = logits[:, :3, :5]
    labels = run_labels_only("tiled", crop, (100, 260))
    assert_labels_match(labels, segment_reference(crop, (100, 260), with_scores=False)[0], crop, (100, 260), None)


def test_segmenter_defaults_to_the_fast_head(tiny_config):
    from conftest import make_segmenter

    segmenter = make_segmenter(tiny_config)
    assert segmenter.head.backend == "fast"


# ---- Exact scores (issue 20): kernels/scores.py on kernels/fine_grid.py ----


def steep_logits(generator: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Cosines at their steepest: every grid point at +-1 (less a hair of noise), so that classes cross
    from one extreme to the other inside a cell, where float32 interpolation of ``scale * v`` is least
    precise (measured before the refined grid: 8.9e-7 on scenes)."""
    signs = torch.randint(0, 2, shape, generator=generator) * 2 - 1
    return (signs * (1 - 0.001 * torch.rand(shape, generator=generator))).to(dtype)


# (B, h, w, C, H, W, grid_extent, logit_scale, dtype): one-point axes, one class, downsampling, a copied axis,
# padded extents, non-integer scales, 300 classes, half inputs, CLIP's scale and smaller ones.
SCORE_CASES = [
    (1, 1, 1, 1, 3, 4, None, 100.0, torch.float32),
    (2, 1, 6, 5, 1, 23, None, 100.0, torch.float32),
    (1, 7, 1, 9, 30, 2, None, 37.5, torch.float16),
    (1, 5, 6, 2, 19, 26, (4.4, 5.1), 100.0, torch.float32),
    (2, 6, 5, 40, 6, 17, (4.5, 4.2), 100.0, torch.bfloat16),
    (1, 9, 8, 300, 23, 31, None, 100.0, torch.float32),
    (1, 12, 10, 21, 7, 9, None, 100.0, torch.float32),
    (1, 4, 7, 150, 41, 50, (3.3, 6.9), 10.0, torch.float32),
    # Upsampled enough for the native kernel's strips: odd scales (uneven float32 steps, corrected), a width
    # that is no multiple of 16, segments longer than a chunk (16 rows) and than a chain (8), half inputs.
    (1, 5, 7, 13, 83, 131, None, 100.0, torch.float32),
    (2, 3, 4, 40, 64, 50, (2.6, 3.7), 100.0, torch.bfloat16),
    (1, 3, 3, 7, 150, 75, None, 100.0, torch.float32),
]


def score_case_logits(case: tuple, kind: str) -> torch.Tensor:
    batch, h, w, classes, *_, dtype = case
    generator = torch.Generator().manual_seed(h * 1000 + w * 10 + classes)
    shape = (batch, h, w, classes)
    if kind == "iid":
        return (0.04 * torch.randn(shape, generator=generator)).to(dtype)
    if kind == "near_ties":
        return near_tie_logits(generator, shape, dtype)
    if kind == "steep":
        return steep_logits(generator, shape, dtype)
    return make_logits(generator, batch, h, w, classes, "scene", dtype)


SCORE_PATHS = ["dense", "sparse", "native", "native-lists", "native-blocks", "native-exact"]


def force_score_path(path: str, monkeypatch) -> str:
    """Every band of ``kernels/scores.py`` on ``path``: eager ``dense`` or ``sparse`` (gathered blocks), or
    the native kernel on every class (``native``) or on each cell's list (``native-lists``), both as strips
    where the columns fit them; on blocks only (``native-blocks``); strips with an exact exp for every term
    (``native-exact``). Returns the backend to run."""
    import kernels.scores

    monkeypatch.setattr(kernels.scores, "DENSE_FRACTION", 0.0 if path == "dense" else float("inf"))
    monkeypatch.setattr(kernels.scores, "NATIVE_DENSE_FRACTION", 0.0 if path == "native" else float("inf"))
    monkeypatch.setattr(kernels.scores, "NATIVE_STRIPS", path != "native-blocks")
    monkeypatch.setattr(kernels.scores, "NATIVE_GEOMETRIC", path != "native-exact")
    return "native" if path.startswith("native") else "tiled"


@pytest.mark.parametrize("path", SCORE_PATHS)
@pytest.mark.parametrize("kind", ["iid", "scene", "near_ties", "steep"])
@pytest.mark.parametrize("case", SCORE_CASES, ids=lambda c: "x".join(map(str, c[:6])))
def test_each_score_path_matches_reference(case, kind, path, monkeypatch):
    """Each evaluation of ``kernels/scores.py`` on its own (every band dense, or every band gathered; the
    native kernel on every class or on lists, as strips or blocks): labels of the reference where its margin
    is clear, scores within 1e-6 of the float64 reference.

    Except steepest logits (cosines at +-1) upsampled 8 pixels or more a refined cell: there classes cross
    200 apart mid-cell, where the winner dips ~50 below the refined grid's maxima and float32 exponents of
    50 hold 3e-6: every path (eager, blocks, strips) measured 1.7e-6 there, held to 2.5e-6."""
    backend = force_score_path(path, monkeypatch)
    logits = score_case_logits(case, kind)
    height, width, extent, logit_scale = case[4:8]
    kwargs = {"grid_extent": extent, "logit_scale": logit_scale, "background_threshold": None}
    labels, scores = run_segment(backend, logits, (height, width), **kwargs)
    steep_and_wide = kind == "steep" and case in SCORE_CASES[-3:]
    atol = 2.5e-6 if steep_and_wide else SCORE_ATOL
    assert_matches_reference(labels, scores, logits, (height, width), **kwargs, score_atol=atol)


@pytest.mark.parametrize("kind", ["iid", "steep"])
@pytest.mark.parametrize("case", SCORE_CASES[3:5], ids=lambda c: "x".join(map(str, c[:6])))
@needs_interpreter
def test_triton_scores_match_reference(case, kind):
    """The Triton kernel on the refined grid, on structureless and steepest logits."""
    logits = score_case_logits(case, kind)
    height, width, extent, logit_scale = case[4:8]
    kwargs = {"grid_extent": extent, "logit_scale": logit_scale, "background_threshold": None}
    labels, scores = run_segment("triton", logits, (height, width), **kwargs)
    assert_matches_reference(labels, scores, logits, (height, width), **kwargs)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_scores_at_benchmark_scale_are_exact(backend):
    """C=150, 32x32 -> 512x512 (``benchmarks.head``'s data): the dense path on iid logits, the gathered one
    on the scene; labels equal to the reference at every pixel, scores within 1e-6 (measured 3.6e-7 eager,
    2.4e-7 native on iid logits; 4.2e-7 native on the scene)."""
    from benchmarks.head import random_logits, scene_logits
    from kernels import scores as score_module

    rows = cols = cells.axis_sampling(32, 512, 32.0)
    for logits, most in ((random_logits(150), 150.0), (scene_logits(150), 60.0)):
        labels, scores = poisoned(1, (512, 512))
        tally = [0, 0]
        with native_kernel() if backend == "native" else contextlib.nullcontext():
            kernel = native.kernel()
            score_module.segment(logits, rows, cols, labels, scores, 100.0, 1e-7, tally, kernel=kernel)
        assert tally[0] / tally[1] <= most  # iid: every class at every pixel; scene: ~36 (padding included)
        want_labels, want_scores = segment_reference(logits, (512, 512), logit_scale=100.0)
        assert torch.equal(labels, want_labels)
        assert (scores - want_scores).abs().max() <= 1e-6


@pytest.mark.parametrize("path", SCORE_PATHS)
@pytest.mark.parametrize("logit_scale", [1e3, 1e4])
def test_scores_of_exponents_far_below_zero(path, logit_scale, monkeypatch):
    """Scales that put the winner of a cell hundreds below the refined grid's maxima and most classes
    below float32's exp range: the per-pixel shift and the clamp keep every score finite and exact to
    float32's precision, which scales with the exponents (1e-6 at CLIP's 100, here 1e-5: measured 3.4e-6)."""
    backend = force_score_path(path, monkeypatch)
    generator = torch.Generator().manual_seed(21)
    logits = make_logits(generator, 1, 6, 7, 20, "scene", torch.float32, noise_level=0.2)
    kwargs = {"grid_extent": None, "logit_scale": logit_scale, "background_threshold": 0.9}
    labels, scores = run_segment(backend, logits, (31, 37), **kwargs)
    assert_matches_reference(labels, scores, logits, (31, 37), **kwargs, score_atol=1e-5)
    assert (scores < 0.999).any()  # some pixels are shared between classes even at this scale


@pytest.mark.parametrize(
    "grid, out, extent", [(6, 6, 4.5), (9, 20, 7.0), (5, 1, 5.0), (1, 13, 1.0), (7, 3, 6.2), (14, 224, 13.3)]
)
def test_refined_grid_keeps_every_pixel(grid, out, extent):
    """On the refined grid (``fine_grid``), pixels sample the same bilinear values up to a per-pixel shift:
    differences between classes equal the exact ones (float64 from the same positions) to 1e-6."""
    from kernels import fine_grid
    from kernels.reference import upsample_logits_exact

    generator = torch.Generator().manual_seed(grid * 10 + out)
    logits = 0.3 * torch.randn(1, grid, grid, 6, generator=generator)
    rows = cells.axis_sampling(grid, out, extent)
    fine = fine_grid.refine_sampling(rows, grid)
    relative = fine_grid.relative_logits(logits, range(fine_grid.refined_size(grid)), 100.0, pad=True)[0].double()
    assert (relative[..., :6] <= 0).all() and (relative[..., :6].amax(-1) == 0).all()
    assert (relative[..., 6] == torch.finfo(torch.float32).min).all()
    r0, r1, wr = fine.index0, fine.index1, fine.lambda1.double()
    along = torch.lerp(relative[r0], relative[r1], wr[:, None, None])  # [out, wf, C]
    values = torch.lerp(along[:, r0], along[:, r1], wr[None, :, None])[..., :6]  # [out, out, C] (square)
    exact = upsample_logits_exact(logits, (out, out), (extent, extent))[0].permute(1, 2, 0) * 100.0
    # To the float32 rounding of the refined values (|x| up to ~60 here: 4e-6); a wrong point or weight is off by ~1.
    torch.testing.assert_close(values - values[..., :1], exact - exact[..., :1], atol=1e-5, rtol=0)


def test_axis_sampling_is_atens_to_the_ulp():
    """``cells.axis_sampling`` is ATen's (read from it): upsampling with its positions in float64 gives
    ATen's float32 values to within float32 rounding (an off-by-one-ulp position, as a guessed formula
    without ATen's fused multiply-add gives, moved scale-100 scores on region borders by 1e-5)."""
    from kernels.reference import sampling_positions, upsample_logits, upsample_logits_exact

    generator = torch.Generator().manual_seed(13)
    for h, w, height, width, extent in [(9, 14, 50, 83, None), (6, 9, 37, 70, (5.25, 8.5)), (14, 14, 480, 640, None)]:
        for grid, out, e in ((h, height, extent[0] if extent else h), (w, width, extent[1] if extent else w)):
            axis = cells.axis_sampling(grid, out, e)
            index0, lambda1 = sampling_positions(grid, out, e)
            assert torch.equal(axis.index0, index0) and torch.equal(axis.lambda1, lambda1)
        logits = torch.randn(1, h, w, 5, generator=generator)
        atens = upsample_logits(logits, (height, width), extent).double()
        exact = upsample_logits_exact(logits, (height, width), extent)
        assert (atens - exact).abs().max() <= 2 * torch.finfo(torch.float32).eps * logits.abs().max()


# ---- Background threshold (issue 23 items 12 and 15): one rule, "strictly below", in every backend ----

SCORE_BACKENDS = ["reference", *SCORE_PATHS, pytest.param("triton", marks=needs_interpreter)]


def segment_with(backend: str, logits: torch.Tensor, out_size: tuple[int, int], monkeypatch, **kwargs):
    """``backend``'s labels and scores (tiled forced onto one of its score paths), poisoned outputs."""
    if backend == "reference":
        return segment_reference(logits, out_size, **kwargs)
    if backend in SCORE_PATHS:
        return run_segment(force_score_path(backend, monkeypatch), logits, out_size, **kwargs)
    return run_segment("triton", logits, out_size, **kwargs)


@pytest.mark.parametrize("classes", [2, 6])
@pytest.mark.parametrize("backend", SCORE_BACKENDS)
def test_a_score_equal_to_the_threshold_is_not_background(backend, classes, monkeypatch):
    """Two classes tied everywhere (the others 1.5 below: exp(-150) is 0): every score is exactly 0.5.
    A pixel is background when its score is strictly below the threshold, so 0.5 keeps its class (the
    lower of the two), the next float above 0.5 makes every pixel background, the one below none."""
    generator = torch.Generator().manual_seed(classes)
    logits = torch.full((1, 4, 5, classes), -1.0)
    logits[..., 0] = logits[..., 1] = 0.5 + 0.2 * torch.rand(1, 4, 5, generator=generator)
    for threshold, background in ((0.5, False), (float(torch.nextafter(torch.tensor(0.5), torch.tensor(1.0))), True)):
        labels, scores = segment_with(
            backend, logits, (9, 11), monkeypatch, logit_scale=100.0, background_threshold=threshold
        )
        assert (scores == 0.5).all(), scores.unique()
        assert (labels == (BACKGROUND if background else 0)).all(), (threshold, labels.unique())
    below = float(torch.nextafter(torch.tensor(0.5), torch.tensor(0.0)))
    labels, _ = segment_with(backend, logits, (9, 11), monkeypatch, logit_scale=100.0, background_threshold=below)
    assert (labels == 0).all()


@pytest.mark.parametrize("backend", SCORE_BACKENDS)
def test_every_path_applies_the_threshold_even_above_one(backend, monkeypatch):
    """Scenes where most cells have one candidate (float32 scores of exactly 1.0): a threshold of 1.0 keeps
    those pixels, one above 1 makes every pixel background, as in the reference (issue 23 item 15: the
    tiled head's single-candidate path used to skip the threshold)."""
    generator = torch.Generator().manual_seed(15)
    logits = make_logits(generator, 1, 5, 6, 8, "scene", torch.float32, noise_level=0.01) * 4
    for threshold in (1.0, 1.5):
        labels, scores = segment_with(
            backend, logits, (19, 23), monkeypatch, logit_scale=100.0, background_threshold=threshold
        )
        want, want_scores = segment_reference(logits, (19, 23), logit_scale=100.0, background_threshold=threshold)
        assert (want_scores == 1.0).float().mean() > 0.5
        assert torch.equal(labels, want), threshold
    assert (labels == BACKGROUND).all()


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_head_refuses_a_threshold_outside_zero_one(backend):
    logits = torch.randn(1, 3, 3, 4)
    head = Head(backend)
    for threshold in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="background_threshold"):
            head.segment(logits, (5, 5), background_threshold=threshold)
    labels, scores = head.segment(logits, (5, 5), background_threshold=0.0)  # both ends are accepted
    assert (labels >= 0).all()
    labels, scores = head.segment(logits, (5, 5), background_threshold=1.0)
    assert torch.equal(labels == BACKGROUND, scores < 1.0)


# ---- The native kernel (kernels/native.py): its arithmetic, its checks, and when it is used ----


@pytest.fixture()
def fresh_native(tmp_path, monkeypatch):
    """A process state of its own (no kernel, no failure, no eager time) and an empty cache folder; the
    session's state comes back afterwards."""
    saved = native._state
    monkeypatch.setenv("PACL_FAST_CACHE", str(tmp_path / "cache"))
    native.reset()
    yield tmp_path / "cache" / "native"
    native._state = saved


def test_a_build_under_a_group_writable_umask_is_cached_and_reused(fresh_native):
    """The compiler honours the umask: under 002 the library came out group-writable, which the cache
    refuses to load, so every process compiled again. The build is made private whatever the umask."""
    if native.compiler() is None:
        pytest.skip("no C compiler")
    cached = native.library_path(native.compiler())
    old = os.umask(0o002)
    try:
        native.load_or_build()
        built = cached.stat()
        native.reset()
        second = native.load_or_build()
    finally:
        os.umask(old)
    assert not built.st_mode & 0o022 and second.path == cached  # the cached file itself was loaded
    assert cached.stat().st_mtime_ns == built.st_mtime_ns and cached.stat().st_ino == built.st_ino  # not rebuilt


def test_prepare_never_waits_for_a_build_under_way(fresh_native, monkeypatch):
    """prepare() promises to return at once; it waited for a whole compile when a load or build held the
    state's lock (a second Head made while the first one's kernel compiled)."""
    import threading

    monkeypatch.setenv(native.ENV, "on")
    state = native._state
    with state.lock:  # as _settle holds it for a whole load_or_build()
        caller = threading.Thread(target=native.prepare)
        caller.start()
        caller.join(timeout=10)
        returned = not caller.is_alive()
    caller.join()
    assert returned and state.builder is None  # it left the build to the one under way


@pytest.mark.parametrize(
    "shape, rows, factor",
    [
        ((32, 32, 150), range(0, 63), 2),
        ((5, 7, 3), range(3, 9), 2),
        ((4, 9, 17), range(1, 3), 1),
        ((6, 1, 5), range(0, 11), 2),
        ((1, 6, 4), range(0, 1), 2),
        ((7, 5, 9), range(5, 24), 4),
        ((3, 3, 21), range(4, 5), 2),
    ],
)
def test_native_relative_logits_are_fine_grids_bits(shape, rows, factor):
    """The kernel's refined grid (one pass) is ``fine_grid.relative_logits`` (six torch passes in float64) bit
    for bit, NaN where it has NaN: classes not a multiple of 8, one-point axes, a band of rows, factors 1-4."""
    from kernels import fine_grid

    with native_kernel():
        kernel = native.kernel()
    generator = torch.Generator().manual_seed(sum(shape) + factor)
    logits = torch.randn(*shape, generator=generator) * 0.3
    logits[0, 0, min(1, shape[2] - 1)] = float("nan")
    logits[-1, -1, -1] = float("inf") if shape[2] > 3 else logits[-1, -1, -1]
    got = kernel.relative_logits(logits, rows, 100.0, factor).clone()
    want = fine_grid.relative_logits(logits[None], rows, 100.0, factor)[0]
    assert got.shape == want.shape
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(7.0), want.nan_to_num(7.0))
    with pytest.raises(ValueError, match="must be a step-1 range inside"):
        kernel.relative_logits(logits, range(0, (shape[0] - 1) * factor + 2), 100.0, factor)


@pytest.mark.parametrize("kind, geometric", [("iid", True), ("scene", True), ("steep", False)])
def test_strips_take_the_geometric_path_where_it_is_exact(kind, geometric, monkeypatch):
    """Strips at an odd scale (uneven float32 steps, corrected; segments of 37 rows: chunks and restarts): on
    CLIP-like logits the geometric progression runs (its bits differ from an exp per term) and both are within
    1e-6 of the reference; where a class falls below exp's floor in a group (steepest logits: -200) the guard
    sends the group to an exp per term (the same bits)."""
    case = SCORE_CASES[-1]  # 3 x 3 grid -> 150 x 75
    logits = score_case_logits(case, kind)
    height, width, extent, logit_scale = case[4:8]
    kwargs = {"grid_extent": extent, "logit_scale": logit_scale, "background_threshold": None}
    runs = {}
    for path in ("native", "native-exact"):
        backend = force_score_path(path, monkeypatch)
        runs[path] = run_segment(backend, logits, (height, width), **kwargs)
    assert torch.equal(runs["native"][0], runs["native-exact"][0])
    assert torch.equal(runs["native"][1], runs["native-exact"][1]) != geometric
    if kind != "steep":  # (steep: see test_each_score_path_matches_reference)
        for labels, scores in runs.values():
            assert_matches_reference(labels, scores, logits, (height, width), **kwargs)


def test_native_buffers_are_counted_and_released():
    """The kernel's per-thread buffers (refined grid, class table, lists) count in ``scores.workspace_bytes`` (what
    ``benchmarks.head``'s peaks include) and go with ``scores.release_workspace``."""
    from kernels import scores as score_module

    with native_kernel():
        kernel = native.kernel()
        score_module.release_workspace()
        before = score_module.workspace_bytes()
        logits = 0.04 * torch.randn(1, 6, 7, 40, generator=torch.Generator().manual_seed(3))
        run_segment("native", logits, (96, 112), logit_scale=100.0)
    grid_bytes = 11 * 13 * 40 * 4  # the refined grid alone
    assert kernel.buffer_bytes() >= grid_bytes and score_module.workspace_bytes() >= before + grid_bytes
    score_module.release_workspace()
    assert kernel.buffer_bytes() == 0


def test_native_exp_is_float32_exact():
    """The kernel's exp against float64 on [-87, 0] (below, floored at -87): within 1e-7 relative
    (measured 8.3e-8; torch's float32 exp: 6.2e-8), and exp(0) exactly 1 (the winner's term on the grid)."""
    with native_kernel():
        kernel = native.kernel()
    x = torch.cat([torch.linspace(-87.0, 0.0, 1_000_003), -torch.rand(4096) * 1e-3, torch.tensor([0.0, -90.0, -1e9])])
    got = kernel.exp(x).double()
    want = torch.exp(x.double().clamp_min(-87.0))
    assert ((got - want).abs() / want).max() < 1e-7
    assert got[-3] == 1.0


def native_blocks_case():
    """A 2 x 3 grid of 4 classes and its blocks: ``(grid, rows, cols, labels, scores)``."""
    grid = -torch.rand(2, 3, 4)
    grid[..., 0] = 0.0
    rows = (torch.tensor([0]), torch.tensor([[0, 1]]), torch.tensor([[0.25, 0.75]]), 1)
    cols = (torch.tensor([0, 1]), torch.tensor([[0, 1], [2, 3]]), torch.tensor([[0.2, 0.6], [0.1, 0.9]]), 1)
    return grid, rows, cols, torch.empty(2, 4, dtype=torch.int16), torch.empty(2, 4)


def test_native_kernel_checks_what_the_c_code_trusts():
    """Every index the C code follows is checked first: a wrong dtype, a cell past the grid, an index past
    the output, columns whose 16 span too many cells, a bound that is no number are each one ValueError
    naming it (and never reach C). A bound keeping every class, evaluated as lists, gives what every class
    gives; strips give what blocks give."""
    with native_kernel():
        kernel = native.kernel()
    grid, rows, cols, labels, scores = native_blocks_case()
    evaluated = kernel.segment_blocks(grid, rows, cols, None, 0.9, labels, scores)  # valid
    assert (labels == 0).all() and (scores > 0.25).all() and evaluated == 2 * 16 * 4  # 2 blocks, 16 lanes, 4 classes
    again = labels.clone(), scores.clone()
    assert kernel.segment_blocks(grid, rows, cols, -1e30, 2.0, *again) == evaluated
    assert torch.equal(again[0], labels) and torch.equal(again[1], scores)
    assert kernel.segment_blocks(grid, rows, cols, 0.0, 2.0, *again) < evaluated  # winners only
    assert torch.equal(again[0], labels)
    bad = {
        "grid must be a 3-d torch.float32": (grid.double(), rows, cols),
        "rows: a cell outside the grid": (grid, (torch.tensor([1]), *rows[1:]), cols),
        "cols: an index outside the output": (grid, rows, (cols[0], torch.tensor([[0, 1], [2, 4]]), *cols[2:])),
        "cols: cell": (grid, rows, (cols[0][:1], *cols[1:])),
    }
    for message, arguments in bad.items():
        with pytest.raises(ValueError, match=message):
            kernel.segment_blocks(*arguments, None, 0.9, labels, scores)
    with pytest.raises(ValueError, match="labels must be a 2-d torch.int16"):
        kernel.segment_blocks(grid, rows, cols, None, 0.9, labels.int(), scores)
    for bound in (float("nan"), 1.0):
        with pytest.raises(ValueError, match="bound must be a number at most 0"):
            kernel.segment_blocks(grid, rows, cols, bound, 0.9, labels, scores)

    columns = (torch.tensor([0, 0, 1, 1]), torch.tensor([0.2, 0.6, 0.1, 0.9]), 1)  # the blocks' columns
    strip_labels, strip_scores = torch.full_like(labels, -7), torch.full_like(scores, float("nan"))
    for geometric in (True, False):
        kernel.segment_strips(grid, rows, columns, None, 0.9, strip_labels, strip_scores, geometric)
        assert torch.equal(strip_labels, labels) and (strip_scores - scores).abs().max() < 1e-6
    strip_bad = {
        "columns: 3 cells and 4 weights for 4 columns": (columns[0][:3], columns[1], 1),
        "columns: a cell outside the grid": (torch.tensor([0, 0, 1, 2]), columns[1], 1),
        "16 columns spanning too many cells": (torch.tensor([0, 1, 0, 1]), columns[1], 1),  # not ascending
        "columns cell must be a 1-d torch.int64": (columns[0].int(), columns[1], 1),
    }
    for message, wrong in strip_bad.items():
        with pytest.raises(ValueError, match=message):
            kernel.segment_strips(grid, rows, wrong, None, 0.9, strip_labels, strip_scores)
    # 16 columns over 2 or 4 cells fit; over 6 (3 columns a cell), or descending, do not.
    assert native.strips_fit(torch.arange(40) // 8) and native.strips_fit(torch.arange(40) // 4)
    assert not native.strips_fit(torch.arange(40) // 3) and not native.strips_fit(torch.arange(40).flip(0) // 8)
    with pytest.raises(ValueError, match="scores must be a 2-d torch.float32"):
        kernel.segment_strips(grid, rows, columns, None, 0.9, strip_labels, strip_scores.double())


def test_native_mode_is_read_and_checked(monkeypatch):
    for value, want in (("", "auto"), ("auto", "auto"), ("ON", "on"), ("1", "on"), ("off", "off"), ("0", "off")):
        monkeypatch.setenv(native.ENV, value)
        assert native.mode() == want
    monkeypatch.setenv(native.ENV, "fast")
    with pytest.raises(ValueError, match=r"\$PACL_FAST_NATIVE must be one of"):
        native.mode()


def test_auto_builds_in_the_background_and_a_new_process_loads_it(fresh_native, monkeypatch):
    """``auto``: ``Head()`` starts the build in a thread (the first call waits for it) into the cache; a new
    process (a reset state) loads that build without compiling, and its head runs it from the first call."""
    monkeypatch.setenv(native.ENV, "auto")
    assert "not loaded yet" in native.status()
    head = Head("fast")
    builder = native._state.builder
    assert builder is not None and builder.name == "pacl-native-build"
    built = native.kernel()
    assert not builder.is_alive() and built is not None and built.path.parent == fresh_native and built.path.is_file()
    native.reset()

    def no_compile(*args):
        raise AssertionError("compiled again although a build was cached")

    monkeypatch.setattr(native, "_compile", no_compile)
    logits = make_logits(torch.Generator().manual_seed(30), 1, 4, 5, 7, "scene", torch.float32)
    labels, scores = head.segment(logits, (9, 11), logit_scale=100.0)
    assert native.kernel().path == built.path and head.path(logits.device) == f"tiled: native kernel ({built.path})"
    assert_matches_reference(labels, scores, logits, (9, 11), None, 100.0, None)
    monkeypatch.setenv(native.ENV, "off")
    assert Head("fast").path(logits.device) == "tiled: eager torch ($PACL_FAST_NATIVE=off)"


@pytest.mark.parametrize("mode, level", [("on", "WARNING"), ("auto", "INFO")])
@pytest.mark.parametrize("compiler", ["missing", "failing"])
def test_without_a_working_compiler_the_head_stays_eager(
    compiler, mode, level, fresh_native, tmp_path, monkeypatch, caplog
):
    """No C compiler, or one that fails: the head runs eager torch (never an error) and one log line says
    why, a warning under ``on``, info under ``auto`` (the default)."""
    if compiler == "missing":
        monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
        why = "no C compiler"
    else:
        script = tmp_path / "broken-cc"
        script.write_text("#!/bin/sh\necho 'error: this compiler is broken' >&2\nexit 1\n")
        script.chmod(0o755)
        monkeypatch.setenv("CC", str(script))
        why = "this compiler is broken"
    monkeypatch.setenv(native.ENV, mode)
    logits = make_logits(torch.Generator().manual_seed(31), 1, 4, 5, 7, "scene", torch.float32)
    with caplog.at_level(level, logger="kernels.native"):
        labels, scores = run_segment("tiled", logits, (9, 11), logit_scale=100.0)
        run_segment("tiled", logits, (9, 11), logit_scale=100.0)
    assert_matches_reference(labels, scores, logits, (9, 11), None, 100.0, None)
    assert native.kernel() is None and why in native.status()
    lines = [(record.levelname, why in record.getMessage()) for record in caplog.records]
    assert lines == [(level, True)]  # once, not per call
    assert not fresh_native.exists() or not list(fresh_native.glob("*.so"))


def test_a_kernel_failing_its_self_test_is_refused(fresh_native, monkeypatch):
    """A library computing something else (here an exp off by 1e-3) is refused by the self-test: eager."""
    broken = native.SOURCE.replace("p = p * (r * r) + r + 1.0f;", "p = p * (r * r) + r + 1.001f;")
    assert broken != native.SOURCE
    monkeypatch.setattr(native, "SOURCE", broken)
    monkeypatch.setenv(native.ENV, "on")
    assert native.kernel() is None
    assert "fails its self-test" in native.status()


def test_a_cache_others_can_write_to_is_not_trusted(fresh_native, monkeypatch):
    """A library in a folder writable by others is never loaded (someone else may have put it there): the
    kernel is built in a private folder instead, and works."""
    monkeypatch.setenv(native.ENV, "on")
    planted = native.library_path()
    native.load_or_build()  # a genuine sealed build: only the folder's permissions may refuse it
    fresh_native.chmod(0o777)
    sealed = planted.read_bytes()
    native.reset()
    kernel = native.kernel()
    assert kernel is not None and kernel.path != planted and kernel.path.parent != fresh_native
    assert planted.read_bytes() == sealed


def test_a_corrupt_cached_library_is_built_again(fresh_native, monkeypatch):
    fresh_native.mkdir(parents=True, mode=0o700)
    path = native.library_path()
    path.write_bytes(b"garbage")
    path.chmod(0o600)
    monkeypatch.setenv(native.ENV, "on")
    kernel = native.kernel()
    assert kernel is not None and kernel.path == path and path.read_bytes()[:4] == b"\x7fELF"


def build_shared_library(tmp_path, name: str, source: str):
    """``source`` compiled with the kernel's compiler into ``tmp_path / name`` (skips without one)."""
    import subprocess

    command = native.compiler()
    if command is None:
        pytest.skip("no C compiler")
    (tmp_path / f"{name}.c").write_text(source)
    subprocess.run([*command, "-shared", "-fPIC", "-o", str(tmp_path / name), str(tmp_path / f"{name}.c")], check=True)
    return tmp_path / name


def test_a_foreign_library_in_the_cache_is_never_loaded(fresh_native, tmp_path, monkeypatch, caplog):
    """A real shared library at the cache's name that is not a sealed build of this key is rebuilt without
    ever reaching the dynamic loader (its constructor would run there: here it writes a file)."""
    marker = tmp_path / "constructor-ran"
    source = "#include <stdio.h>\n__attribute__((constructor)) static void ran(void) "
    source += f'{{ fclose(fopen("{marker}", "w")); }}\n'
    foreign = build_shared_library(tmp_path, "foreign.so", source)
    fresh_native.mkdir(parents=True, mode=0o700)
    path = native.library_path()
    path.write_bytes(foreign.read_bytes())
    path.chmod(0o600)
    monkeypatch.setenv(native.ENV, "on")
    with caplog.at_level("INFO", logger="kernels.native"):
        kernel = native.kernel()
    assert kernel is not None and kernel.path == path, native.status()
    assert not marker.exists(), "the foreign library was loaded"
    assert native._sealed(path, native._key_of(path)) and path.read_bytes() != foreign.read_bytes()
    assert any("not a sealed build" in record.getMessage() for record in caplog.records)


def test_a_tampered_or_other_keys_build_is_built_again(fresh_native, monkeypatch):
    """A sealed build with one byte of its body changed (the digest no longer matches), or a whole build of
    another key renamed to this one, is rebuilt: only a file whose trailer names this key and digest loads."""
    monkeypatch.setenv(native.ENV, "on")
    path = native.kernel().path
    good = path.read_bytes()
    tampered = bytearray(good)
    tampered[len(good) // 2] ^= 0x01
    other_key = good[: -native.TRAILER_BYTES] + good[-native.TRAILER_BYTES :].replace(
        native._key_of(path).encode(), b"0" * 24
    )
    assert other_key != good
    for planted in (bytes(tampered), other_key):
        # A new file renamed over the build (writing into the loaded one would change this process's code).
        path.with_suffix(".new").write_bytes(planted)
        os.replace(path.with_suffix(".new"), path)
        native.reset()
        assert not native._sealed(path, native._key_of(path))
        assert native.kernel() is not None and native._sealed(path, native._key_of(path)), native.status()


def test_a_sealed_build_failing_its_checks_is_replaced(fresh_native, tmp_path, monkeypatch):
    """A cached file sealed for this key whose library fails its self-test (a broken kernel) is rebuilt and
    the rebuild is what runs, although the dynamic loader already holds the broken one under the cache's
    name: a build is loaded and checked under its temporary name, then renamed into the cache."""
    command = native.compiler()
    if command is None:
        pytest.skip("no C compiler")
    path = native.library_path(command)
    broken = tmp_path / "broken.so"
    with monkeypatch.context() as patch:
        patch.setattr(native, "SOURCE", native.SOURCE.replace("+ r + 1.0f;", "+ r + 1.001f;"))
        native._compile(command, broken)
    native._append_trailer(broken, native._key_of(path))
    fresh_native.mkdir(parents=True, mode=0o700)
    os.replace(broken, path)
    monkeypatch.setenv(native.ENV, "on")
    kernel = native.kernel()
    assert kernel is not None and kernel.path == path, native.status()
    assert native._sealed(path, native._key_of(path)) and kernel.exp(torch.zeros(1)).item() == 1.0


def test_the_cache_key_names_the_compiler(tmp_path):
    """Another compiler (a wrapper script around this one), or the same one changed since (a new
    modification time), builds under another name: one compiler's build is never another's."""
    command = native.compiler()
    if command is None:
        pytest.skip("no C compiler")
    wrapper = tmp_path / "wrapped-cc"
    wrapper.write_text(f'#!/bin/sh\nexec {command[0]} "$@"\n')
    wrapper.chmod(0o755)
    names = {native.library_path(command), native.library_path([str(wrapper)])}
    os.utime(wrapper, ns=(0, 10**18))
    names.add(native.library_path([str(wrapper)]))
    assert len(names) == 3 and native.library_path(command) == native.library_path(command)


def test_concurrent_builders_do_not_race(fresh_native, monkeypatch):
    """Threads building into the same empty cache at once (compiles run in parallel processes) each compile
    to a temporary of their own and rename it over the one name: all get a working kernel, the folder holds
    one sealed build and no temporary."""
    import threading

    targets, barrier = [], threading.Barrier(3)
    compile_for_real = native._compile

    def compile_in_step(command, target):
        targets.append(target)
        barrier.wait(timeout=60)  # all three compile at the same time
        compile_for_real(command, target)

    monkeypatch.setattr(native, "_compile", compile_in_step)
    kernels, errors = [], []

    def build():
        try:
            kernels.append(native.load_or_build())
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    path = native.library_path()
    assert not errors and len(kernels) == 3 and all(kernel.path == path for kernel in kernels)
    assert len(set(targets)) == 3 and path not in targets and all(target.parent == path.parent for target in targets)
    assert sorted(fresh_native.iterdir()) == [path] and native._sealed(path, native._key_of(path))


def test_importing_compiles_nothing(tmp_path):
    """Importing the package, the head and the kernels runs no compiler and writes no cache; making a head
    then does (the same process, so the marker compiler is proven to be the one found)."""
    import subprocess
    import sys

    command = native.compiler()
    if command is None:
        pytest.skip("no C compiler")
    marker = tmp_path / "compiler-ran"
    spy = tmp_path / "spy-cc"
    spy.write_text(f'#!/bin/sh\ntouch {marker}\nexec {command[0]} "$@"\n')
    spy.chmod(0o755)
    cache = tmp_path / "cache"
    script = (
        "import pathlib, pacl_fast, pacl_fast.head, kernels.tiled, kernels.scores, kernels.native as native\n"
        f"assert not pathlib.Path({str(marker)!r}).exists(), 'a compiler ran on import'\n"
        f"assert not pathlib.Path({str(cache)!r}).exists(), 'the cache was written on import'\n"
        "pacl_fast.head.Head('fast')\n"
        "assert native.kernel() is not None, native.status()\n"
    )
    env = {**os.environ, "CC": str(spy), "PACL_FAST_NATIVE": "auto", "PACL_FAST_CACHE": str(cache)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert marker.exists() and list((cache / "native").glob("pacl-native-*.so"))


def test_native_head_in_several_threads():
    """Threads share the library, each with its own work buffer (the call releases the GIL): the same
    labels and scores as one thread."""
    import threading

    logits = [make_logits(torch.Generator().manual_seed(40 + i), 1, 9, 7, 60, "scene", torch.float32) for i in range(4)]
    with native_kernel():
        alone = [segment_tiled(x, (50, 41), logit_scale=100.0) for x in logits]
        results = [None] * 4

        def run(i):
            results[i] = segment_tiled(logits[i], (50, 41), logit_scale=100.0)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    for (labels, scores), (want_labels, want_scores) in zip(results, alone):
        assert torch.equal(labels, want_labels) and torch.equal(scores, want_scores)


# ---- CUDA: the compiled kernels (benchmarks/gpu_check.sh runs these) ----


@pytest.mark.parametrize("backend", ["triton", "tiled"])
@pytest.mark.parametrize("index", range(len(CASES)), ids=lambda i: "x".join(map(str, CASES[i][:6])))
@cuda_test
def test_cuda_segment_matches_reference(backend, index):
    """The compiled kernel (and the tiled path on CUDA tensors), held to the CPU reference."""
    logits, out_size, kwargs = case_arguments(index)
    labels, scores = run_segment(backend, logits.cuda(), out_size, **kwargs)
    assert_matches_reference(labels, scores, logits, out_size, **kwargs)


@pytest.mark.parametrize("backend", ["triton", "tiled"])
@pytest.mark.parametrize("index", range(len(CASES)), ids=lambda i: "x".join(map(str, CASES[i][:6])))
@cuda_test
def test_cuda_labels_only_matches_reference(backend, index):
    """Labels only on CUDA tensors: the compiled kernel, and the tiled head's separable path."""
    logits, out_size, kwargs = case_arguments(index)
    kwargs.pop("background_threshold")
    labels = run_labels_only(backend, logits.cuda(), out_size, **kwargs)
    want_labels, _ = segment_reference(logits, out_size, with_scores=False, **kwargs)
    assert_labels_match(labels.cpu(), want_labels, logits.float(), out_size, kwargs["grid_extent"])


@cuda_test
def test_cuda_head_at_benchmark_scale():
    """150 classes, 32 x 32 grid -> 512 x 512 and 1024 x 2048, as benchmarks/head.py runs it."""
    generator = torch.Generator().manual_seed(4)
    logits = make_logits(generator, 1, 32, 32, 150, "scene", torch.float16)
    for out_size in ((512, 512), (1024, 2048)):
        labels, scores = run_segment("triton", logits.cuda(), out_size, logit_scale=100.0)
        assert_matches_reference(labels, scores, logits, out_size, None, 100.0, None)
