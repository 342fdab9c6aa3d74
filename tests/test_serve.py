"""``pacl-fast serve``: the API through FastAPI's test client, and one real uvicorn process.

Expected outputs come from ``Segmenter.predict`` on the same image and labels (the engine's
user-level door), shares from counting its label map, overlays from ``Segmentation.overlay``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import io
import math
import os
import re
import select
import signal
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from helpers import make_segmenter, wait_ready
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from pacl_fast.cli.serve import add_parser as add_serve_parser
from pacl_fast.cli.serve import resolve_model_options, settings_from_args
from pacl_fast.cli.serve import run as run_serve
from pacl_fast.images import SlidingWindow
from pacl_fast.serve.app import create_app, label_map_from_png
from pacl_fast.serve.batcher import Batcher, NotReady
from pacl_fast.serve.errors import ApiError
from pacl_fast.serve.inputs import MULTIPART_OVERHEAD, SEGMENT_OPTIONS, SegmentOptions, parse_segment_options
from pacl_fast.serve.jobs import SegmentKey, admit
from pacl_fast.serve.local import LocalServer, free_port
from pacl_fast.serve.metrics import ServeMetrics
from pacl_fast.serve.settings import ServeSettings

LABELS = ("circle", "square", "sky")
SETTINGS = ServeSettings(
    max_batch=8,
    max_wait_ms=20,
    max_queue=16,
    max_image_bytes=300_000,
    max_pixels=1_000_000,
    max_labels=8,
    timeout=30,
    templates="single",
)


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def random_image(seed: int, height: int, width: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def post_image(client, image: bytes, labels=LABELS, accept: str = "application/json", **options):
    data = {"labels": ",".join(labels) if isinstance(labels, (tuple, list)) else labels, **options}
    return client.post(
        "/v1/segment", files={"file": ("image.png", image, "image/png")}, data=data, headers={"Accept": accept}
    )


def labels_of(body: dict) -> np.ndarray:
    return label_map_from_png(base64.b64decode(body["labels_png"]), len(body["classes"]))


def metric_samples(text: str) -> dict[tuple[str, tuple], float]:
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


@pytest.fixture(scope="module")
def client(segmenter):
    app = create_app(segmenter, SETTINGS)
    with TestClient(app) as client:
        wait_ready(client)
        yield client


# ----------------------------------------------------------------------------- page, health, info


def test_page_health_info_and_docs(client, segmenter):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp
    assets = [page.text] + [client.get(f"/static/{name}").text for name in ("app.js", "style.css")]
    for text in assets:
        assert text  # served
        # no CDN: nothing is fetched from another origin (links to this server's /docs are relative)
        assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", text), "the page loads from another origin"
        assert not re.search(r"(fetch|import|url)\s*\(\s*[\"']?(https?:)?//", text)
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
    info = client.get("/v1/info").json()
    assert info["method"] == segmenter.method == "pacl"
    assert info["model"] == segmenter.name and info["defaults"]["templates"] == SETTINGS.templates
    assert (info["image_size"], info["patch_size"]) == (segmenter.image_size, segmenter.patch_size)
    assert info["limits"]["max_labels"] == SETTINGS.max_labels
    from pacl_fast.data.segmentation import VOC_CLASSES
    from pacl_fast.data.synthetic import CLASS_NAMES

    assert info["label_presets"]["shapes"] == list(CLASS_NAMES)
    assert "aeroplane" in info["label_presets"]["voc"] and "background" not in info["label_presets"]["voc"]
    assert len(info["label_presets"]["voc"]) == len(VOC_CLASSES) - 1
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/v1/segment"]["post"]["requestBody"]["content"]
    assert body["multipart/form-data"]["schema"]["properties"]["file"]["format"] == "binary"
    assert "/v1/embed-labels" in schema["paths"]
    assert client.get("/docs").status_code == 200


# ----------------------------------------------------------------------------- answers equal predict


def test_segment_json_equals_predict(client, segmenter):
    image = random_image(0, 37, 53)  # odd, non-square
    response = post_image(client, png(image), with_scores="true")
    assert response.status_code == 200, response.text
    body = response.json()
    expected = segmenter.predict(image, LABELS, templates="single")
    labels = labels_of(body)
    assert labels.dtype == np.int16 and labels.shape == (37, 53) == (body["height"], body["width"])
    assert np.array_equal(labels, expected.labels)
    scores = np.load(io.BytesIO(base64.b64decode(body["scores_npy"])), allow_pickle=False)
    assert scores.dtype == np.float32 and np.array_equal(scores, expected.scores)
    counts = np.array([(expected.labels == c).sum() for c in range(len(LABELS))])
    assert body["classes"] == list(LABELS)
    np.testing.assert_allclose(body["shares"], counts / expected.labels.size)
    assert body["background_share"] == 0.0
    label_png = Image.open(io.BytesIO(base64.b64decode(body["labels_png"])))
    assert label_png.mode == "P"
    colours = np.asarray(label_png.convert("RGB"))
    for c, colour in enumerate(body["palette"]):  # the palette in the JSON is the PNG's
        assert (colours[expected.labels == c] == colour).all()


def test_raw_body_with_query_options_and_background(client, segmenter):
    image = random_image(1, 61, 29)
    plain = segmenter.predict(image, LABELS, templates="single")
    threshold = float(np.quantile(plain.scores, 0.5))  # half of the pixels fall under it
    response = client.post(
        "/v1/segment",
        params={
            "labels": '["circle", "square", "sky"]',
            "background_threshold": repr(threshold),
            "templates": "single",
        },
        content=png(image),
        headers={"Content-Type": "image/png"},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    expected = segmenter.predict(image, LABELS, templates="single", background_threshold=threshold)
    assert (expected.labels == -1).any() and (expected.labels >= 0).any()  # the threshold bites here
    assert np.array_equal(labels_of(body), expected.labels)
    assert body["background_share"] == pytest.approx((expected.labels == -1).mean())
    assert body["scores_npy"] is None


def test_options_left_out_are_the_models_defaults_and_info_says_them(tiny_config, tmp_path):
    """One default, every door (issue 19 item 4): a request naming no templates, threshold or window gets the
    model's (what its weights record), as predict does; ``background_threshold=0`` and ``sliding_window=false``
    turn them off; ``/v1/info`` says them (the page starts its controls from there) and what runs, and why."""
    from layouts import write_tiny_clip, write_tiny_pacl

    from pacl_fast.defaults import record_defaults

    clip = write_tiny_clip(tmp_path / "clip", tiny_config)
    weights = write_tiny_pacl(clip, tmp_path / "pacl.safetensors")
    segmenter = make_segmenter(f"local-dir:{clip}", pacl_weights=weights)
    image = random_image(5, 40, 56)
    threshold = float(np.quantile(segmenter.predict(image, LABELS, templates="short").scores, 0.5))
    record_defaults(weights, templates="short", background_threshold=threshold, sliding_window=[32, 16, 48])
    segmenter = make_segmenter(f"local-dir:{clip}", pacl_weights=weights)
    expected = segmenter.predict(image, LABELS)
    assert (expected.labels == -1).any() and (expected.labels >= 0).any()  # the recorded threshold bites
    with TestClient(create_app(segmenter, ServeSettings(timeout=30))) as client:
        wait_ready(client)
        info = client.get("/v1/info").json()
        left_out = post_image(client, png(image))
        off = post_image(client, png(image), background_threshold="0", sliding_window="false")
        embedded = client.post("/v1/embed-labels", json={"labels": list(LABELS)})
    source = "weights' metadata (templates, background_threshold, sliding_window)"
    assert info["defaults"] == {"templates": "short", "background_threshold": threshold, "image_size": 64,
                                "sliding_window": [32, 16, 48], "logit_scale": segmenter.logit_scale,
                                "source": source}  # fmt: skip
    assert info["default_templates"] == "short" and info["default_sliding_window"] == "32,16,48"
    assert info["choices"] == segmenter.choices == "encoder=torch fp32 (as given)"
    assert info["model"] == "local-dir:clip" and info["identity"] == segmenter.identity != info["model"]
    assert left_out.status_code == off.status_code == 200, (left_out.text, off.text)
    assert np.array_equal(labels_of(left_out.json()), expected.labels) and left_out.json()["templates"] == "short"
    unset = segmenter.predict(image, LABELS, background_threshold=0.0, sliding_window=False)
    assert np.array_equal(labels_of(off.json()), unset.labels) and (unset.labels >= 0).all()
    assert embedded.json()["templates"] == "short"


def test_accept_png_answers_the_overlay(client, segmenter):
    image = random_image(2, 45, 70)
    response = post_image(client, png(image), accept="image/png")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    overlay = np.asarray(Image.open(io.BytesIO(response.content)))
    expected = segmenter.predict(image, LABELS, templates="single").overlay()
    assert np.array_equal(overlay, np.asarray(expected))


def test_sliding_window_equals_predict(client, segmenter):
    image = random_image(3, 50, 90)
    response = post_image(client, png(image), sliding_window="32,16,80")
    assert response.status_code == 200, response.text
    expected = segmenter.predict(image, LABELS, templates="single", sliding_window=SlidingWindow(32, 16, 80))
    assert np.array_equal(labels_of(response.json()), expected.labels)


def test_concurrent_requests_batch_and_equal_predict(client, segmenter):
    """Requests queued while the worker is held run together, grouped by options and canvas size."""
    other = ("dog", "grass")
    specs = [  # (image, labels): three share labels and canvas size, so they batch together
        (random_image(10, 40, 64), LABELS),
        (random_image(11, 40, 64), LABELS),
        (random_image(12, 40, 64), LABELS),
        (random_image(13, 64, 40), LABELS),  # other canvas
        (random_image(14, 40, 64), other),  # other labels
        (random_image(15, 40, 64), other),
    ]
    batcher = client.app.state.batcher
    with ThreadPoolExecutor(len(specs)) as pool:
        with batcher.hold():
            futures = [pool.submit(post_image, client, png(image), labels) for image, labels in specs]
            wait_for(lambda: batcher.queued == len(specs))
        responses = [future.result() for future in futures]
    for (image, labels), response in zip(specs, responses):
        assert response.status_code == 200, response.text
        expected = segmenter.predict(image, labels, templates="single")
        assert np.array_equal(labels_of(response.json()), expected.labels)
    assert [r.json()["batch_size"] for r in responses] == [3, 3, 3, 1, 2, 2]


#: Two values of every option of POST /v1/segment (as sent): requests differing in one never share a batch.
OPTION_VARIANTS = {
    "labels": ("circle,square,sky", "circle,square,grass"),
    "templates": ("single", "short"),
    "background_threshold": ("0.3", "0.6"),
    "sliding_window": ("32,16,64", "32,32,64"),
    "with_scores": ("false", "true"),
}


def options_from(fields: dict[str, str], segmenter) -> SegmentOptions:
    values = {name: [value] for name, value in fields.items()}
    return parse_segment_options(values, SETTINGS, segmenter)


def test_the_batch_key_is_made_of_every_option(segmenter):
    """The table above covers every option field (a new option fails here until it is added), and the key of
    two option sets differing in any one field differs."""
    assert set(OPTION_VARIANTS) == {spec.name for spec in dataclasses.fields(SegmentOptions)} == set(SEGMENT_OPTIONS)
    canvas = (3, 64, 64)
    for option, (first, second) in OPTION_VARIANTS.items():
        a = options_from({"labels": "circle,square,sky", option: first}, segmenter)
        b = options_from({"labels": "circle,square,sky", option: second}, segmenter)
        assert getattr(a, option) != getattr(b, option)
        assert SegmentKey.of(a, canvas) != SegmentKey.of(b, canvas), option
        assert SegmentKey.of(a, canvas) == SegmentKey.of(dataclasses.replace(a), canvas)
    assert SegmentKey.of(a, canvas) != SegmentKey.of(a, (3, 64, 96))


@pytest.mark.parametrize("option", list(OPTION_VARIANTS))
def test_requests_differing_in_one_option_never_share_a_batch(client, segmenter, option):
    """Three requests queued together, the second differing from the others in ``option`` only: it runs alone,
    the other two together, and each answer equals predict with its own options."""
    first, second = OPTION_VARIANTS[option]
    base = {"labels": "circle,square,sky", "templates": "single"}
    asked = [{**base, option: first}, {**base, option: second}, {**base, option: first}]
    images = [random_image(40 + i, 40, 64) for i in range(3)]  # one canvas size
    batcher = client.app.state.batcher
    with ThreadPoolExecutor(3) as pool:
        with batcher.hold():
            futures = [
                pool.submit(post_image, client, png(image), fields.pop("labels").split(","), **fields)
                for image, fields in zip(images, [dict(a) for a in asked])
            ]
            wait_for(lambda: batcher.queued == 3)
        responses = [future.result() for future in futures]
    for image, fields, response in zip(images, asked, responses):
        assert response.status_code == 200, response.text
        options = options_from(fields, segmenter)
        window = SlidingWindow(*options.sliding_window) if options.sliding_window else None
        expected = segmenter.predict(
            image, options.labels, templates=options.templates, sliding_window=window,
            background_threshold=options.background_threshold,
        )  # fmt: skip
        assert np.array_equal(labels_of(response.json()), expected.labels), option
    assert [r.json()["batch_size"] for r in responses] == [2, 1, 2]


# ----------------------------------------------------------------------------- bad input


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` (a decompression bomb's shape) with a tiny body."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


GOOD = png(random_image(20, 32, 48))
BIG = png(np.zeros((1000, 1001), np.uint8))  # 1,001,000 pixels, a few kB


def multipart(fields: list[tuple[str, tuple | str]]) -> dict:
    return {"files": [(name, value) for name, value in fields]}


BAD_REQUESTS = {
    "not an image": (dict(content=b"hello, world", params={"labels": "a"}), 422, "not an image"),
    "a path instead of an image": (dict(content=b"/etc/passwd", params={"labels": "a"}), 422, "not an image"),
    "truncated png": (dict(content=GOOD[: len(GOOD) // 2], params={"labels": "a"}), 422, "cannot decode"),
    "truncated jpeg": (dict(content=jpeg(random_image(21, 64, 64))[:-300], params={"labels": "a"}), 422, "truncated"),
    "decompression bomb": (dict(content=png_header_only(100_000, 100_000), params={"labels": "a"}), 413, "bomb"),
    "too many pixels": (dict(content=BIG, params={"labels": "a"}), 413, "over the limit of 1000000"),
    "too many bytes": (dict(content=b"\0" * 300_001, params={"labels": "a"}), 413, "body has 300001 bytes, over"),
    "too many bytes, streamed": (
        dict(content=[b"\0" * 200_000] * 2, params={"labels": "a"}),
        413,
        "body is over the limit of 300000 bytes",
    ),  # fmt: skip
    "image over the limit in a form": (
        multipart([("file", ("a.png", b"\0" * 300_001)), ("labels", (None, "a"))]),
        413,
        "image has 300001 bytes, over the limit of 300000",
    ),  # fmt: skip
    "unsupported format": (dict(content=b"P6\n4 4\n255\n" + bytes(48), params={"labels": "a"}), 422, "supported"),
    "too many labels": (dict(params={"labels": ",".join("abcdefghi")}), 422, "9 labels, over the limit of 8"),
    "empty labels": (dict(params={"labels": ""}), 422, "labels is empty"),
    "blank label": (dict(params={"labels": "a, ,b"}), 422, "empty name"),
    "duplicate labels": (dict(params={"labels": "a,b,a"}), 422, "duplicates: ['a']"),
    "labels missing": (dict(params={}), 422, "labels are missing"),
    "labels bad json": (dict(params={"labels": "[1, 2]"}), 422, "JSON list of strings"),
    "unknown option": (dict(params={"labels": "a", "colour": "red"}), 422, "unknown option(s) ['colour']"),
    "repeated option": (dict(params=[("labels", "a"), ("labels", "b")]), 422, "more than once: ['labels']"),
    "threshold over 1": (dict(params={"labels": "a", "background_threshold": "1.5"}), 422, "background_threshold"),
    "threshold not a number": (dict(params={"labels": "a", "background_threshold": "x"}), 422, "[0, 1]"),
    "unknown templates": (dict(params={"labels": "a", "templates": "poems"}), 422, "templates must be one of"),
    "window off the patch grid": (dict(params={"labels": "a", "sliding_window": "36,12"}), 422, "multiples"),
    "window stride over crop": (dict(params={"labels": "a", "sliding_window": "16,32"}), 422, "STRIDE <= CROP"),
    "window too large": (dict(params={"labels": "a", "sliding_window": "512,256"}), 422, "CROP <= 256"),
    "window garbage": (dict(params={"labels": "a", "sliding_window": "big"}), 422, "CROP,STRIDE"),
    "too many windows": (dict(params={"labels": "a", "sliding_window": "8,8,256"}), 422, "windows, over the limit"),
    "with_scores not a boolean": (dict(params={"labels": "a", "with_scores": "maybe"}), 422, "true or false"),
    "json body": (dict(json={"labels": "a"}), 415, "multipart/form-data"),
    "no file field": (multipart([("labels", (None, "a"))]), 422, "no image"),
    "two files": (
        multipart([("file", ("a.png", GOOD)), ("file", ("b.png", GOOD)), ("labels", (None, "a"))]),
        400,
        "appears twice",
    ),  # fmt: skip
    "unknown form field": (
        multipart([("file", ("a.png", GOOD)), ("labels", (None, "a")), ("x", (None, "1"))]),
        422,
        "unknown option(s) ['x']",
    ),  # fmt: skip
    "option in form and query": (
        dict(params={"labels": "a"}, **multipart([("file", ("a.png", GOOD)), ("labels", (None, "b"))])),
        422,
        "both in the query and in the form",
    ),
    "path in the file field": (
        multipart([("file", (None, "/etc/passwd")), ("labels", (None, "a"))]),
        422,
        "not an image",
    ),  # fmt: skip
    "a 1x100 strip (scaled up to a 64x6400 canvas)": (
        dict(content=png(np.zeros((1, 100), np.uint8)), params={"labels": "a"}),
        422,
        "long side is over 16 times its short side",
    ),
    "an option field of 70 kB": (
        multipart([("file", ("a.png", GOOD)), ("labels", (None, "a," * 35_000))]),
        413,
        "an option field is over 65536 bytes",
    ),  # fmt: skip
    "labels nested past the JSON parser's depth": (dict(params={"labels": "[" * 3000}), 422, "look like JSON"),
    "10,000 labels, counted before any is read": (
        dict(params={"labels": ",".join(["x"] * 10_000)}),
        422,
        "10000 labels",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_is_a_4xx_naming_the_problem(client, case):
    request, status, message = BAD_REQUESTS[case]
    request = dict(request)
    headers = {}
    if "content" in request:
        headers["Content-Type"] = "image/png"
    elif "files" not in request and "json" not in request:
        request["content"], headers["Content-Type"] = GOOD, "image/png"
    response = client.post("/v1/segment", headers=headers, **request)
    assert response.status_code == status, response.text
    body = response.json()
    assert message in body["detail"], body
    assert "root:" not in response.text  # nothing of /etc/passwd ever comes back


def test_multipart_bodies_and_fields_are_bounded(client):
    limit = SETTINGS.max_image_bytes + MULTIPART_OVERHEAD
    response = client.post(
        "/v1/segment", content=b"-" * (limit + 1), headers={"Content-Type": "multipart/form-data; boundary=x"}
    )
    assert response.status_code == 413 and f"body has {limit + 1} bytes" in response.json()["detail"]
    fields = [("file", ("a.png", GOOD)), *[(f"o{i}", (None, "1")) for i in range(16)]]  # 17 parts
    response = client.post("/v1/segment", files=fields)
    assert response.status_code == 400 and "more than 16 multipart fields" in response.json()["detail"]


@pytest.mark.parametrize(
    "accept, png_answer",
    [
        (None, False),
        ("application/json", False),
        ("image/png", True),
        ("image/png, application/json", True),
        ("application/json, image/png", False),
        ("text/html, image/png;q=0.9", True),
    ],
)
def test_accept_chooses_the_overlay_or_json(client, accept, png_answer):
    headers = {"Content-Type": "image/png"} | ({"Accept": accept} if accept else {})
    response = client.post("/v1/segment", params={"labels": "a,b"}, content=GOOD, headers=headers)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("image/png" if png_answer else "application/json")


def test_bad_input_leaves_the_service_serving(client, segmenter):
    for request, _, _ in list(BAD_REQUESTS.values())[:6]:
        client.post("/v1/segment", headers={"Content-Type": "image/png"}, **request)
    assert client.post("/nowhere").json()["error"] == "not_found"
    assert client.get("/v1/segment").status_code == 405
    image = random_image(22, 33, 47)
    response = post_image(client, png(image))
    assert response.status_code == 200
    assert np.array_equal(labels_of(response.json()), segmenter.predict(image, LABELS, templates="single").labels)
    samples = metric_samples(client.get("/metrics").text)
    server_errors = [v for (name, labels), v in samples.items() if name == "pacl_serve_errors_total" and
                     dict(labels)["code"].startswith("5")]  # fmt: skip
    assert not server_errors, "a bad input became a 5xx"


@pytest.mark.parametrize(
    "body, message",
    [
        ({"labels": []}, "labels is empty"),
        ({"labels": ["a", "a"]}, "duplicates"),
        ({"labels": "a,b", "extra": 1}, "extra: Extra inputs are not permitted"),
        ({"labels": "a", "templates": "sonnets"}, "templates must be one of"),
        ({}, "labels: Field required"),
    ],
)
def test_embed_labels_bad_input(client, body, message):
    response = client.post("/v1/embed-labels", json=body)
    assert response.status_code == 422 and message in response.json()["detail"], response.text


def test_embed_labels_body_is_bounded_before_it_is_parsed(client):
    response = client.post("/v1/embed-labels", json={"labels": ["x" * 100] * 1000})  # ~100 kB
    assert response.status_code == 413 and "over the limit of 65536" in response.json()["detail"], response.text
    response = client.post("/v1/embed-labels", content=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and "Invalid JSON" in response.json()["detail"], response.text


MODEL_FAULTS = {
    "runtime error": RuntimeError("out of memory"),
    "value error": ValueError("odd"),
    "type error": TypeError("expected a tensor"),
    "a path in the message": OSError(30, "Read-only file system", "/srv/pacl-cache/onnx/3f2a/image-64x64.onnx"),
}


@pytest.mark.parametrize("case", list(MODEL_FAULTS))
def test_a_model_fault_is_a_5xx_that_names_no_server_file(client, segmenter, monkeypatch, caplog, case):
    """Whatever the model raises is the model's fault: a 500 "model_error", never a 4xx blaming the client
    (a ValueError used to be a 422) and never the exception's text, which may name server files; the log
    has the text under the request id the client gets (body and ``X-Request-ID``)."""
    error = MODEL_FAULTS[case]

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(segmenter.encoder, "encode_image", fail)
    with caplog.at_level("ERROR", logger="pacl_fast.serve"):
        response = post_image(client, png(random_image(23, 40, 56)))
    body = response.json()
    assert (response.status_code, body["error"]) == (500, "model_error"), response.text
    assert type(error).__name__ in body["detail"]
    for secret in (str(error), "/srv", "pacl-cache", "Read-only", "out of memory", "odd"):
        assert secret not in response.text, response.text
    request_id = response.headers["x-request-id"]
    assert body["request_id"] == request_id and request_id in body["detail"]
    logged = [record.getMessage() for record in caplog.records if request_id in record.getMessage()]
    assert any(str(error) in message for message in logged), caplog.text
    monkeypatch.undo()
    assert post_image(client, GOOD).status_code == 200


def test_an_unexpected_error_is_a_500_with_a_request_id_and_no_text(tiny_config, caplog):
    """An exception no handler maps (here from a route added to the app) is answered by the middleware."""
    app = create_app(make_segmenter(tiny_config), SETTINGS)

    async def broken() -> dict:
        raise KeyError("/srv/secret/config.json")

    app.add_api_route("/broken", broken)
    with TestClient(app) as client, caplog.at_level("ERROR", logger="pacl_fast.serve"):
        response = client.get("/broken")
    assert response.status_code == 500 and response.json()["error"] == "internal", response.text
    assert "/srv" not in response.text and "KeyError" in response.json()["detail"]
    request_id = response.headers["x-request-id"]
    assert response.json()["request_id"] == request_id
    assert any(request_id in r.getMessage() and "/srv/secret" in (r.exc_text or "") for r in caplog.records)


def test_embed_labels_fills_the_cache_that_segment_uses(client, segmenter):
    labels = ("violet", "indigo", "teal")
    width = segmenter.encode_labels(["x"], "single").shape[1]
    text = segmenter.text_embedder
    before = text.encoded_prompts  # prompts run through the text tower so far
    response = client.post("/v1/embed-labels", json={"labels": list(labels), "templates": "short"})
    assert response.status_code == 200, response.text
    assert response.json()["embedding_shape"] == [3, width]
    warmed = text.encoded_prompts
    assert warmed > before
    assert post_image(client, GOOD, labels, templates="short").status_code == 200
    assert text.encoded_prompts == warmed  # the segmentation found them cached


# ----------------------------------------------------------------------------- backpressure, timeouts, metrics


@pytest.fixture(scope="module")
def small_client(tiny_config):
    """A second app (own registry, own segmenter) with a queue of 2 and a 1.5 s timeout."""
    settings = ServeSettings(max_batch=4, max_wait_ms=1, max_queue=2, timeout=1.5, templates="single")
    with TestClient(create_app(make_segmenter(tiny_config), settings)) as client:
        wait_ready(client)
        yield client


def test_full_queue_answers_503_and_accepted_requests_complete(small_client, segmenter):
    batcher = small_client.app.state.batcher
    images = [random_image(30 + i, 40, 50) for i in range(2)]
    with ThreadPoolExecutor(2) as pool:
        with batcher.hold():
            futures = [pool.submit(post_image, small_client, png(image)) for image in images]
            wait_for(lambda: batcher.depth == 2)
            refused = post_image(small_client, GOOD)
            assert refused.status_code == 503, refused.text
            assert int(refused.headers["Retry-After"]) >= 1
            assert refused.json()["error"] == "queue_full"
            assert refused.headers["Connection"] == "close"  # its body was never read
        for image, future in zip(images, futures):
            response = future.result()
            assert response.status_code == 200, response.text
            assert np.array_equal(
                labels_of(response.json()), segmenter.predict(image, LABELS, templates="single").labels
            )


def test_timeout_answers_504_and_drops_the_work(small_client):
    batcher = small_client.app.state.batcher

    def batches_run() -> float:
        return metric_samples(small_client.get("/metrics").text)[("pacl_serve_batch_images_count", ())]

    before = batches_run()
    with batcher.hold():
        start = time.monotonic()
        response = post_image(small_client, GOOD)
        waited = time.monotonic() - start
        assert (batcher.queued, batcher.depth) == (0, 0)  # withdrawn from the queue, its place given back
    assert response.status_code == 504 and response.json()["error"] == "timeout", response.text
    assert 1.5 <= waited < 5
    after = post_image(small_client, GOOD)  # runs alone: the timed-out job is not in its batch
    assert after.status_code == 200 and after.json()["batch_size"] == 1
    assert batches_run() == before + 1
    samples = metric_samples(small_client.get("/metrics").text)
    assert samples[("pacl_serve_dropped_total", (("stage", "queued"),))] == 1


def test_metrics_text(client, small_client):
    """Every count moves by exactly the requests made here (so the test holds alone and after any other): five
    images in a batch of 3 then a batch of 2, three refused for their labels; the other app counts apart."""
    batcher = client.app.state.batcher

    def samples_of(app_client) -> dict[tuple[str, tuple], float]:
        return metric_samples(app_client.get("/metrics").text)

    before, small_before = samples_of(client), samples_of(small_client)

    def one_batch(images: list[np.ndarray]) -> None:
        """``images`` posted together while the worker is held: they run as one batch."""
        with ThreadPoolExecutor(len(images)) as pool:
            with batcher.hold():
                futures = [pool.submit(post_image, client, png(image)) for image in images]
                wait_for(lambda: batcher.queued == len(images))
            responses = [future.result() for future in futures]
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
        assert [r.json()["batch_size"] for r in responses] == [len(images)] * len(images)

    images = [random_image(40 + i, 40, 64) for i in range(5)]
    one_batch(images[:3])
    one_batch(images[3:])
    for labels in ("a,,b", "[1, 2", "circle,Circle"):  # an empty name, broken JSON, a duplicate to the tokenizer
        refused = post_image(client, GOOD, labels=labels)
        assert refused.status_code == 422 and refused.json()["error"] == "bad_labels", refused.text
    after = samples_of(client)

    def moved(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert moved("pacl_serve_requests_total", code="200", endpoint="/v1/segment") == 5
    assert moved("pacl_serve_requests_total", code="422", endpoint="/v1/segment") == 3
    assert moved("pacl_serve_errors_total", code="422", kind="bad_labels") == 3
    assert moved("pacl_serve_request_seconds_count", endpoint="/v1/segment") == 8  # answered, refused or not
    assert (moved("pacl_serve_batch_images_count"), moved("pacl_serve_batch_images_sum")) == (2, 5)
    assert moved("pacl_serve_batch_images_bucket", le="1.0") == 0
    assert moved("pacl_serve_batch_images_bucket", le="2.0") == 1  # the batch of 2, not the batch of 3
    assert moved("pacl_serve_batch_images_bucket", le="4.0") == 2
    assert moved("pacl_serve_batch_seconds_count") == 2 and moved("pacl_serve_queue_wait_seconds_count") == 5
    assert after[("pacl_serve_queue_depth", ())] == 0
    # each app counts its own requests (own registry): none of these reached the other app, and its one does not
    # reach this one
    ok = ("pacl_serve_requests_total", (("code", "200"), ("endpoint", "/v1/segment")))
    assert samples_of(small_client).get(ok, 0.0) == small_before.get(ok, 0.0)
    assert post_image(small_client, GOOD).status_code == 200
    assert samples_of(small_client)[ok] == small_before.get(ok, 0.0) + 1
    assert samples_of(client)[ok] == after[ok]


def test_loading_and_failed_models_are_not_ready(tiny_config):
    release = threading.Event()
    failures = []

    def slow_factory():
        release.wait(10)
        return make_segmenter(tiny_config)

    with TestClient(create_app(slow_factory, SETTINGS)) as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").json() == {"status": "loading"}
        with pytest.raises(NotReady, match="loading"):
            client.app.state.batcher.admit()
        refused = post_image(client, GOOD)
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "5"
        release.set()
        wait_ready(client)
        assert post_image(client, GOOD).status_code == 200

    def broken_factory():
        raise FileNotFoundError("no weights at /nowhere")

    with TestClient(create_app(broken_factory, SETTINGS, on_fatal=failures.append)) as client:
        wait_for(lambda: client.get("/readyz").json()["status"] == "failed")
        # The kind of failure, never its text (it names server files): that is in the server's log.
        detail = client.get("/readyz").json()["detail"]
        assert "FileNotFoundError" in detail and "/nowhere" not in detail, detail
    assert len(failures) == 1 and isinstance(failures[0], FileNotFoundError)


def assert_not_ready_alike(client, message: str) -> None:
    """Both doors of a not-ready model say ``message``: a route's model dependency (``deps.ready_model``, before a
    body is read: GET /v1/info, POST /v1/segment) and the queue's admission (``jobs.admit``, after it is read)."""
    batcher = client.app.state.batcher
    with pytest.raises(NotReady) as refusal:
        batcher.check_ready()
    assert str(refusal.value) == message
    with pytest.raises(ApiError) as admitted:
        admit(batcher)
    assert (admitted.value.status, admitted.value.kind, admitted.value.message) == (503, "not_ready", message)
    assert admitted.value.headers == {"Retry-After": "5"}
    for response, body_unread in ((client.get("/v1/info"), False), (post_image(client, GOOD), True)):
        assert response.status_code == 503, response.text
        assert (response.json()["error"], response.json()["detail"]) == ("not_ready", message)
        assert response.headers["Retry-After"] == "5"
        assert (response.headers.get("Connection") == "close") == body_unread  # a POST's body was never read


def test_not_ready_says_the_same_through_every_door(tiny_config):
    """One refusal (``Batcher.check_ready``) for the routes' model dependency and the queue's admission: the same
    503, kind and sentence while the model loads and after it failed."""
    release = threading.Event()

    def slow_factory():
        release.wait(10)
        return make_segmenter(tiny_config)

    with TestClient(create_app(slow_factory, SETTINGS)) as client:
        assert_not_ready_alike(client, "the model is loading")
        release.set()
        wait_ready(client)
        client.app.state.batcher.check_ready()  # ready: no refusal
        assert client.get("/v1/info").status_code == 200

    def broken_factory():
        raise FileNotFoundError("no weights at /nowhere")

    with TestClient(create_app(broken_factory, SETTINGS, on_fatal=lambda error: None)) as client:
        wait_for(lambda: client.get("/readyz").json()["status"] == "failed")
        assert_not_ready_alike(client, "the model is failed")


def test_a_stuck_worker_is_not_ready_and_refuses_at_once(tiny_config, tmp_path, monkeypatch, caplog):
    """A model call blocked reading a FIFO (a cache entry that is not a file): past the timeout the service
    says not ready (503 "stuck"), refuses new work at once instead of letting it time out, logs where the
    worker waits, and is ready again when the call returns."""
    segmenter = make_segmenter(tiny_config)
    settings = ServeSettings(max_batch=4, max_wait_ms=1, max_queue=4, timeout=1.0, templates="single")
    fifo = tmp_path / "text-cache-entry"
    os.mkfifo(fifo)
    encode = segmenter.encoder.encode_image

    def blocked_on_fifo(*args, **kwargs):
        with open(fifo, "rb") as entry:  # blocks until a writer opens it
            entry.read()
        return encode(*args, **kwargs)

    def unblock() -> None:
        with contextlib.suppress(OSError):  # ENXIO: nobody is reading it
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # the reader sees a writer come and go: EOF

    with TestClient(create_app(segmenter, settings)) as client:
        wait_ready(client)
        monkeypatch.setattr(segmenter.encoder, "encode_image", blocked_on_fifo)
        try:
            assert post_image(client, GOOD).status_code == 504
            with caplog.at_level("ERROR", logger="pacl_fast.serve"):
                wait_for(lambda: client.get("/readyz").status_code == 503, timeout=10)
                ready = client.get("/readyz").json()
            assert ready["status"] == "stuck" and "over the 1 s bound" in ready["detail"], ready
            assert "blocked_on_fifo" in caplog.text  # the worker's stack, logged once
            start = time.monotonic()
            refused = post_image(client, GOOD)
            assert time.monotonic() - start < settings.timeout  # refused, not left to time out
            assert refused.status_code == 503 and refused.json()["error"] == "not_ready", refused.text
            assert "stuck" in refused.json()["detail"] and refused.headers["Retry-After"] == "5"
            stuck = r"the model is stuck: the model worker has run one batch for \d+ s, over the 1 s bound"
            assert re.fullmatch(stuck, refused.json()["detail"]), refused.text
            with pytest.raises(NotReady, match=f"^{stuck}$"):  # the same sentence at the queue's door
                client.app.state.batcher.check_ready()
        finally:
            unblock()
        monkeypatch.undo()
        wait_for(lambda: client.get("/readyz").status_code == 200, timeout=10)
        assert post_image(client, GOOD).status_code == 200


def test_one_route_served_by_a_minimal_app(tiny_config):
    """Routes read only ``app.state`` (:mod:`pacl_fast.serve.deps`): ``POST /v1/segment`` alone in a bare
    FastAPI app with that state and the error map answers like the full service."""
    from fastapi import FastAPI

    from pacl_fast.serve import deps, errors, routes

    segmenter = make_segmenter(tiny_config)
    metrics = ServeMetrics()
    batcher = Batcher(segmenter, max_batch=2, max_wait_ms=1, max_queue=2, metrics=metrics)
    app = FastAPI()
    deps.install_state(app, batcher, SETTINGS, metrics)
    errors.install(app)
    app.add_api_route("/v1/segment", routes.segment, methods=["POST"])
    batcher.start()
    try:
        assert batcher.ready.wait(30)
        with TestClient(app) as client:
            image = random_image(50, 30, 70)
            response = post_image(client, png(image))
            assert response.status_code == 200, response.text
            expected = segmenter.predict(image, LABELS, templates="single").labels
            assert np.array_equal(labels_of(response.json()), expected)
            refused = post_image(client, png(image), labels="a,a")
            assert refused.status_code == 422 and "duplicates" in refused.json()["detail"]
            assert client.get("/v1/info").status_code == 404  # only the one route is there
    finally:
        batcher.stop()


def test_body_settings_are_checked_and_carry_their_help():
    for bad in ({"body_timeout": 0}, {"body_timeout": -1.0}, {"body_timeout": math.inf}, {"body_timeout": math.nan},
                {"max_body_readers": 0}, {"max_body_readers": 2.5}):  # fmt: skip
        with pytest.raises(ValueError, match=next(iter(bad))):
            ServeSettings(**bad)
    specs = {spec.name: spec for spec in dataclasses.fields(ServeSettings)}
    for name in ("body_timeout", "max_body_readers"):
        assert len(specs[name].metadata["help"]) > 20, name
    assert ServeSettings().max_body_readers > ServeSettings().max_queue  # 64 slow sockets leave room


# ----------------------------------------------------------------------------- slow clients, real sockets


@contextmanager
def serving(app):
    """``app`` under a real uvicorn on a free loopback port, in a thread; yields (base URL, port)."""
    import uvicorn

    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_config=None, access_log=False, timeout_graceful_shutdown=5
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: server.started, timeout=30)
        wait_for(lambda: httpx.get(f"{base}/readyz", trust_env=False).status_code == 200, timeout=60)
        yield base, port
    finally:
        server.should_exit = True
        thread.join(30)


class SlowUpload:
    """A client that sends its headers, then one byte of its body every ``interval`` seconds, until answered."""

    def __init__(self, port: int, length: int = 100_000, interval: float = 0.2):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        head = (
            f"POST /v1/segment?labels=circle,square HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
            f"Content-Length: {length}\r\n\r\n"
        )
        self.sock.sendall(head.encode())
        self.started, self.interval = time.monotonic(), interval
        self.status: int | None = None
        self.answer, self.answered_after = b"", None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._dribble, daemon=True)
        self.thread.start()

    def _dribble(self) -> None:
        while not self.stop.is_set():
            readable, _, _ = select.select([self.sock], [], [], self.interval)
            if readable:
                break
            try:
                self.sock.send(b"\0")
            except OSError:
                break
        else:
            return
        self.answered_after = time.monotonic() - self.started
        self.sock.settimeout(2)
        chunks = []
        try:
            while chunk := self.sock.recv(65536):
                chunks.append(chunk)
        except OSError:
            pass
        self.answer = b"".join(chunks)
        if self.answer.startswith(b"HTTP/1.1 "):
            self.status = int(self.answer.split(b" ", 2)[1])

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        self.sock.close()


def test_a_slow_body_gets_408_at_its_deadline(tiny_config):
    settings = ServeSettings(max_queue=2, timeout=20, body_timeout=1.0, templates="single")
    with serving(create_app(make_segmenter(tiny_config), settings)) as (base, port):
        slow = SlowUpload(port)
        slow.thread.join(15)
        slow.close()
        assert slow.status == 408, slow.answer
        assert 1.0 <= slow.answered_after < 5.0, slow.answered_after
        assert b'"error":"body_timeout"' in slow.answer and b"within 1 s" in slow.answer
        assert b"connection: close" in slow.answer.lower()
        assert httpx.get(f"{base}/readyz", trust_env=False).status_code == 200


def test_slow_clients_cannot_take_the_model_queue(tiny_config, segmenter):
    """16 clients dribbling their bodies hold body readers' places, none of the model queue's 4: normal clients
    meanwhile get every answer, equal to predict; the slow ones get 408 at their deadline."""
    settings = ServeSettings(max_batch=4, max_queue=4, max_body_readers=32, timeout=30, body_timeout=8,
                             templates="single")  # fmt: skip
    app = create_app(make_segmenter(tiny_config), settings)
    images = [random_image(60 + i, 36, 52) for i in range(8)]
    with serving(app) as (base, port):
        readers, batcher = app.state.body_readers, app.state.batcher
        slow = [SlowUpload(port) for _ in range(16)]
        try:
            wait_for(lambda: readers.active == 16)
            assert batcher.depth == 0  # not one of them holds a place in the model's queue

            def normal(pair: list[np.ndarray]) -> list[httpx.Response]:
                with httpx.Client(base_url=base, trust_env=False, timeout=30) as http:
                    return [
                        http.post("/v1/segment", params={"labels": ",".join(LABELS)}, content=png(image),
                                  headers={"Content-Type": "image/png"})  # fmt: skip
                        for image in pair
                    ]

            with ThreadPoolExecutor(4) as pool:
                answers = [r for rs in pool.map(normal, [images[i::4] for i in range(4)]) for r in rs]
            assert all(s.status is None for s in slow), "a slow client was answered before its deadline"
            order = [image for i in range(4) for image in images[i::4]]
            for image, response in zip(order, answers):
                assert response.status_code == 200, response.text
                expected = segmenter.predict(image, LABELS, templates="single").labels
                assert np.array_equal(labels_of(response.json()), expected)
            for client in slow:
                client.thread.join(20)
        finally:
            for client in slow:
                client.close()
    assert [client.status for client in slow] == [408] * 16


def test_body_readers_are_capped_apart_from_the_queue(tiny_config):
    """With every body reader's place taken the next request is refused at once (503, Retry-After, the
    connection closed); once the slow bodies are cut off (408) a normal request is served."""
    settings = ServeSettings(max_queue=8, max_body_readers=3, timeout=30, body_timeout=2, templates="single")
    app = create_app(make_segmenter(tiny_config), settings)
    with serving(app) as (base, port):
        slow = [SlowUpload(port) for _ in range(3)]
        try:
            wait_for(lambda: app.state.body_readers.active == 3)
            headers = {"Content-Type": "image/png"}
            refused = httpx.post(f"{base}/v1/segment", params={"labels": "a"}, content=GOOD, headers=headers,
                                 trust_env=False)  # fmt: skip
            assert refused.status_code == 503 and refused.json()["error"] == "busy", refused.text
            assert refused.headers["Retry-After"] == "1" and refused.headers["Connection"] == "close"
            for client in slow:
                client.thread.join(15)
            assert [client.status for client in slow] == [408] * 3
            served = httpx.post(f"{base}/v1/segment", params={"labels": "a"}, content=GOOD, headers=headers,
                                trust_env=False)  # fmt: skip
            assert served.status_code == 200, served.text
        finally:
            for client in slow:
                client.close()


# ----------------------------------------------------------------------------- command line, real process


def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pacl-fast")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_command_line_options(tmp_path, capsys):
    args = serve_parser().parse_args(["serve", "--clip", "demo", "--max-batch", "16", "--timeout", "2.5"])
    settings = settings_from_args(args)
    # --templates unset: each request gets the model's (the demo model's are synthetic: test_defaults.py)
    assert (settings.max_batch, settings.timeout, settings.templates) == (16, 2.5, None)
    assert (args.host, args.batch_size) == ("127.0.0.1", None)
    resolve_model_options(args)
    assert args.batch_size == 16  # the encoder's batch follows --max-batch
    assert args.no_text_cache  # client-chosen class names are not written to disk unless asked
    opted_in = serve_parser().parse_args(["serve", "--disk-text-cache", "--batch-size", "4"])
    resolve_model_options(opted_in)
    assert (opted_in.no_text_cache, opted_in.batch_size) == (False, 4)
    assert settings_from_args(serve_parser().parse_args(["serve", "--templates", "short"])).templates == "short"
    for bad in (["--max-batch", "0"], ["--timeout", "-1"], ["--port", "70000"], ["--templates", "odes"]):
        with pytest.raises(SystemExit):
            serve_parser().parse_args(["serve", *bad])
        assert bad[0] in capsys.readouterr().err
    from pacl_fast.cli import UsageError

    missing = serve_parser().parse_args(["serve", "--pacl-weights", str(tmp_path / "missing.safetensors")])
    with pytest.raises(UsageError, match="no such file"):
        run_serve(missing)


@pytest.fixture(scope="module")
def uvicorn_process(tmp_path_factory):
    """``python -m pacl_fast.serve --clip demo`` on a random loopback port, started only for the test that
    talks to it (:func:`test_real_uvicorn_process`)."""
    # The encoder named: a service's --encoder auto chooses OpenVINO where installed (an unending stream pays its
    # build), predict's eager torch, and the two disagree on ~0.25 % of the demo model's pixels (bf16 both).
    server = LocalServer(
        ["--clip", "demo", "--max-batch", "4", "--device", "cpu", "--no-access-log", "--encoder", "torch"],
        tmp_path_factory.mktemp("serve") / "serve.log",
    ).start()
    yield server
    server.stop()


def test_real_uvicorn_process(uvicorn_process):
    """The real server: ready, segments like predict (the model's defaults in both), stops cleanly (exit 0) on
    SIGINT."""
    from pacl_fast.data.synthetic import CLASS_NAMES, render_scene
    from pacl_fast.segmenter import Segmenter

    scene = render_scene(3, seed=100)
    # The server's encoder, named (auto would take an OpenVINO model other tests left in the session's cache).
    expected = Segmenter("demo", device="cpu", encoder="torch").predict(scene.image, CLASS_NAMES)
    server = uvicorn_process.wait_ready(timeout=120)
    base, process = server.base, server.process
    response = httpx.post(
        f"{base}/v1/segment",
        files={"file": ("scene.png", png(scene.image), "image/png")},
        data={"labels": ",".join(CLASS_NAMES)},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    assert np.array_equal(labels_of(response.json()), expected.labels)
    info = httpx.get(f"{base}/v1/info").json()
    assert info["default_templates"] == info["defaults"]["templates"] == "synthetic" and info["model"] == "demo"
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=30) == 0
    output = server.log()
    assert "Traceback" not in output and "ready" in output, output
