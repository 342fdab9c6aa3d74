import math

import numpy as np
import pytest
import torch
from helpers import make_segmenter
from layouts import random_image
from PIL import Image

import pacl_fast
from pacl_fast.images import SlidingWindow, fit_to_model, load_image, plan_resize
from pacl_fast.results import BatchError, ImageError, Segmentation
from pacl_fast.weights import save_pacl_weights

LABELS = ["circle", "square", "sky"]


def test_predict_every_input_kind(tmp_path, segmenter):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)
    path = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 255, (33, 90, 3), dtype=np.uint8)).save(path)
    pil = Image.fromarray(array).convert("L")
    tensor = torch.rand(3, 64, 40)
    results = segmenter.predict([path, array, pil, tensor], LABELS, templates="single")
    assert [r.labels.shape for r in results] == [(33, 90), (50, 70), (50, 70), (64, 40)]
    for result in results:
        assert isinstance(result, Segmentation)
        assert result.labels.dtype == np.int16 and result.scores.dtype == np.float32
        assert result.classes == tuple(LABELS)
        assert result.labels.min() >= 0 and result.labels.max() < 3
        assert np.all((result.scores > 0) & (result.scores <= 1))
        assert sum(result.class_shares().values()) == pytest.approx(1.0)
    assert results[0].source == str(path)


def test_labels_may_be_any_iterable(segmenter):
    """Labels given as a generator are read once: the result names them all (it named none when the text
    embedder consumed the generator first)."""
    image = np.random.default_rng(2).integers(0, 255, (32, 48, 3), dtype=np.uint8)
    result = segmenter.predict(image, (label for label in LABELS), templates="single")
    assert result.classes == tuple(LABELS)


def test_single_image_and_results_match_tensor_entry(segmenter):
    image = np.random.default_rng(1).integers(0, 255, (48, 80, 3), dtype=np.uint8)
    result = segmenter.predict(image, LABELS, templates="single")
    assert isinstance(result, Segmentation)
    geometry = plan_resize((48, 80), segmenter.image_size, segmenter.patch_size)
    pixels = fit_to_model(load_image(image), geometry, segmenter.mean, segmenter.std)[None]
    classes = segmenter.encode_labels(LABELS, "single")
    labels, scores = segmenter.predict_torch(pixels, classes, (48, 80), grid_extent=geometry.grid_extent)
    assert np.array_equal(labels[0].numpy(), result.labels)
    np.testing.assert_allclose(scores[0].numpy(), result.scores, rtol=1e-6)
    labels_only, no_scores = segmenter.predict_torch(
        pixels, classes, (48, 80), grid_extent=geometry.grid_extent, with_scores=False
    )
    assert no_scores is None and torch.equal(labels_only, labels)


def test_bad_image_does_not_lose_the_others(tmp_path, segmenter):
    good = np.zeros((40, 40, 3), np.uint8)
    missing = tmp_path / "missing.jpg"
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(BatchError, match="2 of 4 images failed") as caught:
        segmenter.predict([good, missing, broken, good], LABELS, templates="single")
    results = caught.value.results
    assert isinstance(results[0], Segmentation) and isinstance(results[3], Segmentation)
    assert isinstance(results[1], ImageError) and isinstance(results[1].error, FileNotFoundError)
    assert "broken.png" in str(results[2])
    returned = segmenter.predict([good, missing], LABELS, templates="single", errors="return")
    assert isinstance(returned[0], Segmentation) and isinstance(returned[1], ImageError)


@pytest.mark.parametrize("labels,message", [([], "empty"), (["a", "b", "a"], "duplicates")])
def test_bad_labels(segmenter, labels, message):
    with pytest.raises(ValueError, match=message):
        segmenter.predict(np.zeros((8, 8, 3), np.uint8), labels)


def test_bad_arguments(segmenter):
    image = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="errors must be"):
        segmenter.predict(image, LABELS, errors="ignore")
    with pytest.raises(ValueError, match="background_threshold"):
        segmenter.predict(image, LABELS, background_threshold=1.5)
    with pytest.raises(ValueError, match="images is empty"):
        segmenter.predict([], LABELS)


def test_background_threshold_marks_low_scores(segmenter):
    image = np.random.default_rng(2).integers(0, 255, (40, 56, 3), dtype=np.uint8)
    plain = segmenter.predict(image, LABELS, templates="single")
    threshold = float(np.median(plain.scores))
    result = segmenter.predict(image, LABELS, templates="single", background_threshold=threshold)
    assert np.array_equal(result.labels == -1, plain.scores < threshold)
    assert "background" in result.class_shares()


def test_sliding_window_with_one_window_equals_plain(segmenter):
    image = np.random.default_rng(3).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    plain = segmenter.predict(image, LABELS, templates="single")
    windowed = segmenter.predict(image, LABELS, templates="single", sliding_window=SlidingWindow(64, 64))
    assert np.array_equal(plain.labels, windowed.labels)


def test_overlapping_windows_average_their_logits(segmenter):
    """Three windows across a 64x128 canvas (crop 64, stride 32): every grid cell's logits must be the
    mean of the windows covering it, computed here window by window through the plain reference head."""
    from kernels.reference import patch_logits, segment_reference

    image = np.random.default_rng(4).integers(0, 255, (64, 128, 3), dtype=np.uint8)
    window = SlidingWindow(64, 32, short_side=64)
    classes = segmenter.encode_labels(LABELS, "single")
    prepared = segmenter.preprocessor(window)(image)
    canvas = prepared.pixels  # [3, 64, 128]: grid 8 x 16
    assert tuple(canvas.shape) == (3, 64, 128)
    total = torch.zeros(8, 16, len(LABELS))
    count = torch.zeros(8, 16, 1)
    for x in (0, 32, 64):  # the windows, written out
        patches = segmenter.encoder.encode_image(canvas[None, :, :, x : x + 64])  # [1, 8, 8, E]
        total[:, x // 8 : x // 8 + 8] += patch_logits(patches, classes)[0]
        count[:, x // 8 : x // 8 + 8] += 1
    assert count.min() == 1 and count.max() == 2  # some cells are covered twice, some once
    expected_labels, expected_scores = segment_reference(
        (total / count)[None], (64, 128), logit_scale=segmenter.logit_scale
    )
    result = segmenter.predict(image, LABELS, templates="single", sliding_window=window)
    np.testing.assert_allclose(result.scores, expected_scores[0].numpy(), atol=1e-5)
    assert (result.labels != expected_labels[0].numpy()).mean() < 1e-3  # ties within 1e-4 may differ
    tall = np.random.default_rng(5).integers(0, 255, (200, 70, 3), dtype=np.uint8)
    result = segmenter.predict(tall, LABELS, templates="single", sliding_window=SlidingWindow(64, 32, short_side=96))
    assert result.labels.shape == (200, 70)


def test_fused_embedder_path_gives_the_default_labels(tiny_config, tiny_pacl, tmp_path):
    """On a Triton head the encoder stops at the CLIP's tokens and one kernel applies PACL's embedder,
    the L2 norm and the similarity (the CUDA path); on the CPU it runs in the Triton interpreter."""
    path = save_pacl_weights(tiny_pacl, tmp_path / "pacl.safetensors")
    default = make_segmenter(tiny_config, pacl_weights=path)
    fused = make_segmenter(tiny_config, pacl_weights=path, backend="triton")
    assert fused.fused_embedder and not default.fused_embedder
    pixels = torch.randn(2, 3, 40, 64)
    classes = default.encode_labels(LABELS, "single")
    torch.testing.assert_close(
        fused.patch_logits(pixels, classes), default.patch_logits(pixels, classes), atol=1e-5, rtol=0
    )
    image = np.random.default_rng(8).integers(0, 255, (48, 80, 3), dtype=np.uint8)
    a = default.predict(image, LABELS, templates="single")
    b = fused.predict(image, LABELS, templates="single")
    assert (a.labels != b.labels).mean() < 1e-3
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-4)


def test_parts_built_once_run_in_several_segmenters(tiny_config):
    from pacl_fast.build import build
    from pacl_fast.head import Head

    torch.manual_seed(0)
    with pytest.warns(pacl_fast.RandomWeightsWarning):
        parts = build(tiny_config, method="pacl", device="cpu")
    one = pacl_fast.Segmenter(parts.model, encoder=parts.encoder, head=parts.head)
    two = pacl_fast.Segmenter(parts.model, encoder=parts.encoder, head=Head("reference"))
    image = np.random.default_rng(9).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    assert np.array_equal(one.predict(image, LABELS).labels, two.predict(image, LABELS).labels)
    with pytest.raises(TypeError, match="pacl_weights build a model"):
        pacl_fast.Segmenter(parts.model, pacl_weights="x.safetensors")


def test_a_failing_encoder_batch_fails_its_images_only(segmenter, monkeypatch):
    """Images of one canvas size share an encoder batch; if that batch fails, each of its images
    becomes an ImageError naming the cause, and images of other sizes are still segmented."""
    original = segmenter.encoder.encode_image

    def fail_on_wide(pixels):
        if pixels.shape[-1] > pixels.shape[-2]:
            raise RuntimeError("out of memory (simulated)")
        return original(pixels)

    monkeypatch.setattr(segmenter.encoder, "encode_image", fail_on_wide)
    square = np.zeros((32, 32, 3), np.uint8)
    wide = np.zeros((32, 64, 3), np.uint8)
    results = segmenter.predict([wide, square, wide], LABELS, templates="single", errors="return")
    assert isinstance(results[1], Segmentation)
    for index in (0, 2):
        assert isinstance(results[index], ImageError) and results[index].index == index
        assert "out of memory (simulated)" in str(results[index])


def test_construction_errors_name_the_argument(tiny_config):
    with pytest.raises(ValueError, match="dtype must be one of"):
        make_segmenter(tiny_config, dtype="float8")
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        make_segmenter(tiny_config, batch_size=0)
    with pytest.raises(ValueError, match="image_size=4 is smaller than the patch size 8"):
        make_segmenter(tiny_config, image_size=4)
    with pytest.raises(ValueError, match="backend must be one of"):
        make_segmenter(tiny_config, backend="cuda")
    with pytest.raises(ValueError, match="encoder must be one of"):
        make_segmenter(tiny_config, encoder="jax")
    with pytest.raises(ValueError, match="unknown method 'segformer': choose one of pacl, maskclip"):
        make_segmenter(tiny_config, method="segformer")


def test_pacl_weights_with_a_training_free_method_is_refused_before_loading(tiny_config, tiny_pacl, tmp_path):
    path = save_pacl_weights(tiny_pacl, tmp_path / "pacl.safetensors")
    with pytest.raises(ValueError, match="used only by method='pacl'.*Pick one"):
        make_segmenter(tiny_config, pacl_weights=path, method="naclip")


def test_overlay_and_save(tmp_path, segmenter):
    image = np.random.default_rng(5).integers(0, 255, (30, 44, 3), dtype=np.uint8)
    result = segmenter.predict(image, LABELS, templates="single")
    overlay = result.overlay()
    assert overlay.size == (44, 30) and overlay.mode == "RGB"
    paths = result.save(tmp_path, stem="x")
    saved = Image.open(paths["labels"])
    assert saved.mode == "P" and np.array_equal(np.array(saved), result.labels.astype(np.uint8))
    assert Image.open(paths["overlay"]).size == (44, 30)
    bare = segmenter.predict(image, LABELS, templates="single", keep_images=False)
    with pytest.raises(ValueError, match="no image to overlay"):
        bare.overlay()


def test_trained_weights_roundtrip_through_segmenter(tmp_path, tiny_config, tiny_pacl):
    path = save_pacl_weights(tiny_pacl, tmp_path / "pacl.safetensors")
    segmenter = make_segmenter(tiny_config, pacl_weights=path)
    pixels = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(segmenter.encoder.encode_image(pixels), tiny_pacl.encode_image(pixels))
    assert segmenter.metadata is not None and "trained" in repr(segmenter)


def test_bfloat16_encoder_agrees_with_float32(tiny_config):
    image = np.random.default_rng(6).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    fp32 = make_segmenter(tiny_config)
    bf16 = make_segmenter(tiny_config, dtype="bfloat16")
    pixels = torch.randn(1, 3, 64, 64)
    a, b = fp32.encoder.encode_image(pixels), bf16.encoder.encode_image(pixels).float()
    assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min() > 0.99
    assert bf16.predict(image, LABELS, templates="single").labels.shape == (64, 64)


def test_help_documents_the_api():
    doc = pacl_fast.Segmenter.__doc__ + pacl_fast.Segmenter.predict.__doc__
    for word in ("clip_weights", "pacl_weights", "background_threshold", "sliding_window", "errors", "BatchError"):
        assert word in doc


def test_vit_b16_end_to_end_one_image():
    segmenter = make_segmenter("ViT-B-16")
    image = np.random.default_rng(7).integers(0, 255, (224, 224, 3), dtype=np.uint8)
    result = segmenter.predict(image, ["cat", "dog"], templates="single")
    assert result.labels.shape == (224, 224) and set(np.unique(result.labels)) <= {0, 1}


def test_images_of_one_canvas_but_other_sizes_each_equal_their_own_prediction(segmenter):
    """64x90 and 64x92 both pad to one canvas and share a batch: each keeps its own grid extent and size."""
    images = [random_image((64, 90), seed=31), random_image((64, 92), seed=32)]
    together = segmenter.predict(images, LABELS)
    for image, result in zip(images, together):
        alone = segmenter.predict(image, LABELS)
        assert np.array_equal(result.labels, alone.labels)
        np.testing.assert_allclose(result.scores, alone.scores, atol=1e-6, rtol=0)


def test_segment_logits_takes_one_grid_extent_for_every_size(segmenter):
    logits = torch.randn(2, 4, 5, 3)  # [B, h, w, C]
    sizes = [(30, 37), (31, 40)]
    shared = segmenter.segment_logits(logits, sizes, grid_extent=(3.5, 4.5))
    each = segmenter.segment_logits(logits, sizes, grid_extent=[(3.5, 4.5), (3.5, 4.5)])
    for (labels, scores), (labels_each, scores_each) in zip(shared, each):
        assert labels.shape == labels_each.shape and torch.equal(labels, labels_each)
        assert torch.equal(scores, scores_each)


# --- defaults choose (issue 20): dtype and encoder "auto", the reason said, every choice overridable ---------


@pytest.fixture()
def cpuinfo(tmp_path, monkeypatch):
    """Point the auto choice at a /proc/cpuinfo of our writing: ``cpuinfo("avx512f amx_bf16")``."""
    from pacl_fast.encoders import auto

    count = iter(range(1000))

    def write(flags: str | None) -> None:
        path = tmp_path / f"cpuinfo-{next(count)}"  # a new path each time: readings are cached by path
        if flags is not None:
            path.write_text(f"processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu sse2 {flags}\n\n")
        monkeypatch.setattr(auto, "CPUINFO", path)

    return write


def test_auto_dtype_is_what_the_device_runs_natively(cpuinfo, monkeypatch):
    from pacl_fast.encoders.auto import choose_dtype, native_dtype

    cpu = torch.device("cpu")
    cpuinfo("avx2 avx512f avx512_bf16")
    assert native_dtype(cpu) == (torch.bfloat16, "CPU has AVX512-BF16")
    cpuinfo("avx512f amx_tile amx_bf16 avx512_bf16")
    assert native_dtype(cpu) == (torch.bfloat16, "CPU has AMX-BF16")
    cpuinfo("avx2 avx512f")
    assert native_dtype(cpu) == (torch.float32, "CPU lacks AVX512-BF16 and AMX")
    cpuinfo(None)  # no /proc/cpuinfo (another system): nothing is assumed
    assert native_dtype(cpu)[0] == torch.float32
    cpuinfo("avx512_bf16")  # what each encoder runs comes first
    assert choose_dtype("onnxruntime", cpu, {})[0] == torch.float32
    assert choose_dtype("openvino", cpu, {})[0] == torch.bfloat16
    assert choose_dtype("openvino", cpu, {"precision": "int8"})[0] is None  # int8 only when named
    assert choose_dtype("tensorrt", torch.device("cuda"), {})[0] == torch.float16
    for capability, dtype in [((9, 0), torch.bfloat16), ((8, 0), torch.bfloat16), ((7, 5), torch.float16),
                              ((7, 0), torch.float16), ((6, 1), torch.float32)]:  # fmt: skip
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert native_dtype(torch.device("cuda", 0))[0] == dtype, capability


def test_auto_encoder_is_eager_unless_the_work_pays_a_build(tiny_pacl, tmp_path, cpuinfo, monkeypatch):
    from pacl_fast.encoders import auto, choose

    if not auto.openvino_installed():
        pytest.skip("needs OpenVINO (pip install pacl-fast[openvino]); not installed")
    cache = {"cache_dir": tmp_path}  # nothing cached here
    for flags, units, dtype in [("amx_bf16", "AMX-BF16", "auto"), ("avx512_bf16", "AVX512-BF16", "auto"),
                                ("avx2", "fp32", "auto"), ("amx_bf16", "fp32", "float32")]:  # fmt: skip
        cpuinfo(flags)
        needed = auto.OPENVINO_MIN_IMAGES[units]
        for images in (None, 0, 1, 12, needed - 1):
            choice = choose(tiny_pacl, dtype=dtype, expected_images=images, options=cache)
            assert choice.encoder == "torch", (flags, images, str(choice))
        for images in (needed, 10**7, math.inf):
            choice = choose(tiny_pacl, dtype=dtype, expected_images=images, options=cache)
            assert choice.encoder == "openvino", (flags, images, str(choice))
            assert choice.precision == ("fp32" if units == "fp32" else "bf16")
    cpuinfo("amx_bf16")
    assert "image count not given (expected_images)" in str(choose(tiny_pacl, options=cache))
    assert "12 images do not pay its build (>= 300 would)" in str(choose(tiny_pacl, expected_images=12, options=cache))
    assert "an unending stream of images pay" in str(choose(tiny_pacl, expected_images=math.inf, options=cache))
    # What OpenVINO cannot run, or options only torch takes, keep eager torch; compile is never chosen.
    for dtype, options in [("float16", cache), ("auto", {**cache, "text_dtype": "bfloat16"})]:
        assert choose(tiny_pacl, dtype=dtype, expected_images=math.inf, options=options).encoder == "torch"
    monkeypatch.setattr(auto, "openvino_installed", lambda: False)
    choice = choose(tiny_pacl, expected_images=math.inf, options=cache)
    assert choice.encoder == "torch" and "OpenVINO not installed" in str(choice)
    # Named choices are kept as named.
    named = choose(tiny_pacl, "onnxruntime", "float32", expected_images=math.inf, options=cache)
    assert (named.encoder, named.dtype, named.reasons) == ("onnxruntime", torch.float32, ())
    with pytest.raises(ValueError, match="expected_images must be a number of images >= 0"):
        choose(tiny_pacl, expected_images=-1)


def test_segmenter_defaults_choose_and_say_why(tiny_config):
    from pacl_fast.encoders.auto import native_dtype
    from pacl_fast.encoders.base import dtype_name

    native, why = native_dtype(torch.device("cpu"))
    auto = make_segmenter(tiny_config, dtype="auto", encoder="auto")  # what Segmenter(...) does by default
    assert pacl_fast.Segmenter.__init__.__kwdefaults__["dtype"] == "auto"
    assert pacl_fast.Segmenter.__init__.__kwdefaults__["encoder"] == "auto"
    assert auto.encoder.name == "torch" and auto.dtype == native and auto.precision == dtype_name(native)
    assert auto.choices.startswith(f"encoder=torch {dtype_name(native)} (eager: ") and why in auto.choices
    assert f"encoder=torch, dtype={dtype_name(native)}," in repr(auto) and why in repr(auto)
    assert "torch.float" not in repr(auto) and "torch.bfloat" not in repr(auto)
    named = make_segmenter(tiny_config, dtype="float32", encoder="torch")
    assert named.dtype == torch.float32 and named.choices == "encoder=torch fp32 (as given)"
    assert "dtype=fp32" in repr(named) and "why='as given'" in repr(named)
    bf16 = make_segmenter(tiny_config, dtype="bfloat16", encoder="auto")
    assert bf16.dtype == torch.bfloat16 and "dtype=bf16" in repr(bf16) and "eager:" in bf16.choices
    image = np.random.default_rng(12).integers(0, 255, (40, 56, 3), dtype=np.uint8)
    assert auto.predict(image, LABELS, templates="single").labels.shape == (40, 56)
    with pytest.raises(ValueError, match="expected_images must be a number of images"):
        make_segmenter(tiny_config, encoder="auto", expected_images="many")


def test_auto_choice_keeps_the_demo_models_accuracy():
    """Accuracy guard: the shipped demo model's mIoU on held-out synthetic scenes under the auto choice (and
    under bf16, whatever this CPU is) is within 0.5 point of eager fp32."""
    from pacl_fast.data.segmentation import open_dataset
    from pacl_fast.evaluate import evaluate_segmentation

    validation = open_dataset("synthetic", None, "val")
    scores: dict[tuple[str, str], float] = {}

    def miou(**options) -> float:
        segmenter = pacl_fast.Segmenter("demo", device="cpu", **options)
        key = (segmenter.encoder.name, segmenter.precision)  # on a bf16 CPU, auto is the bf16 row: run it once
        if key not in scores:
            scores[key] = evaluate_segmentation(segmenter, validation, limit=48, progress=False).metrics.miou
        return scores[key]

    fp32 = miou(dtype="float32", encoder="torch")
    assert fp32 >= 0.70
    for options in ({}, {"dtype": "bfloat16", "encoder": "torch"}):
        assert abs(miou(**options) - fp32) <= 0.005, options


@pytest.mark.slow
def test_auto_choice_for_a_long_run_keeps_the_demo_models_accuracy(tmp_path):
    """The same guard for what a long run gets (OpenVINO where installed, or compile), built in a fresh cache."""
    from pacl_fast.data.segmentation import open_dataset
    from pacl_fast.evaluate import evaluate_segmentation

    validation = open_dataset("synthetic", None, "val")

    def miou(**options) -> float:
        segmenter = pacl_fast.Segmenter("demo", device="cpu", encoder_options={"cache_dir": tmp_path}, **options)
        return evaluate_segmentation(segmenter, validation, limit=48, progress=False).metrics.miou

    assert abs(miou(expected_images=math.inf) - miou(dtype="float32", encoder="torch")) <= 0.005


@pytest.mark.slow
def test_vit_b_16_patch_tokens_under_the_auto_dtype_match_fp32():
    """bf16 (what the auto choice runs on CPUs with AVX512-BF16 or AMX; named here so every CPU checks it):
    ViT-B-16's patch tokens and PACL embeddings have cosine >= 0.99 to fp32's. The fast check of the same is
    test_encoders.py::test_backend_matches_reference_vit_b_16[torch-bfloat16] (PACL embeddings)."""
    import copy

    from helpers import quiet_load_clip

    from pacl_fast.encoders import TorchEncoder
    from pacl_fast.model import PACL

    torch.manual_seed(0)
    model = PACL(quiet_load_clip("ViT-B-16")).eval()
    pixels = torch.randn(2, 3, 224, 224)
    fp32 = TorchEncoder(copy.deepcopy(model))
    bf16 = TorchEncoder(model, torch.bfloat16)
    for name in ("encode_tokens", "encode_image"):
        ours, reference = getattr(bf16, name)(pixels).float(), getattr(fp32, name)(pixels)
        cosine = torch.nn.functional.cosine_similarity(ours, reference, dim=-1)
        assert cosine.min() >= 0.99, (name, cosine.min())
