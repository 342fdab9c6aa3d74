"""ProxyCLIP on the runtime (issue 25): the segmenter on the VFM's grid, every encoder backend held to the eager
float32 model, export, and the doors (``build``, ``Segmenter``, the CLI, the service) with their errors.

The models are tiny: a random open_clip ViT with 16-pixel patches (so that DINO's 8-pixel grid is finer than
CLIP's, as ViT-B/16 + DINO ViT-B/8 are) and the tiny random VFMs of ``test_proxyclip`` (DINO's patch 8, DINOv2's
14: a pixel multiple of lcm(16, 14) = 112). Doors that build the VFM by name get timm's full-size ViT-B
(random init: a few seconds) on the shipped demo CLIP, at 64 pixels.
"""

from __future__ import annotations

import copy
import io
import time
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import skip_unavailable
from PIL import Image
from test_methods import TINY_LS_CONFIG, load_randomised
from test_proxyclip import tiny_vfm

from kernels.reference import patch_logits, segment_reference
from pacl_fast.backbone import RandomWeightsWarning
from pacl_fast.encoders import EncoderUnavailableError, TorchEncoder, make_encoder
from pacl_fast.encoders.artifacts import export_key
from pacl_fast.images import SlidingWindow, fit_to_model, load_image, plan_resize
from pacl_fast.methods import TrainingFreeCLIP
from pacl_fast.proxyclip import ProxyCLIP
from pacl_fast.segmenter import Segmenter

pytest.importorskip("timm")

LABELS = ["circle", "square", "sky"]
TINY16 = {**TINY_LS_CONFIG, "vision_cfg": {**TINY_LS_CONFIG["vision_cfg"], "patch_size": 16}}  # native grid 4x4


@pytest.fixture(scope="module")
def clip16():
    return load_randomised(TINY16, 50)


@pytest.fixture(scope="module")
def dino(clip16) -> ProxyCLIP:
    return ProxyCLIP(clip16, tiny_vfm("dino_vitb8", seed=11)[0]).eval()


@pytest.fixture(scope="module")
def dinov2(clip16) -> ProxyCLIP:
    return ProxyCLIP(clip16, tiny_vfm("dinov2_vitb14_reg", seed=12)[0]).eval()


def eager(model: ProxyCLIP, **options) -> Segmenter:
    return Segmenter(copy.deepcopy(model), encoder="torch", dtype=None, text_cache=False, **options)


def image(seed: int, height: int, width: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# --- the grid: canvases on the pixel multiple, labels on the VFM's grid -----------------------------------


def test_models_say_their_pixel_multiple_and_grid(dino, dinov2, clip16):
    assert (dino.pixel_multiple, dino.grid_patch) == (16, 8)
    assert (dinov2.pixel_multiple, dinov2.grid_patch) == (112, 14)
    naclip = TrainingFreeCLIP(clip16, "naclip")  # every other method: CLIP's patch for both
    assert (naclip.pixel_multiple, naclip.grid_patch) == (16, 16)
    segmenter = eager(dino)
    assert (segmenter.patch_size, segmenter.pixel_multiple, segmenter.grid_patch) == (16, 16, 8)
    assert "vfm=dino_vitb8@test11" in repr(segmenter) and segmenter.vfm == "dino_vitb8@test11"
    assert segmenter.model_id.endswith("|proxyclip:dino_vitb8@test11|fp32")


def test_canvas_on_the_pixel_multiple_and_grid_on_the_vfm_patch(dinov2):
    segmenter = eager(dinov2, image_size=112)
    prepared = segmenter.preprocessor()(image(0, 50, 70))
    geometry = prepared.geometry
    assert geometry.resized_size == (112, 157) and geometry.canvas_size == (112, 224)  # 157 -> 224 = 2 * 112
    assert geometry.patch_size == 14 and geometry.grid_size == (8, 16)
    assert geometry.grid_extent == pytest.approx((8.0, 157 / 14))
    assert geometry == plan_resize((50, 70), 112, 112, grid_patch=14)
    with pytest.raises(ValueError, match="must be a multiple of the grid patch 14"):
        plan_resize((50, 70), 112, 100, grid_patch=14)


def test_predict_equals_the_plain_pipeline_on_the_vfm_grid(dino):
    """Labels and scores of ``predict`` = the model's embeddings on the 8-pixel grid, cosines with the labels,
    bilinear upsampling over the part of the grid the image covers, argmax: written out with the references."""
    segmenter = eager(dino)
    picture = image(1, 50, 70)  # short side 64 -> 64 x 90, canvas 64 x 96 (multiple of 16), grid 8 x 12
    result = segmenter.predict(picture, LABELS, templates="single")
    geometry = plan_resize((50, 70), 64, 16, grid_patch=8)
    assert geometry.grid_size == (8, 12)
    pixels = fit_to_model(load_image(picture), geometry, segmenter.mean, segmenter.std)[None]
    patches = dino.encode_image(pixels)  # [1, 8, 12, E]
    assert patches.shape[1:3] == (8, 12)
    classes = segmenter.encode_labels(LABELS, "single")
    labels, scores = segment_reference(
        patch_logits(patches, classes), (50, 70), grid_extent=geometry.grid_extent, logit_scale=segmenter.logit_scale
    )
    assert result.labels.shape == (50, 70)
    np.testing.assert_allclose(result.scores, scores[0].numpy(), atol=1e-5)
    assert (result.labels != labels[0].numpy()).mean() < 1e-3  # ties within 1e-4 may differ


@pytest.mark.parametrize("backend", ["reference", "tiled", "triton"])
def test_every_head_backend_segments_the_vfm_grid_alike(dino, backend):
    picture = image(2, 40, 88)
    expected = eager(dino, backend="reference").predict(picture, LABELS, templates="single")
    result = eager(dino, backend=backend).predict(picture, LABELS, templates="single")
    assert result.labels.shape == (40, 88)
    np.testing.assert_allclose(result.scores, expected.scores, atol=1e-5)
    assert (result.labels != expected.labels).mean() < 1e-3


def test_sliding_windows_sit_on_the_pixel_multiple_and_average_on_the_vfm_grid(dino):
    """Three 32-pixel windows every 16 pixels across a 32 x 64 canvas: every cell of the 4 x 8 grid (8-pixel
    cells) is the mean of the windows covering it, written out window by window."""
    segmenter = eager(dino)
    picture = image(3, 32, 64)
    window = SlidingWindow(32, 16, short_side=32)
    classes = segmenter.encode_labels(LABELS, "single")
    canvas = segmenter.preprocessor(window)(picture).pixels  # [3, 32, 64]
    total, count = torch.zeros(4, 8, len(LABELS)), torch.zeros(4, 8, 1)
    for x in (0, 16, 32):
        logits = patch_logits(dino.encode_image(canvas[None, :, :, x : x + 32]), classes)[0]  # [4, 4, C]
        total[:, x // 8 : x // 8 + 4] += logits
        count[:, x // 8 : x // 8 + 4] += 1
    assert count.min() == 1 and count.max() == 2
    labels, scores = segment_reference((total / count)[None], (32, 64), logit_scale=segmenter.logit_scale)
    result = segmenter.predict(picture, LABELS, templates="single", sliding_window=window)
    np.testing.assert_allclose(result.scores, scores[0].numpy(), atol=1e-5)
    assert (result.labels != labels[0].numpy()).mean() < 1e-3


def test_windows_and_sizes_off_the_pixel_multiple_are_refused_naming_it(dinov2):
    segmenter = eager(dinov2, image_size=112)
    words = r"pixel multiple 112 \(the lcm of the CLIP's patch size 16 and the VFM's 14\)"
    with pytest.raises(ValueError, match=rf"crop=224 and stride=56 must be multiples of the {words}"):
        segmenter.predict(image(4, 120, 120), LABELS, sliding_window=SlidingWindow(224, 56))
    with pytest.raises(ValueError, match=rf"image_size=64 is smaller than the {words}"):
        eager(dinov2)  # the tiny CLIP's own 64 pixels
    with pytest.raises(ValueError, match="multiples of the pixel multiple 112"):
        segmenter.encoder.encode_image(torch.randn(1, 3, 112, 160))


# --- every backend against the eager float32 model ------------------------------------------------------


def reference_patches(model: ProxyCLIP, pixels: torch.Tensor) -> torch.Tensor:
    return TorchEncoder(copy.deepcopy(model).float()).encode_image(pixels).float()


BACKENDS = [
    ("torch", torch.float32, "dino_vitb8"),
    ("torch", torch.float32, "dinov2_vitb14_reg"),
    ("torch", torch.bfloat16, "dino_vitb8"),
    ("onnxruntime", torch.float32, "dino_vitb8"),
    ("onnxruntime", torch.float32, "dinov2_vitb14_reg"),
    ("openvino", torch.float32, "dino_vitb8"),
    ("openvino", torch.float32, "dinov2_vitb14_reg"),
    pytest.param("compile", torch.float32, "dino_vitb8", marks=pytest.mark.slow),  # ~50 s of Inductor
    pytest.param("compile", torch.bfloat16, "dinov2_vitb14_reg", marks=pytest.mark.slow),
]
#: Input sizes: neither square nor the tiny CLIP's native 64 x 64, so both towers' positions are resized.
SIZES = {"dino_vitb8": (48, 80), "dinov2_vitb14_reg": (112, 224)}


@pytest.mark.parametrize("name,dtype,vfm", BACKENDS, ids=lambda v: str(v).removeprefix("torch."))
def test_backend_matches_the_eager_float32_model(name, dtype, vfm, dino, dinov2, tmp_path):
    """The VFM, the re-normalisation and the masked attention run inside each backend's graph: its patch
    embeddings on the VFM grid equal the eager float32 model's (fp32: within 2e-5; bf16: cosine >= 0.99), for
    two batch sizes through one graph; exported backends write every element of an output poisoned with NaN."""
    model = dino if vfm == "dino_vitb8" else dinov2
    height, width = SIZES[vfm]
    grid = (height // model.grid_patch, width // model.grid_patch)
    options = {"cache_dir": tmp_path} if name in ("onnxruntime", "openvino") else {}
    try:
        encoder = make_encoder(name, copy.deepcopy(model), dtype, **options)
    except EncoderUnavailableError as error:
        skip_unavailable(name, error)
    torch.manual_seed(5)
    for batch in (3, 2):
        pixels = torch.randn(batch, 3, height, width)
        expected = reference_patches(model, pixels)
        if name in ("onnxruntime", "openvino"):
            out = torch.full((batch, *grid, expected.shape[-1]), float("nan"))
            assert encoder.encode_image(pixels, out=out) is out
        else:
            out = encoder.encode_image(pixels)
        assert out.shape == (batch, *grid, expected.shape[-1]) and torch.isfinite(out).all()
        if dtype == torch.float32:
            torch.testing.assert_close(out.float(), expected, atol=2e-5, rtol=0)
        else:
            assert F.cosine_similarity(out.float(), expected, dim=-1).min() >= 0.99


def test_exported_graph_is_keyed_by_the_vfm_and_shaped_on_its_grid(dino, clip16, tmp_path):
    pytest.importorskip("onnxscript")
    from pacl_fast.encoders import export_artifacts

    other_weights = ProxyCLIP(clip16, tiny_vfm("dino_vitb8", seed=13)[0])
    other_weights.vfm.identity = dino.vfm.identity  # the same name: only the VFM's tensors differ
    keys = {export_key(m, torch.float32) for m in (dino, other_weights, TrainingFreeCLIP(clip16, "naclip"))}
    assert len(keys) == 3
    renamed = copy.deepcopy(dino)
    renamed.vfm.identity = "dino_vitb8@another"
    assert export_key(renamed, torch.float32) != export_key(dino, torch.float32)
    assert dino.describe()["vfm"] == "dino_vitb8@test11"
    manifest = export_artifacts(dino, "onnx", tmp_path / "out", "fp32", [(32, 48)], progress=False)
    image_entry = manifest["artifacts"][0]
    assert manifest["method"] == "proxyclip"
    assert image_entry["input"]["shape"] == ["B", 3, 32, 48] and image_entry["output"]["shape"] == ["B", 4, 6, 64]
    with pytest.raises(ValueError, match="multiple of the model's pixel multiple 16"):
        export_artifacts(dino, "onnx", tmp_path / "bad", "fp32", [(40, 48)], progress=False)


def test_text_embeddings_do_not_depend_on_the_vfm(dino, clip16):
    """The text cache is keyed by the text tower alone, which ProxyCLIP leaves as it is: sharing it with NACLIP
    (and with another VFM) is right, not a stale entry."""
    tokens = clip16.tokenize(["a photo of a circle.", "sky"])
    naclip = TorchEncoder(TrainingFreeCLIP(copy.deepcopy(clip16), "naclip")).encode_text(tokens)
    torch.testing.assert_close(TorchEncoder(copy.deepcopy(dino)).encode_text(tokens), naclip, atol=0, rtol=0)


# --- the doors: build, Segmenter, CLI, service -----------------------------------------------------------


def test_build_refuses_a_vfm_for_other_methods_before_loading(tmp_path):
    from pacl_fast.build import build_model

    with pytest.raises(ValueError, match=r"vfm='dino_vitb8' given with method='naclip': .* only by method='proxyclip'"):
        build_model("no-such-clip", vfm="dino_vitb8")  # the default method without PACL weights
    with pytest.raises(ValueError, match=r"vfm_weights='timm' given with method='sclip'"):
        build_model("no-such-clip", method="sclip", vfm_weights="timm")
    with pytest.raises(ValueError, match="unknown vfm 'sam': choose one of dino_vitb8, dinov2_vitb14_reg"):
        build_model("no-such-clip", method="proxyclip", vfm="sam")
    with pytest.raises(FileNotFoundError, match="vfm_weights .*missing.pth: no such file"):
        build_model("no-such-clip", method="proxyclip", vfm_weights=tmp_path / "missing.pth")
    with pytest.raises(TypeError, match="vfm build a model"):
        Segmenter(torch.nn.Linear(1, 1), vfm="dino_vitb8")


def test_vfm_weights_of_another_model_are_refused_naming_the_file(tmp_path):
    from pacl_fast.vfm import load_vfm

    _, hub = tiny_vfm("dino_vitb8", seed=1)  # a tiny ViT's tensors are not ViT-B/8's
    torch.save(hub, tmp_path / "tiny.pth")
    with pytest.raises(ValueError, match=r"vfm_weights .*tiny.pth do not fit dino_vitb8: missing \['blocks.10"):
        load_vfm("dino_vitb8", tmp_path / "tiny.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth: not a torch checkpoint readable with weights_only=True"):
        load_vfm("dino_vitb8", tmp_path / "junk.pth")


@pytest.fixture(scope="module")
def demo_proxyclip() -> Segmenter:
    """The shipped demo CLIP with timm's full-size DINO ViT-B/8 (random), built by name as users build it."""
    with pytest.warns(RandomWeightsWarning, match="vfm dino_vitb8 is randomly initialised"):
        return Segmenter("demo", method="proxyclip", device="cpu", dtype=None, encoder="torch", text_cache=False)


def test_segmenter_by_name_runs_the_authors_default_vfm(demo_proxyclip):
    segmenter = demo_proxyclip
    assert segmenter.method == "proxyclip" and segmenter.metadata is None  # the demo's PACL weights are not used
    assert segmenter.vfm == "dino_vitb8@random" and "vfm=dino_vitb8@random" in repr(segmenter)
    assert (segmenter.pixel_multiple, segmenter.grid_patch) == (8, 8)
    result = segmenter.predict(image(5, 40, 60), LABELS, templates="single")
    assert result.labels.shape == (40, 60)


def test_cli_has_the_vfm_options_on_every_command_and_checks_them_first(tmp_path, capsys):
    from pacl_fast.cli import main

    for command in (["segment"], ["eval"], ["classify"], ["export"], ["serve"]):
        with pytest.raises(SystemExit):
            main([*command, "--help"])
        shown = capsys.readouterr().out
        assert "--vfm {dino_vitb8,dinov2_vitb14_reg}" in shown and "--vfm-weights" in shown, command
        assert "proxyclip" in shown, command
    picture = tmp_path / "a.png"
    Image.fromarray(image(6, 32, 32)).save(picture)
    base = ["segment", str(picture), "--labels", "a,b", "--out", str(tmp_path / "out"), "--clip", "demo"]
    assert main([*base, "--vfm", "dino_vitb8"]) == 2
    assert "--vfm given with the default method: a vision foundation model is used only by --method proxyclip" in (
        capsys.readouterr().err
    )
    assert main([*base, "--method", "naclip", "--vfm-weights", "timm"]) == 2
    assert "--vfm-weights given with --method naclip" in capsys.readouterr().err
    assert main([*base, "--method", "proxyclip", "--vfm-weights", str(tmp_path / "none.pth")]) == 2
    assert "--vfm-weights" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_cli_segment_runs_proxyclip(tmp_path, capsys):
    from pacl_fast.cli import main

    picture = tmp_path / "a.png"
    Image.fromarray(image(7, 40, 56)).save(picture)
    out = tmp_path / "out"
    args = ["segment", str(picture), "--labels", "circle,sky", "--out", str(out), "--clip", "demo", "--templates",
            "single", "--method", "proxyclip", "--vfm", "dino_vitb8", "--no-text-cache"]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        assert main(args) == 0
    captured = capsys.readouterr()
    assert "method=proxyclip" in captured.err and "vfm=dino_vitb8@random" in captured.err
    labels = np.asarray(Image.open(out / "a_labels.png"))
    assert labels.shape == (40, 56) and set(np.unique(labels)) <= {0, 1}


def test_service_info_names_the_vfm_and_its_grid(dino):
    from fastapi.testclient import TestClient

    from pacl_fast.serve.app import create_app
    from pacl_fast.serve.settings import ServeSettings

    segmenter = eager(dino)
    settings = ServeSettings(max_batch=2, max_wait_ms=5, max_queue=4, timeout=30, templates="single")
    with TestClient(create_app(segmenter, settings)) as client:
        for _ in range(600):
            if client.get("/readyz").status_code == 200:
                break
            time.sleep(0.05)
        info = client.get("/v1/info").json()
        assert info["method"] == "proxyclip" and info["vfm"] == "dino_vitb8@test11"
        assert (info["patch_size"], info["pixel_multiple"], info["grid_patch"]) == (16, 16, 8)
        buffer = io.BytesIO()
        Image.fromarray(image(8, 40, 52)).save(buffer, format="PNG")
        reply = client.post(
            "/v1/segment",
            files={"file": ("a.png", buffer.getvalue(), "image/png")},
            data={"labels": ",".join(LABELS), "sliding_window": "32,16"},
            headers={"Accept": "application/json"},
        )
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert (body["height"], body["width"]) == (40, 52) and body["classes"] == LABELS
        bad = client.post(
            "/v1/segment",
            files={"file": ("a.png", buffer.getvalue(), "image/png")},
            data={"labels": ",".join(LABELS), "sliding_window": "40,8"},
        )
        assert bad.status_code == 422 and "multiples" in bad.text


def test_service_windows_sit_on_the_pixel_multiple(dinov2):
    """The service checks a request's window against the pixel multiple (DINOv2: lcm(16, 14) = 112), not CLIP's
    patch alone, and its default window sits on it."""
    from pacl_fast.serve.errors import ApiError
    from pacl_fast.serve.inputs import default_sliding_window, parse_sliding_window

    segmenter = eager(dinov2, image_size=112)
    crop, stride, _ = default_sliding_window(segmenter)
    assert crop % 112 == 0 and stride % 112 == 0
    assert parse_sliding_window("224,112", segmenter)[:2] == (224, 112)
    with pytest.raises(ApiError, match="multiples of the pixel multiple 112"):
        parse_sliding_window("48,16", segmenter)


def test_protocol_proxyclip_drives_the_evaluation(tmp_path, dino):
    """``--protocol proxyclip`` on VOC21 with a ProxyCLIP segmenter: mmcv's resize to short side 336 onto a canvas
    of the pixel multiple, 336/112 windows averaged on the VFM's grid, the 26 stuff names of class 0 and the 0.2
    threshold, written out from the preset's numbers (the dense logits are the engine's ``image_logits``)."""
    cv2 = pytest.importorskip("cv2")
    from layouts import write_voc

    from pacl_fast.data.segmentation import open_dataset
    from pacl_fast.evaluate import evaluate_segmentation
    from pacl_fast.images import Geometry, Prepared, normalize
    from pacl_fast.metrics import confusion_matrix
    from pacl_fast.protocols import get_protocol

    protocol = get_protocol("proxyclip", "voc21")
    rng = np.random.default_rng(0)
    masks = {f"2007_{i:06d}": rng.integers(0, 21, (36 + 6 * i, 52 - 2 * i), dtype=np.uint8) for i in range(2)}
    write_voc(tmp_path, masks)
    dataset = open_dataset("voc21", tmp_path)
    segmenter = eager(dino, image_size=protocol.short_side, logit_scale=protocol.logit_scale)
    report = evaluate_segmentation(segmenter, dataset, protocol=protocol, progress=False)
    assert not report.failures and report.protocol["eval_protocol"]["name"] == "proxyclip"
    window = SlidingWindow(336, 112, 336)
    unique = list(dict.fromkeys(protocol.queries))
    texts = segmenter.encode_labels(unique, "imagenet")[[unique.index(q) for q in protocol.queries]]
    expected = np.zeros((21, 21), np.int64)
    for index in range(len(dataset)):
        picture, truth = dataset[index]
        height, width = picture.shape[:2]
        factor = min(2048 / max(height, width), 336 / min(height, width))
        size = (int(height * factor + 0.5), int(width * factor + 0.5))
        resized = cv2.resize(picture, size[::-1], interpolation=cv2.INTER_LINEAR)  # uint8, no antialiasing
        pixels = normalize(torch.from_numpy(resized).permute(2, 0, 1).float() / 255, segmenter.mean, segmenter.std)
        canvas = tuple(-(-side // 16) * 16 for side in size)  # lcm(16, 8)
        padded = F.pad(pixels, (0, canvas[1] - size[1], 0, canvas[0] - size[0]))
        dense = segmenter.image_logits(Prepared(padded, Geometry((height, width), size, canvas, 8)), texts, window)
        expected += confusion_matrix(protocol.postprocess(dense).numpy(), truth, 21).numpy()
    np.testing.assert_array_equal(report.metrics.confusion, expected)
