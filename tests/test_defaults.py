"""One default, every door (DESIGN §3, issue 19 item 4): a model's defaults live in one place
(``pacl_fast.defaults``), resolved once when it is built, and ``predict``, ``pacl-fast segment``, ``eval``,
the service and its page read them from there. Also the display names (issue 24 item 8), the logit scale
read once and ``model_id``'s precision (issue 21)."""

from __future__ import annotations

import base64
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from helpers import wait_ready
from layouts import write_tiny_clip, write_tiny_pacl
from PIL import Image

from pacl_fast.backbone import RandomWeightsWarning
from pacl_fast.build import DEMO_PACL, build_model, display_name
from pacl_fast.cli import main
from pacl_fast.cli.serve import configure_parser, resolve_model_options, settings_from_args
from pacl_fast.data.synthetic import CLASS_NAMES, render_scene
from pacl_fast.defaults import DEMO_BACKGROUND_THRESHOLD, record_defaults, recorded_defaults, training_defaults
from pacl_fast.images import SlidingWindow
from pacl_fast.segmenter import Segmenter
from pacl_fast.serve.app import create_app
from pacl_fast.serve.render import label_map_from_png
from pacl_fast.weights import read_pacl_weights


@pytest.fixture()
def own_cache(tmp_path, monkeypatch):
    """A cache folder of this test's own: what ``--encoder auto`` finds cached does not depend on other tests."""
    monkeypatch.setenv("PACL_FAST_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory, tiny_config) -> Path:
    return write_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip", tiny_config)


def quiet_segmenter(*args, **kwargs) -> Segmenter:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        return Segmenter(*args, device="cpu", **kwargs)


def png_labels(path: Path) -> np.ndarray:
    """A label PNG as ``pacl-fast segment`` writes it -> ``[H, W]`` int16, -1 background."""
    values = np.asarray(Image.open(path)).astype(np.int16)
    return np.where(values == 255, -1, values).astype(np.int16)


def serve_door(argv: list[str]) -> TestClient:
    """The service as ``pacl-fast serve ARGV`` makes it (its option parsing, settings and model), in process."""
    import argparse

    from pacl_fast.cli import common

    parser = argparse.ArgumentParser()
    configure_parser(parser)
    args = parser.parse_args(argv)
    settings = settings_from_args(args)
    resolve_model_options(args)
    segmenter = common.make_segmenter(args, args.device, expected_images=math.inf, announce=False)
    return TestClient(create_app(segmenter, settings))


# ------------------------------------------------------------------------------------- the three doors


@pytest.mark.parametrize("model", ["demo", "tiny-naclip"])
def test_one_image_gets_the_same_labels_through_predict_the_cli_and_the_service(model, tmp_path, tiny_clip, own_cache):
    """The test issue 19 asks for: no options at all in ``predict`` and ``pacl-fast segment``; the service started
    as ``pacl-fast serve`` with only the encoder named (a service's ``--encoder auto`` picks OpenVINO where it is
    installed, predict eager torch for one image: a speed choice, not a default of the model; named here as
    predict chose it). Before one place owned the defaults, the demo model answered with imagenet templates in
    predict and the CLI, synthetic ones in the service, and no background threshold anywhere."""
    if model == "demo":
        clip, labels = ["--clip", "demo"], list(CLASS_NAMES)
        image = render_scene(5, seed=100).image
    else:
        clip, labels = ["--clip", f"local-dir:{tiny_clip}", "--method", "naclip"], ["cat", "dog", "sky"]
        image = np.random.default_rng(3).integers(0, 256, (40, 72, 3), dtype=np.uint8)
    path = tmp_path / "photo.png"
    Image.fromarray(image).save(path)

    library = quiet_segmenter(clip[1], **({"method": "naclip"} if model != "demo" else {}))
    by_predict = library.predict(str(path), labels).labels

    assert main(["segment", str(path), "--labels", ",".join(labels), "--out", str(tmp_path / "out"), *clip,
                 "--device", "cpu", "--quiet"]) == 0  # fmt: skip
    by_cli = png_labels(tmp_path / "out" / "photo_labels.png")

    with serve_door([*clip, "--device", "cpu", "--encoder", library.encoder.name]) as client:
        wait_ready(client)
        response = client.post("/v1/segment", files={"file": ("photo.png", path.read_bytes(), "image/png")},
                               data={"labels": ",".join(labels)})  # fmt: skip
        assert response.status_code == 200, response.text
        by_service = label_map_from_png(base64.b64decode(response.json()["labels_png"]), len(labels))
        info = client.get("/v1/info").json()

    assert np.array_equal(by_cli, by_predict) and np.array_equal(by_service, by_predict)
    assert info["defaults"]["templates"] == library.defaults.templates
    if model == "demo":  # the model's own defaults were used: synthetic templates, background below 0.95
        assert library.defaults.templates == "synthetic" and info["defaults"]["background_threshold"] == 0.95
        assert (by_predict == -1).any() and (by_predict >= 0).any()
        plain = library.predict(str(path), labels, templates="imagenet", background_threshold=0.0).labels
        assert (plain != by_predict).mean() > 0.2  # what a door with other defaults answered
    else:
        assert library.defaults.templates == "imagenet" and library.defaults.background_threshold is None


def test_predict_options_left_out_are_the_models_and_zero_turns_the_threshold_off():
    demo = Segmenter("demo", device="cpu", dtype=None, encoder="torch")
    images = [render_scene(i, seed=100).image for i in range(3)]
    given = demo.predict(images, CLASS_NAMES, templates="synthetic", background_threshold=DEMO_BACKGROUND_THRESHOLD)
    for named, left_out in zip(given, demo.predict(images, CLASS_NAMES)):
        assert np.array_equal(named.labels, left_out.labels)
    unthresholded = demo.predict(images, CLASS_NAMES, background_threshold=0.0)
    assert all((r.labels >= 0).all() for r in unthresholded)
    assert any((r.labels == -1).any() for r in given)
    embedded = demo.encode_labels(["circle"])  # templates left out: the model's, as predict uses them
    assert torch.equal(embedded, demo.encode_labels(["circle"], "synthetic"))
    assert not torch.allclose(embedded, demo.encode_labels(["circle"], "imagenet"))


# ------------------------------------------------------------------------------------ where they come from


def test_the_demo_weights_record_their_defaults():
    """The demo's page painted background as shapes: its weights now record the measured threshold."""
    _, metadata = read_pacl_weights(DEMO_PACL)
    assert metadata.extra["defaults"] == {"templates": "synthetic", "background_threshold": DEMO_BACKGROUND_THRESHOLD}
    defaults = Segmenter("demo", device="cpu", dtype=None, encoder="torch").defaults
    assert (defaults.templates, defaults.background_threshold, defaults.image_size) == ("synthetic", 0.95, 64)
    assert defaults.sliding_window is None and "weights' metadata" in defaults.source


def test_defaults_come_from_the_weights_then_the_training_data_then_the_method(tmp_path, tiny_clip):
    weights = write_tiny_pacl(tiny_clip, tmp_path / "pacl.safetensors")
    clip = f"local-dir:{tiny_clip}"
    plain = quiet_segmenter(clip, pacl_weights=weights, dtype=None, encoder="torch")
    assert (plain.defaults.templates, plain.defaults.background_threshold) == ("imagenet", None)
    assert plain.image_size == plain.defaults.image_size == 64 and plain.defaults.sliding_window is None
    assert plain.defaults.logit_scale == pytest.approx(float(plain.model.logit_scale.detach()))

    tensors, metadata = read_pacl_weights(weights)  # weights of the synthetic world that record nothing (older)
    from safetensors.torch import save

    from pacl_fast.files import atomic_write

    metadata.training_data = "synthetic world seed 0"
    atomic_write(tmp_path / "older.safetensors", save(tensors, metadata=metadata.to_header()))
    older = quiet_segmenter(clip, pacl_weights=tmp_path / "older.safetensors", dtype=None, encoder="torch")
    assert older.defaults.templates == "synthetic" and "synthetic world" in older.defaults.source

    record_defaults(weights, templates="short", background_threshold=0.4, image_size=48, sliding_window=[32, 16, 56])
    recorded = quiet_segmenter(clip, pacl_weights=weights, dtype=None, encoder="torch")
    defaults = recorded.defaults
    assert (defaults.templates, defaults.background_threshold, defaults.image_size) == ("short", 0.4, 48)
    assert defaults.sliding_window == SlidingWindow(32, 16, 56) and recorded.image_size == 48
    assert "templates=short, background_threshold=0.4, sliding_window=32,16,56" in repr(recorded)
    image = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    named = recorded.predict(image, ["cat", "dog"], templates="short", background_threshold=0.4,
                             sliding_window=SlidingWindow(32, 16, 56))  # fmt: skip
    left_out = recorded.predict(image, ["cat", "dog"])
    assert np.array_equal(named.labels, left_out.labels) and np.array_equal(named.scores, left_out.scores)
    whole = recorded.predict(image, ["cat", "dog"], sliding_window=False, background_threshold=0.0)
    assert not np.array_equal(whole.scores, left_out.scores)  # False: no window, whatever the model's

    naclip = quiet_segmenter(clip, method="naclip", dtype=None, encoder="torch")
    assert (naclip.defaults.templates, naclip.defaults.background_threshold) == ("imagenet", None)
    assert naclip.defaults.logit_scale == pytest.approx(float(naclip.model.logit_scale.detach()))
    assert naclip.defaults.source == "the method's (naclip)"


@pytest.mark.parametrize(
    ("entry", "said"),
    [
        ("not an object", "extra.defaults must be a JSON object"),
        ({"templates": "imagenet", "colour": "red"}, "unknown entries ['colour']"),
        ({"background_threshold": 1.5}, "extra.defaults.background_threshold must be a probability"),
        ({"background_threshold": True}, "extra.defaults.background_threshold must be a probability"),
        ({"templates": "poems"}, "extra.defaults.templates must be one of imagenet"),
        ({"templates": ["no placeholder"]}, "extra.defaults.templates"),
        ({"templates": []}, "extra.defaults.templates must be a preset name or a list of 1..1000"),
        ({"image_size": 1e9}, "extra.defaults.image_size must be a number of pixels"),
        ({"sliding_window": [0, 8]}, "extra.defaults.sliding_window must be a number of pixels"),
        ({"sliding_window": [16, 32]}, "extra.defaults.sliding_window SlidingWindow stride 32 > crop 16"),
    ],
)
def test_bad_recorded_defaults_are_refused_naming_the_file_before_the_clip_loads(entry, said, tmp_path, tiny_clip):
    """A weights file is hostile until checked: a bad defaults entry is one ValueError naming the file and the
    entry, raised before the CLIP loads (here a CLIP name that does not exist is never reached)."""
    weights = write_tiny_pacl(tiny_clip, tmp_path / "pacl.safetensors")
    tensors, metadata = read_pacl_weights(weights)
    metadata.extra = {**metadata.extra, "defaults": entry}
    from safetensors.torch import save

    weights.write_bytes(save(tensors, metadata=metadata.to_header()))
    with pytest.raises(ValueError) as error:
        build_model("No-Such-CLIP", pacl_weights=weights, device="cpu")
    assert str(weights) in str(error.value) and said in str(error.value), str(error.value)
    with pytest.raises(ValueError, match="extra.defaults"):
        recorded_defaults(metadata, weights)


def test_record_defaults_keeps_every_tensor_and_refuses_what_would_not_read(tmp_path, tiny_clip):
    weights = write_tiny_pacl(tiny_clip, tmp_path / "pacl.safetensors")
    before, _ = read_pacl_weights(weights)
    record_defaults(weights, background_threshold=0.7)
    after, metadata = read_pacl_weights(weights)
    assert metadata.extra["defaults"] == {"background_threshold": 0.7}
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="background_threshold must be a probability"):
        record_defaults(weights, background_threshold=7)
    assert read_pacl_weights(weights)[1].extra["defaults"] == {"background_threshold": 0.7}  # left as it was


def test_training_records_the_defaults_of_its_data(tmp_path, tiny_clip):
    """``train/`` writes what the data it trained on implies (the synthetic world's templates) into the weights."""
    from dataclasses import replace

    from train.config import TrainConfig
    from train.stages import PaclStage

    assert training_defaults("synthetic") == {"templates": "synthetic"} and training_defaults("csv") == {}
    config = TrainConfig(stage="pacl", out=tmp_path, clip=f"local-dir:{tiny_clip}", steps=1)
    for data, expected in (("synthetic", {"templates": "synthetic"}), ("csv", {})):
        trained = replace(config, data=data, train_data="pairs.csv")
        PaclStage(trained, torch.device("cpu")).export(trained, world_size=1)
        assert read_pacl_weights(tmp_path / "pacl.safetensors")[1].extra["defaults"] == expected, data
    built = quiet_segmenter(f"local-dir:{tiny_clip}", pacl_weights=tmp_path / "pacl.safetensors", dtype=None,
                            encoder="torch")  # fmt: skip
    assert built.defaults.templates == "imagenet"  # csv: nothing recorded, nothing derived


# ------------------------------------------------------------------------------------ eval's door


def test_eval_applies_the_models_threshold_only_where_background_is_a_class(tmp_path, capsys, own_cache):
    """``eval`` on the synthetic world (background ignored by the metric) keeps every pixel scored: the demo
    model's threshold would only turn right pixels into unscored ones (the library refuses a threshold there).
    On a dataset with a background class (voc21) the threshold is the model's unless given; 0 turns it off."""
    from layouts import write_voc

    masks = {f"im{i}": np.where(np.arange(40 * 48).reshape(40, 48) % 7 < 3, 0, 15).astype(np.uint8) for i in range(2)}
    write_voc(tmp_path / "data", masks)

    def ran(*argv: str) -> dict:
        out = tmp_path / "r.json"
        assert main(["eval", *argv, "--workers", "0", "--clip", "demo", "--device", "cpu", "--restart",
                     "--state-dir", str(tmp_path / "state"), "--json", str(out)]) == 0  # fmt: skip
        capsys.readouterr()
        return json.loads(out.read_text())["options"]

    assert ran("--dataset", "synthetic", "--limit", "2")["background_threshold"] is None
    voc = ["--dataset", "voc21", "--root", str(tmp_path / "data")]
    assert ran(*voc)["background_threshold"] == DEMO_BACKGROUND_THRESHOLD
    assert ran(*voc, "--background-threshold", "0.5")["background_threshold"] == 0.5
    assert ran(*voc, "--background-threshold", "0")["background_threshold"] is None


# ------------------------------------------------------------------------------------ names and identity


def test_models_have_names_that_say_something(tmp_path, tiny_clip):
    weights = tmp_path / "laion-vit-b-16.safetensors"
    weights.write_bytes(b"")
    assert display_name("demo", None) == "demo"
    assert display_name("ViT-B-16", "openai") == "ViT-B-16@openai"
    assert display_name("ViT-B-16", str(weights)) == "ViT-B-16@laion-vit-b-16.safetensors"
    assert display_name("ViT-B-16", None) == "ViT-B-16@random"
    assert display_name(f"local-dir:{tiny_clip}/", None) == "local-dir:tiny-clip"
    assert display_name({"embed_dim": 64}, None).startswith("custom-")

    demo = Segmenter("demo", device="cpu", dtype=None, encoder="torch")
    assert demo.name == "demo" and "clip=demo," in repr(demo) and "sha256" not in repr(demo)
    assert demo.identity.startswith("custom-") and "@sha256:" in demo.identity  # kept for operators
    parts_model, _ = build_model("demo", device="cpu")
    rebuilt = Segmenter(parts_model, encoder="torch", dtype=None)  # the parts carry their name and defaults
    assert rebuilt.name == "demo" and rebuilt.defaults == demo.defaults and rebuilt.model_id == demo.model_id
    with TestClient(create_app(demo)) as client:
        wait_ready(client)
        info = client.get("/v1/info").json()
    assert (info["model"], info["identity"], info["choices"]) == ("demo", demo.identity, demo.choices)
    assert info["segmenter"] == repr(demo) and info["precision"] == "fp32" and info["encoder"] == "torch"


# ------------------------------------------------------------------------------------ issue 21


def test_the_logit_scale_is_read_once_when_the_segmenter_is_built(tiny_config):
    """It was ``float(model.logit_scale)`` on every batch: a host-device sync on CUDA. The model is frozen."""
    from helpers import make_segmenter

    segmenter = make_segmenter(tiny_config)
    read = segmenter.logit_scale
    assert isinstance(read, float) and read == pytest.approx(float(segmenter.model.logit_scale.detach()))
    with torch.no_grad():
        segmenter.model.log_logit_scale.add_(1.0)  # were it read per batch, predictions would follow this
    assert segmenter.logit_scale == read


def test_model_id_records_the_precision_the_encoder_computes_in(tiny_config, tmp_path):
    """OpenVINO fp32 and bf16 runs take float32 inputs alike: their ids recorded the same ``torch.float32``."""
    from helpers import make_segmenter, skip_unavailable

    from pacl_fast.encoders import EncoderUnavailableError

    fp32 = make_segmenter(tiny_config)
    assert fp32.model_id.endswith("|fp32")
    ids = {}
    for precision in ("fp32", "bf16"):
        try:
            segmenter = make_segmenter(tiny_config, encoder="openvino",
                                       encoder_options={"cache_dir": tmp_path, "precision": precision})  # fmt: skip
        except EncoderUnavailableError as error:
            skip_unavailable("openvino", error)
        ids[precision] = segmenter.model_id
        assert segmenter.model_id.endswith(f"|{precision}") and segmenter.precision == precision
    assert ids["fp32"] != ids["bf16"]


def test_every_door_accepts_every_template_preset(tiny_config):
    """``predict(templates="synthetic")`` was refused while the service offered that preset (issue 19 item 4):
    the library, the command line's early check and the service take each preset of ``choices.TEMPLATE_PRESETS``,
    and each names the same templates."""
    from helpers import make_segmenter

    from pacl_fast.choices import TEMPLATE_PRESETS
    from pacl_fast.cli.common import check_text
    from pacl_fast.prompts import template_set
    from pacl_fast.serve.inputs import parse_segment_options
    from pacl_fast.serve.settings import ServeSettings

    segmenter = make_segmenter(tiny_config)
    image = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    for preset in TEMPLATE_PRESETS:
        check_text(["cat"], preset)  # no UsageError
        asked = parse_segment_options({"labels": ["cat,dog"], "templates": [preset]}, ServeSettings(), segmenter)
        assert asked.templates == preset
        by_name = segmenter.encode_labels(["cat"], preset)
        assert torch.equal(by_name, segmenter.encode_labels(["cat"], template_set(preset)))
        assert segmenter.predict(image, ["cat", "dog"], templates=preset).labels.shape == (24, 40)
