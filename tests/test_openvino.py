"""The OpenVINO encoder (fp32, bf16, NNCF int8) against the torch fp32 reference; its cache, its
calibration, and how a missing OpenVINO, a CPU without bf16 and bad calibration folders are reported.

Skipped where OpenVINO and NNCF are not installed (``pip install pacl-fast[openvino]``), except the
tests of what a missing OpenVINO says. The tiny CLIP runs at 48x80 (a 6x10 grid, not its native 8x8).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import quiet_load_clip
from PIL import Image

from pacl_fast.data.synthetic import WorldConfig, render_scene
from pacl_fast.encoders import EncoderUnavailableError, make_encoder
from pacl_fast.encoders.artifacts import weights_digest
from pacl_fast.encoders.export import OnnxCache
from pacl_fast.images import fit_to_model, load_image, normalize, plan_resize
from pacl_fast.model import PACL

HAS_OPENVINO = all(importlib.util.find_spec(name) is not None for name in ("openvino", "nncf"))
needs_openvino = pytest.mark.skipif(
    not HAS_OPENVINO, reason="needs OpenVINO and NNCF (pip install pacl-fast[openvino]); not installed"
)
if HAS_OPENVINO:
    from pacl_fast.encoders.calibration import Calibration, CalibrationImages
    from pacl_fast.encoders.openvino_encoder import (
        ENTRY_JSON,
        MODEL_BIN,
        MODEL_XML,
        OpenVINOEncoder,
        export_openvino,
        require_bf16,
    )

SIZE = (48, 80)
CALIBRATION = 16  # int8 tests calibrate on few scenes: seconds, not minutes (the default is 300)


@pytest.fixture(scope="module")
def model(tiny_config) -> PACL:
    torch.manual_seed(0)
    backbone = quiet_load_clip(tiny_config)
    torch.manual_seed(1)
    model = PACL(backbone).eval()
    torch.nn.init.normal_(model.embedder.fc2.weight, std=0.05)  # the MLP branch starts at zero: make it count
    return model


@pytest.fixture(scope="module")
def shared(tmp_path_factory, model):
    """A cache folder with the tiny model's ONNX export for ``SIZE`` in it (exported once per module)."""
    if not HAS_OPENVINO:
        pytest.skip("needs OpenVINO")
    folder = tmp_path_factory.mktemp("openvino-cache")
    OnnxCache(model, torch.float32, folder).image(SIZE)
    return folder


@pytest.fixture()
def fresh(shared, tmp_path):
    """An empty OpenVINO cache beside a copy of the shared ONNX export."""
    shutil.copytree(shared / "onnx", tmp_path / "onnx")
    return tmp_path


@pytest.fixture(scope="module")
def int8_encoder(model, shared):
    return OpenVINOEncoder(model, "int8", cache_dir=shared, calibration="synthetic", calibration_size=CALIBRATION)


def reference(model: PACL, pixels: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.encode_image(pixels)


def held_out_scenes(count: int) -> torch.Tensor:
    """Normalised ``[count, 3, 48, 80]``: validation scenes (seed 1; calibration uses seed 0), 80 px, rows 16..63."""
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # the tiny CLIP's
    images = [render_scene(i, 1, WorldConfig(image_size=80)).image[16:64] for i in range(count)]
    return normalize(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0, mean, std)


def fake_quantize_count(xml) -> int:  # noqa: ANN001
    import openvino

    return sum(op.get_type_name() == "FakeQuantize" for op in openvino.Core().read_model(str(xml)).get_ops())


def cpu_has_bf16() -> bool:
    import openvino

    return "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


# --- fp32 and bf16 against the torch reference --------------------------------------------------------


@needs_openvino
def test_fp32_matches_torch(model, shared):
    before = weights_digest(model)
    encoder = make_encoder("openvino", model, cache_dir=shared)
    assert encoder.name == "openvino" and encoder.precision == "fp32" and encoder.dtype == torch.float32
    torch.manual_seed(7)
    pixels = torch.randn(3, 3, *SIZE)
    patches = encoder.encode_image(pixels)
    assert patches.shape == (3, 6, 10, 64) and patches.dtype == torch.float32
    torch.testing.assert_close(patches, reference(model, pixels), atol=1e-4, rtol=0)
    # Another batch size through the same model, written into a caller's buffer (every element).
    pair = torch.randn(2, 3, *SIZE)
    out = torch.full((2, 6, 10, 64), float("nan"))
    assert encoder.encode_image(pair, out=out) is out
    torch.testing.assert_close(out, reference(model, pair), atol=1e-4, rtol=0)
    # Text and CLIP's global embedding are the model's own, in PyTorch.
    tokens = model.backbone.tokenize(["a photo of a cat.", "a dog", "the sky"])
    with torch.inference_mode():
        torch.testing.assert_close(encoder.encode_text(tokens), model.encode_text(tokens).float())
        native = torch.randn(2, 3, 64, 64)
        torch.testing.assert_close(encoder.encode_global(native), model.encode_global(native).float())
    # THROUGHPUT splits a batch among the plugin's streams: same numbers.
    throughput = make_encoder("openvino", model, cache_dir=shared, hint="THROUGHPUT", threads=2)
    torch.testing.assert_close(throughput.encode_image(pixels), patches, atol=1e-5, rtol=0)
    compiled = throughput.compiled_model(SIZE)
    assert str(compiled.get_property("PERFORMANCE_HINT")) == "THROUGHPUT"
    assert compiled.get_property("INFERENCE_NUM_THREADS") == 2
    assert str(encoder.compiled_model(SIZE).get_property("PERFORMANCE_HINT")) == "LATENCY"
    assert weights_digest(model) == before  # the model is never modified
    with pytest.raises(ValueError, match=r"out must be a contiguous \(2, 6, 10, 64\)"):
        encoder.encode_image(pair, out=torch.empty(2, 6, 10, 32))
    with pytest.raises(ValueError, match="multiples of the patch size 8"):
        encoder.encode_image(torch.randn(1, 3, 30, 64))


@needs_openvino
def test_bf16_matches_torch_or_says_the_cpu_lacks_it(model, shared):
    if not cpu_has_bf16():
        with pytest.raises(EncoderUnavailableError, match="AVX512-BF16 or AMX"):
            make_encoder("openvino", model, torch.bfloat16, cache_dir=shared)
        return
    encoder = make_encoder("openvino", model, torch.bfloat16, cache_dir=shared)
    assert encoder.precision == "bf16" and encoder.dtype == torch.float32
    torch.manual_seed(8)
    pixels = torch.randn(3, 3, *SIZE)
    expected, patches = reference(model, pixels), encoder.encode_image(pixels)
    assert F.cosine_similarity(patches, expected, dim=-1).min() >= 0.99
    assert (patches - expected).abs().max() > 1e-4, "bf16 gave fp32's numbers: the precision hint was not applied"
    assert encoder.model_path(SIZE) == make_encoder("openvino", model, cache_dir=shared).model_path(SIZE)


@needs_openvino
def test_require_bf16_refuses_cpus_without_it():
    with pytest.raises(EncoderUnavailableError, match=r"AVX512-BF16 or AMX.*\['FP32', 'INT8'\].*Old CPU"):
        require_bf16(["INT8", "FP32"], "Old CPU")
    require_bf16(["BF16", "FP32"], "New CPU")


# --- int8 ----------------------------------------------------------------------------------------------


@needs_openvino
def test_int8_matches_torch_on_held_out_scenes(model, int8_encoder):
    """Calibrated on 16 training scenes: patch cosine >= 0.99 on validation scenes (measured 0.9956 min)."""
    pixels = held_out_scenes(6)
    patches = int8_encoder.encode_image(pixels)
    cosine = F.cosine_similarity(patches, reference(model, pixels), dim=-1)
    assert cosine.min() >= 0.99 and cosine.mean() >= 0.999, (cosine.min(), cosine.mean())
    assert fake_quantize_count(int8_encoder.model_path(SIZE)) > 10  # quantized, not the fp32 graph
    entry = json.loads((int8_encoder.model_folder(SIZE) / ENTRY_JSON).read_text())
    assert entry["calibration"]["source"] == "synthetic" and entry["calibration"]["count"] == CALIBRATION


@needs_openvino
def test_int8_cache_is_reused(model, shared, int8_encoder):
    folder = int8_encoder.model_path(SIZE).parent  # built here if this test runs alone
    stamps = {name: (folder / name).stat().st_mtime_ns for name in (MODEL_XML, MODEL_BIN, ENTRY_JSON)}
    folders = sorted((shared / "openvino").rglob("image-*"))
    again = OpenVINOEncoder(model, "int8", cache_dir=shared, calibration="synthetic", calibration_size=CALIBRATION)
    pixels = held_out_scenes(2)
    torch.testing.assert_close(again.encode_image(pixels), int8_encoder.encode_image(pixels), atol=0, rtol=0)
    # Without a calibration, the int8 model already cached for this size is used.
    cached = make_encoder("openvino", model, cache_dir=shared, precision="int8")
    assert cached.model_folder(SIZE) == folder
    cached.encode_image(pixels)
    assert stamps == {name: (folder / name).stat().st_mtime_ns for name in stamps}
    assert sorted((shared / "openvino").rglob("image-*")) == folders  # nothing new was built
    # Another calibration is another model.
    other = OpenVINOEncoder(model, "int8", cache_dir=shared, calibration="synthetic", calibration_size=CALIBRATION + 1)
    assert other.model_folder(SIZE) != folder
    # Of several cached int8 models for this size, the newest is used.
    newer = folder.with_name(folder.name.rsplit("-", 1)[0] + "-0newer")
    shutil.copytree(folder, newer)
    try:
        later = (folder / ENTRY_JSON).stat().st_mtime_ns + 10**9
        os.utime(newer / ENTRY_JSON, ns=(later, later))
        assert make_encoder("openvino", model, cache_dir=shared, precision="int8").model_folder(SIZE) == newer
    finally:
        shutil.rmtree(newer)


@needs_openvino
def test_int8_calibrates_on_a_folder_and_skips_bad_images(model, fresh, tmp_path, caplog):
    images = tmp_path / "photos"
    (images / "sub").mkdir(parents=True)
    for i in range(6):  # scenes of several sizes, in a subfolder too
        side = 64 + 16 * i
        target = images / ("sub" if i % 2 else "") / f"scene{i}.png"
        Image.fromarray(render_scene(i, 0, WorldConfig(image_size=side)).image).save(target)
    (images / "broken.png").write_bytes(b"not an image")
    (images / "notes.txt").write_text("not an image either")
    caplog.set_level("WARNING", logger="pacl_fast.encoders.openvino_encoder")
    encoder = OpenVINOEncoder(model, "int8", cache_dir=fresh, calibration=images, progress=False)
    assert encoder.calibration.count == 7  # every image file: fewer than calibration_size
    pixels = held_out_scenes(4)
    cosine = F.cosine_similarity(encoder.encode_image(pixels), reference(model, pixels), dim=-1)
    assert cosine.min() >= 0.98, cosine.min()
    assert f"skipping {images / 'broken.png'}" in caplog.text and "fewer than calibration_size=300" in caplog.text
    folder = encoder.model_folder(SIZE)
    assert folder.name.startswith("image-48x80-int8-images7-") and fake_quantize_count(folder / MODEL_XML) > 10
    # The key follows the files: a changed image is a new calibration set.
    os.utime(images / "scene0.png", ns=(1, 1))
    assert OpenVINOEncoder(model, "int8", cache_dir=fresh, calibration=images).model_folder(SIZE) != folder


@needs_openvino
def test_calibration_inputs_are_the_segmenters_inputs(model, tmp_path):
    """A calibration image of the graph's aspect is exactly what the segmenter feeds the model."""
    mean, std = model.backbone.mean_std
    torch.manual_seed(3)
    for shape in [(80, 100), (80, 120)]:
        path = tmp_path / f"photo{shape[1]}.png"
        Image.fromarray(torch.randint(0, 256, (*shape, 3), dtype=torch.uint8).numpy()).save(path)
    calibration = Calibration.resolve(tmp_path, 300)
    images = CalibrationImages(calibration, (64, 80), 64, mean, std, progress=False)
    # 80x100 -> the segmenter's canvas is 64x80: the same pixels.
    expected = fit_to_model(load_image(tmp_path / "photo100.png"), plan_resize((80, 100), 64, 8), mean, std)
    got = images.input(tmp_path / "photo100.png")
    assert got.shape == (1, 3, 64, 80) and got.dtype == np.float32
    torch.testing.assert_close(torch.from_numpy(got[0]), expected)
    # 80x120 -> the segmenter's canvas is 64x96; a 64x80 graph sees its centre columns 8..87.
    canvas = fit_to_model(load_image(tmp_path / "photo120.png"), plan_resize((80, 120), 64, 8), mean, std)
    torch.testing.assert_close(torch.from_numpy(images.input(tmp_path / "photo120.png")[0]), canvas[:, :, 8:88])
    # Synthetic calibration: training-world scenes (seed 0) at the CLIP's native size.
    synthetic = CalibrationImages(Calibration.resolve("synthetic", 4), (64, 64), 64, mean, std)
    scene = torch.from_numpy(render_scene(2, 0, WorldConfig(image_size=64)).image).permute(2, 0, 1)
    expected = fit_to_model(scene, plan_resize((64, 64), 64, 8), mean, std)
    torch.testing.assert_close(torch.from_numpy(list(synthetic)[2][0]), expected)
    assert len(synthetic) == 4


@needs_openvino
def test_calibration_picks_images_spread_over_the_folder(tmp_path):
    for name in "abcdefghij":
        (tmp_path / name).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / name / "x.jpg")
    (tmp_path / ".hidden").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / ".hidden" / "x.jpg")
    picked = Calibration.resolve(tmp_path, 3).files
    assert [p.parent.name for p in picked] == ["a", "d", "g"]


@needs_openvino
def test_bad_calibration_is_named(model, fresh, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"calibration folder not found: {missing}"):
        OpenVINOEncoder(model, "int8", cache_dir=fresh, calibration=missing)
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(ValueError, match="is not a folder"):
        OpenVINOEncoder(model, "int8", cache_dir=fresh, calibration=tmp_path / "file.png")
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=f"calibration folder {empty} holds no images"):
        OpenVINOEncoder(model, "int8", cache_dir=fresh, calibration=empty)
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    for i in range(3):
        (garbage / f"{i}.jpg").write_bytes(b"\xff\xd8 truncated")
    encoder = OpenVINOEncoder(model, "int8", cache_dir=fresh, calibration=garbage, progress=False)
    with pytest.raises(ValueError, match=f"calibration folder {garbage}: none of its 3 chosen images could be decoded"):
        encoder.encode_image(torch.randn(1, 3, *SIZE))
    assert not list((fresh / "openvino").rglob("*.xml"))  # nothing half-built was left in the cache
    with pytest.raises(ValueError, match="calibration is used only with precision='int8'"):
        OpenVINOEncoder(model, "fp32", cache_dir=fresh, calibration="synthetic")
    with pytest.raises(ValueError, match="calibration_size must be a positive integer"):
        OpenVINOEncoder(model, "int8", cache_dir=fresh, calibration="synthetic", calibration_size=0)


# --- the cache -----------------------------------------------------------------------------------------


def assert_each_breakage_is_named_and_rebuilt(breakages, model, fresh, folder, pixels, expected, caplog) -> None:
    """Break the cache entry ``folder`` each way in turn: the next encoder names the breakage in a warning,
    rebuilds the entry in place (equal outputs, a record again) and leaves no temporary folder."""
    for message, breakage in breakages.items():
        breakage()
        caplog.clear()
        encoder = OpenVINOEncoder(model, cache_dir=fresh)
        torch.testing.assert_close(encoder.encode_image(pixels), expected, atol=1e-4, rtol=0)
        assert f"OpenVINO cache entry {folder} is broken ({message}" in caplog.text, message
        assert encoder.model_folder(SIZE) == folder and (folder / ENTRY_JSON).is_file()
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary folders left


@needs_openvino
def test_broken_cache_entries_are_named_and_rebuilt(model, fresh, caplog):
    pixels = torch.randn(2, 3, *SIZE)
    expected = reference(model, pixels)
    folder = OpenVINOEncoder(model, cache_dir=fresh).model_path(SIZE).parent
    caplog.set_level("WARNING", logger="pacl_fast.encoders.openvino_encoder")
    breakages = {
        "model.bin has": lambda: (folder / MODEL_BIN).write_bytes((folder / MODEL_BIN).read_bytes()[:1000]),
        "it failed to load": lambda: (folder / MODEL_XML).write_bytes(b"<" * (folder / MODEL_XML).stat().st_size),
    }
    assert_each_breakage_is_named_and_rebuilt(breakages, model, fresh, folder, pixels, expected, caplog)


@needs_openvino
def test_a_broken_entry_of_any_shape_is_rebuilt_once(model, fresh, caplog):
    """Issue 23 item 6, for OpenVINO: a file where the entry's folder belongs, a folder where its model belongs,
    a record naming files outside, a record that is a FIFO (a reader must not hang on it)."""
    pixels = torch.randn(2, 3, *SIZE)
    expected = reference(model, pixels)
    folder = OpenVINOEncoder(model, cache_dir=fresh).model_path(SIZE).parent

    def to_file() -> None:
        shutil.rmtree(folder)
        folder.write_bytes(b"a file")

    def xml_to_folder() -> None:
        (folder / MODEL_XML).unlink()
        (folder / MODEL_XML).mkdir()

    def forged() -> None:
        record = json.loads((folder / ENTRY_JSON).read_text())
        record["files"]["../../model.bin"] = 5
        (folder / ENTRY_JSON).write_text(json.dumps(record))

    def fifo() -> None:
        (folder / ENTRY_JSON).unlink()
        os.mkfifo(folder / ENTRY_JSON)

    breakages = {
        "it is not a folder": to_file,
        "model.xml is not a regular file": xml_to_folder,
        "entry.json names a file outside its folder": forged,
        "entry.json cannot be read": fifo,
    }
    assert_each_breakage_is_named_and_rebuilt(breakages, model, fresh, folder, pixels, expected, caplog)


@needs_openvino
def test_auto_runs_a_cached_openvino_model_and_says_so(model, shared, tmp_path):
    """encoder='auto' takes OpenVINO when a model of these weights is cached (nothing to build), in the
    precision the CPU runs best; the segmenter's repr says what runs and why."""
    from pacl_fast.encoders import choose
    from pacl_fast.encoders.auto import native_dtype
    from pacl_fast.encoders.base import dtype_name
    from pacl_fast.segmenter import Segmenter

    OpenVINOEncoder(model, cache_dir=shared).model_path(SIZE)  # cached (built here if this test runs alone)
    precision = dtype_name(native_dtype(torch.device("cpu"))[0])
    choice = choose(model, options={"cache_dir": shared})
    assert (choice.encoder, choice.precision) == ("openvino", precision)
    assert "OpenVINO installed, cached model found (48x80)" in str(choice)
    segmenter = Segmenter(model, encoder_options={"cache_dir": shared})
    assert segmenter.encoder.name == "openvino" and segmenter.precision == precision
    assert f"encoder=openvino, dtype={precision}" in repr(segmenter) and "cached model found (48x80)" in repr(segmenter)
    # Another cache, or other weights: nothing cached, and a few images do not pay a build.
    assert choose(model, options={"cache_dir": tmp_path}).encoder == "torch"
    edited = copy.deepcopy(model)
    with torch.no_grad():
        edited.embedder.fc1.weight[0, 0] += 1e-3
    assert choose(edited, options={"cache_dir": shared}).encoder == "torch"
    # Named choices win over the cache.
    assert choose(model, "torch", "float32", options={"cache_dir": shared}).encoder == "torch"


@needs_openvino
def test_repr_names_the_real_precision(model, int8_encoder):
    """``--dtype int8`` printed dtype=torch.float32 (OpenVINO returns float32 tensors whatever it computes in)."""
    from pacl_fast.segmenter import Segmenter

    segmenter = Segmenter(model, encoder=int8_encoder)
    assert segmenter.precision == "int8" and "dtype=int8" in repr(segmenter) and "torch.float32" not in repr(segmenter)
    assert segmenter.choices == "encoder=openvino int8 (as given)"


@needs_openvino
def test_cache_key_follows_weights_and_precision(model, shared):
    encoder = OpenVINOEncoder(model, cache_dir=shared)
    assert encoder.root.parent == shared / "openvino" and encoder.root.name.startswith(encoder.onnx.key)
    edited = copy.deepcopy(model)
    with torch.no_grad():
        edited.embedder.fc1.weight[0, 0] += 1e-3
    assert OpenVINOEncoder(edited, cache_dir=shared).root != encoder.root
    int8 = OpenVINOEncoder(model, "int8", cache_dir=shared, calibration="synthetic")
    assert int8.root == encoder.root and int8.model_folder(SIZE) != encoder.model_folder(SIZE)


@needs_openvino
def test_export_openvino_then_an_encoder_finds_it(model, shared, int8_encoder):
    """What ``pacl-fast export --format openvino --precision int8`` calls; the fixture's int8 model is reused."""
    manifest = export_openvino(model, shared, [SIZE], "int8", "synthetic", CALIBRATION, progress=False)
    assert json.loads((shared / "manifest.json").read_text()) == manifest
    (artifact,) = manifest["artifacts"]
    assert artifact["path"] == int8_encoder.model_path(SIZE).relative_to(shared).as_posix()
    assert artifact["input"]["shape"] == ["B", 3, 48, 80] and artifact["output"]["shape"] == ["B", 6, 10, 64]
    assert artifact["calibration"]["source"] == "synthetic" and artifact["calibration"]["count"] == CALIBRATION
    import openvino

    compiled = openvino.Core().compile_model(str(shared / artifact["path"]), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    pixels = held_out_scenes(2)
    patches = compiled(pixels.numpy())[0]
    torch.testing.assert_close(torch.from_numpy(patches), int8_encoder.encode_image(pixels))


# --- choosing the backend, and what a missing one says ----------------------------------------------------


def test_missing_openvino_names_the_extra(tiny_pacl, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now raises ImportError
    with pytest.raises(EncoderUnavailableError, match=r"needs OpenVINO.*pip install pacl-fast\[openvino\]"):
        make_encoder("openvino", tiny_pacl)


@needs_openvino
def test_missing_nncf_names_the_extra(tiny_pacl, monkeypatch):
    monkeypatch.setitem(sys.modules, "nncf", None)
    with pytest.raises(EncoderUnavailableError, match=r"needs NNCF.*pip install pacl-fast\[openvino\]"):
        make_encoder("openvino", tiny_pacl, precision="int8")


@needs_openvino
def test_bad_openvino_arguments(model, shared):
    with pytest.raises(ValueError, match="runs fp32, bf16 or int8"):
        make_encoder("openvino", model, torch.float16, cache_dir=shared)
    with pytest.raises(ValueError, match="disagree"):
        make_encoder("openvino", model, torch.bfloat16, cache_dir=shared, precision="int8")
    with pytest.raises(ValueError, match="precision must be one of"):
        make_encoder("openvino", model, cache_dir=shared, precision="int4")
    with pytest.raises(ValueError, match="hint must be one of"):
        make_encoder("openvino", model, cache_dir=shared, hint="FAST")
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        make_encoder("openvino", model, cache_dir=shared, threads=0)


# --- slow: the segmenter, and ViT-B-16 ---------------------------------------------------------------------


@needs_openvino
@pytest.mark.slow
def test_segmenter_with_openvino_matches_torch(tiny_config, tmp_path):
    from helpers import make_segmenter

    eager = make_segmenter(tiny_config)
    ov = make_segmenter(tiny_config, encoder="openvino", encoder_options={"cache_dir": tmp_path})
    assert ov.encoder.name == "openvino" and "openvino" in repr(ov)
    labels = ["circle", "square", "sky"]
    image = torch.rand(3, 50, 70)
    ours, theirs = ov.predict(image, labels, templates="single"), eager.predict(image, labels, templates="single")
    assert (ours.labels == theirs.labels).mean() > 0.99
    torch.testing.assert_close(torch.from_numpy(ours.scores), torch.from_numpy(theirs.scores), atol=1e-4, rtol=0)


@needs_openvino
@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_vit_b_16_matches_torch(precision, tmp_path_factory):
    if precision == "bf16" and not cpu_has_bf16():
        pytest.skip("this CPU has no bf16 (AVX512-BF16 or AMX)")
    torch.manual_seed(0)
    model = PACL(quiet_load_clip("ViT-B-16")).eval()
    pixels = torch.randn(2, 3, 224, 224)
    encoder = OpenVINOEncoder(model, precision, cache_dir=tmp_path_factory.mktemp("vit"))
    cosine = F.cosine_similarity(encoder.encode_image(pixels), reference(model, pixels), dim=-1)
    assert cosine.min() >= (0.999 if precision == "fp32" else 0.99), cosine.min()


@needs_openvino
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sigaltstack is read through Linux's libc")
def test_building_and_running_leave_the_threads_signal_stack_as_found(model, fresh):
    """OpenVINO's CPU plugin registers an alternate signal stack when it builds an engine and frees it
    without unregistering; CPython's SA_ONSTACK handlers then ran on freed memory (segfaults in the suite)."""
    import ctypes

    from pacl_fast.encoders.openvino_encoder import _StackT

    libc = ctypes.CDLL(None, use_errno=True)

    def current() -> tuple:
        stack = _StackT()
        assert libc.sigaltstack(None, ctypes.byref(stack)) == 0
        return stack.sp, stack.flags, stack.size

    before = current()
    encoder = OpenVINOEncoder(model, "fp32", cache_dir=fresh)
    encoder.encode_image(held_out_scenes(2))  # the engine is built here
    assert current() == before
