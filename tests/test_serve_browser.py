"""The page of ``pacl-fast serve`` in headless Chromium, against a real server running the demo model.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them) and selenium. Marked
``slow`` and ``browser``: the default run leaves it out, ``.ci/run`` runs ``pytest -m browser``.
Set ``PACL_SERVE_SCREENSHOT=path.png`` to keep the screenshot (else it goes to pytest's tmp folder),
and ``PACL_FAST_REQUIRE_BROWSER=1`` to fail rather than skip when the browser is missing.
"""

from __future__ import annotations

import base64
import io
import os
import struct
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from pacl_fast.serve.local import LocalServer

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CHROMIUM = os.environ.get("PACL_FAST_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("PACL_FAST_CHROMEDRIVER", "/usr/bin/chromedriver")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,1000",
    "--force-device-scale-factor=1",
)
UPSCALE = 4  # scenes are rendered at the demo model's 64 px and shown 4x (nearest) for people to see


def _missing(reason: str) -> None:
    if os.environ.get("PACL_FAST_REQUIRE_BROWSER"):
        pytest.fail(reason)
    pytest.skip(reason)


#: Over 255 labels the API's label map is a 16-bit PNG: the server allows enough to test the page on one.
MAX_LABELS = 300


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with LocalServer(
        ["--clip", "demo", "--device", "cpu", "--no-access-log", "--max-labels", str(MAX_LABELS)],
        tmp_path_factory.mktemp("serve") / "serve.log",
        ready_timeout=180,
    ) as running:
        yield running.base


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()):
        _missing(f"{CHROMIUM} / {CHROMEDRIVER} not found: apt-get install chromium chromium-driver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _missing("selenium is not installed: pip install selenium")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def scene_with_several_shapes():
    """A demo-world scene (64 px) with at least three shape classes, and the same scene upscaled 4x."""
    from pacl_fast.data.synthetic import render_scene

    for index in range(100):
        scene = render_scene(index, seed=100)
        if len({kind for kind, _ in scene.objects}) >= 3:
            return scene, np.repeat(np.repeat(scene.image, UPSCALE, axis=0), UPSCALE, axis=1)
    raise AssertionError("no scene with three shape classes in the first 100")


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def canvas_rgb(driver, element_id: str) -> np.ndarray:
    """A canvas's pixels as ``[H, W, 3]`` uint8, read in the page."""
    width, height, data = driver.execute_script(
        "const c = document.getElementById(arguments[0]);"
        "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "let s = '';"
        "for (let i = 0; i < d.length; i += 8192) s += String.fromCharCode.apply(null, d.subarray(i, i + 8192));"
        "return [c.width, c.height, btoa(s)];",
        element_id,
    )
    return np.frombuffer(base64.b64decode(data), np.uint8).reshape(height, width, 4)[..., :3]


def wait_until(driver, condition, timeout: float = 60.0, message: str = "") -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition, message)


def set_threshold(driver, threshold: str) -> None:
    """Tick "Background below" (the page starts it as the model's default: ticked for the demo model) and set it."""
    driver.execute_script(
        "const c = document.getElementById('use-threshold');"
        "if (!c.checked) { c.checked = true; c.dispatchEvent(new Event('change')); }"
        "const r = document.getElementById('threshold'); r.value = arguments[0]; r.dispatchEvent(new Event('input'));",
        threshold,
    )


def test_page_starts_from_the_models_defaults_and_answers_as_the_api_with_no_options(server, browser, tmp_path):
    """One default, every door (issue 19 item 4): the page's controls start from ``/v1/info``'s defaults (the
    demo model's synthetic templates and 0.95 background threshold; its background was painted as shapes), so
    an untouched page answers what the API answers a request naming no option. The header names the model by
    a name that says something (issue 24 item 8), not the whole ``repr``."""
    from selenium.webdriver.common.by import By

    from pacl_fast.data.synthetic import CLASS_NAMES

    info = httpx.get(f"{server}/v1/info", timeout=30).json()
    assert info["defaults"]["background_threshold"] == 0.95 and info["defaults"]["templates"] == "synthetic"
    scene, image = scene_with_several_shapes()
    path = tmp_path / "scene.png"
    path.write_bytes(png_bytes(image))
    labels = ", ".join(CLASS_NAMES)
    upload = {"file": ("scene.png", path.read_bytes(), "image/png")}
    api = httpx.post(f"{server}/v1/segment", files=upload, data={"labels": labels}, timeout=60)
    assert api.status_code == 200, api.text
    label_map = np.asarray(Image.open(io.BytesIO(base64.b64decode(api.json()["labels_png"])))).astype(np.int16)
    label_map[label_map == 255] = -1
    assert (label_map == -1).any() and (label_map >= 0).any()  # the default threshold leaves background as such

    driver = browser
    driver.get(f"{server}/")
    wait_until(driver, lambda d: d.find_element(By.ID, "method").text == "pacl", message="/v1/info never loaded")
    header = driver.find_element(By.ID, "model").text
    assert header.startswith("demo · ") and info["precision"] in header and "sha256" not in header, header
    assert driver.find_element(By.ID, "use-threshold").is_selected()
    assert driver.find_element(By.ID, "threshold").get_attribute("value") == "0.95"
    assert driver.find_element(By.ID, "threshold-value").text == "0.95"
    assert driver.find_element(By.ID, "templates").get_attribute("value") == "synthetic"
    assert not driver.find_element(By.ID, "sliding").is_selected()
    driver.find_element(By.ID, "file").send_keys(str(path))
    driver.execute_script(
        "const t = document.getElementById('labels'); t.value = arguments[0]; t.dispatchEvent(new Event('input'));",
        labels,
    )
    run = driver.find_element(By.ID, "run")
    wait_until(driver, lambda d: run.is_enabled(), message="the Segment button stayed disabled")
    run.click()
    wait_until(driver, lambda d: d.execute_script("return !!window.paclPage.result"), message="no result on the page")
    page_labels = driver.execute_script("return Array.from(window.paclPage.result.labels)")
    assert np.array_equal(np.asarray(page_labels, np.int16).reshape(label_map.shape), label_map)

    # Unticked, the page asks for no threshold (it sends 0), not for the model's.
    driver.find_element(By.ID, "use-threshold").click()
    wait_until(driver, lambda d: run.is_enabled(), message="the Segment button stayed disabled")
    run.click()
    wait_until(
        driver,
        lambda d: d.execute_script("return window.paclPage.result.backgroundShare === 0"),
        message="unticking the threshold still left background",
    )


def test_page_segments_a_scene_like_the_api(server, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    from pacl_fast.data.synthetic import CLASS_NAMES
    from pacl_fast.results import palette

    scene, image = scene_with_several_shapes()
    path = tmp_path / "scene.png"
    path.write_bytes(png_bytes(image))
    labels = ", ".join(CLASS_NAMES)
    threshold = "0.6"  # the demo model's winner probability is low on the background: leave it unpainted

    # What the API says for this image and these labels (JSON label map, and its own overlay PNG).
    options = {"labels": labels, "background_threshold": threshold}
    upload = {"file": ("scene.png", path.read_bytes(), "image/png")}
    api = httpx.post(f"{server}/v1/segment", files=upload, data=options, timeout=60)
    assert api.status_code == 200, api.text
    body = api.json()
    label_map = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["labels_png"])))).astype(np.int16)
    label_map[label_map == 255] = -1
    assert label_map.shape == image.shape[:2]
    assert (label_map == -1).any() and len(np.unique(label_map)) >= 4  # background and three shapes at least
    accept_png = {"Accept": "image/png"}
    api_overlay = httpx.post(f"{server}/v1/segment", files=upload, data=options, headers=accept_png, timeout=60)
    api_overlay = np.asarray(Image.open(io.BytesIO(api_overlay.content)).convert("RGB"))

    driver = browser
    driver.get(f"{server}/")
    wait_until(driver, lambda d: d.find_element(By.ID, "method").text == "pacl", message="/v1/info never loaded")
    assert "Synthetic shapes" in [b.text for b in driver.find_elements(By.CSS_SELECTOR, "#presets button")]
    driver.find_element(By.ID, "file").send_keys(str(path))
    textarea = driver.find_element(By.ID, "labels")
    textarea.clear()
    textarea.send_keys(labels)
    set_threshold(driver, threshold)
    assert driver.find_element(By.ID, "threshold-value").text == "0.60"
    run = driver.find_element(By.ID, "run")
    wait_until(driver, lambda d: run.is_enabled(), message="the Segment button stayed disabled")
    run.click()
    wait_until(
        driver,
        lambda d: (
            d.find_element(By.ID, "legend").is_displayed() and d.execute_script("return !!window.paclPage.result")
        ),
        message="no result on the page",
    )
    assert not driver.find_element(By.ID, "error").is_displayed(), driver.find_element(By.ID, "error").text

    # The legend lists the classes (with their shares), in order.
    rows = driver.find_elements(By.CSS_SELECTOR, "#legend tbody tr")
    names = [row.find_elements(By.TAG_NAME, "td")[1].text for row in rows]
    assert names == [*CLASS_NAMES, "(background)"]
    shares = [float(row.find_elements(By.TAG_NAME, "td")[2].text.rstrip(" %")) for row in rows]
    expected_shares = [100 * (label_map == c).mean() for c in [*range(len(CLASS_NAMES)), -1]]
    np.testing.assert_allclose(shares, expected_shares, atol=0.051)

    # The page's label map (decoded from the palette PNG in the browser) is the API's.
    page_labels = driver.execute_script("return Array.from(window.paclPage.result.labels)")
    assert np.array_equal(np.asarray(page_labels, np.int16).reshape(label_map.shape), label_map)

    # The overlay on the page: the photo blended with the label map's colours (alpha 0.5), pixel for pixel
    # what the API's own overlay is, and what the label map and the photo say it must be.
    overlay = canvas_rgb(driver, "overlay")
    colours = palette(len(CLASS_NAMES)).astype(np.float32)[np.clip(label_map, 0, None)]
    blend = np.round(image.astype(np.float32) * 0.5 + colours * 0.5).astype(np.uint8)
    expected = np.where((label_map == -1)[..., None], image, blend)
    assert np.array_equal(overlay, expected)
    assert np.array_equal(overlay, api_overlay)
    assert np.array_equal(canvas_rgb(driver, "photo"), image)

    # The class under the cursor: point at the middle of the largest segment.
    largest = int(np.argmax([(label_map == c).sum() for c in range(len(CLASS_NAMES))]))
    ys, xs = np.nonzero(label_map == largest)
    pick = np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2)
    y, x = int(ys[pick]), int(xs[pick])
    canvas = driver.find_element(By.ID, "overlay")
    rect = driver.execute_script("const r = arguments[0].getBoundingClientRect(); return [r.width, r.height];", canvas)
    scale_x, scale_y = rect[0] / image.shape[1], rect[1] / image.shape[0]
    offset = (round((x + 0.5) * scale_x - rect[0] / 2), round((y + 0.5) * scale_y - rect[1] / 2))
    ActionChains(driver).move_to_element_with_offset(canvas, *offset).perform()
    hover = driver.find_element(By.ID, "hover").text
    assert hover.endswith(f": {CLASS_NAMES[largest]}"), hover

    # The download link carries the label PNG.
    link = driver.find_element(By.ID, "download")
    assert link.is_displayed() and link.get_attribute("download") == "scene_labels.png"
    href = link.get_attribute("href")
    assert href.startswith("data:image/png;base64,")
    downloaded = np.asarray(Image.open(io.BytesIO(base64.b64decode(href.split(",", 1)[1])))).astype(np.int16)
    assert np.array_equal(np.where(downloaded == 255, -1, downloaded), label_map)

    screenshot = Path(os.environ.get("PACL_SERVE_SCREENSHOT") or tmp_path / "serve_page.png")
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(screenshot))
    assert Image.open(screenshot).size[0] > 0

    # An API error is shown on the page in words, and the page keeps working.
    textarea.clear()
    textarea.send_keys("circle, circle")
    run.click()
    error = driver.find_element(By.ID, "error")
    wait_until(driver, lambda d: error.is_displayed(), message="the API error never appeared")
    assert "422" in error.text and "duplicates" in error.text, error.text


def test_page_works_offline_and_reports_a_bad_file(server, browser, tmp_path):
    """Nothing is fetched from another origin, and a file the server cannot read gives an error in words."""
    from selenium.webdriver.common.by import By

    driver = browser
    driver.get(f"{server}/")
    wait_until(driver, lambda d: d.find_element(By.ID, "method").text == "pacl", message="/v1/info never loaded")
    origins = driver.execute_script("return performance.getEntriesByType('resource').map(e => new URL(e.name).origin)")
    assert set(origins) <= {server}, origins
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"these are not pixels")
    driver.find_element(By.ID, "file").send_keys(str(bad))
    textarea = driver.find_element(By.ID, "labels")
    textarea.clear()
    textarea.send_keys("circle, square")
    run = driver.find_element(By.ID, "run")
    wait_until(driver, lambda d: run.is_enabled(), message="the Segment button stayed disabled")
    run.click()
    error = driver.find_element(By.ID, "error")
    wait_until(driver, lambda d: "not an image" in error.text, message="no error for a file that is not an image")
    assert error.text.startswith("Error 422")


def run_page(driver, server: str, path: Path, labels: str, threshold: str) -> None:
    """Load the page, choose ``path``, type ``labels``, set the threshold, press Segment, wait for the result."""
    from selenium.webdriver.common.by import By

    driver.get(f"{server}/")
    wait_until(driver, lambda d: d.find_element(By.ID, "method").text == "pacl", message="/v1/info never loaded")
    driver.find_element(By.ID, "file").send_keys(str(path))
    driver.execute_script(  # hundreds of names: set the text at once rather than typing it
        "const t = document.getElementById('labels'); t.value = arguments[0]; t.dispatchEvent(new Event('input'));",
        labels,
    )
    set_threshold(driver, threshold)
    run = driver.find_element(By.ID, "run")
    wait_until(driver, lambda d: run.is_enabled(), message="the Segment button stayed disabled")
    run.click()
    wait_until(
        driver,
        lambda d: d.execute_script("return !!window.paclPage.result") or d.find_element(By.ID, "error").is_displayed(),
        message="no result on the page",
    )
    assert not driver.find_element(By.ID, "error").is_displayed(), driver.find_element(By.ID, "error").text


def test_page_reads_label_maps_of_more_than_255_classes(server, browser, tmp_path):
    """300 labels, the shapes last (indices 294-299): the API answers a 16-bit label PNG, and the page's label
    map, legend and overlay are the API's (it used to read background for every pixel)."""
    from selenium.webdriver.common.by import By

    from pacl_fast.data.synthetic import CLASS_NAMES
    from pacl_fast.results import palette

    scene, image = scene_with_several_shapes()
    path = tmp_path / "scene.png"
    path.write_bytes(png_bytes(image))
    names = [f"filler {i}" for i in range(MAX_LABELS - len(CLASS_NAMES))] + list(CLASS_NAMES)
    labels, threshold = ", ".join(names), "0.3"
    upload = {"file": ("scene.png", path.read_bytes(), "image/png")}
    api = httpx.post(f"{server}/v1/segment", files=upload, data={"labels": labels, "background_threshold": threshold},
                     timeout=120)  # fmt: skip
    assert api.status_code == 200, api.text
    body = api.json()
    label_png = Image.open(io.BytesIO(base64.b64decode(body["labels_png"])))
    assert label_png.mode.startswith("I;16") or label_png.mode == "I", label_png.mode  # 16-bit grey
    label_map = np.asarray(label_png).astype(np.int64)
    label_map = np.where(label_map == 65535, -1, label_map)
    assert (label_map > 255).any() and (label_map == -1).any(), np.unique(label_map)

    run_page(browser, server, path, labels, threshold)
    page_labels = np.asarray(browser.execute_script("return Array.from(window.paclPage.result.labels)"), np.int64)
    assert np.array_equal(page_labels.reshape(label_map.shape), label_map)
    rows = browser.find_elements(By.CSS_SELECTOR, "#legend tbody tr")
    assert len(rows) == MAX_LABELS + 1  # every class, then the background
    colours = palette(MAX_LABELS).astype(np.float32)[np.clip(label_map, 0, None)]
    blend = np.round(image.astype(np.float32) * 0.5 + colours * 0.5).astype(np.uint8)
    assert np.array_equal(canvas_rgb(browser, "overlay"), np.where((label_map == -1)[..., None], image, blend))


def filtered_png(values: np.ndarray, depth: int, palette_png: bool, chunk_bytes: int = 97) -> bytes:
    """``values`` ``[H, W]`` as a PNG written by hand: every row filter in turn (none, sub, up, average, paeth),
    samples of ``depth`` bits (palette for ``palette_png``, else grey), the data split over several IDAT chunks."""
    height, width = values.shape
    if depth >= 8:
        rows = values.astype(">u2" if depth == 16 else np.uint8).reshape(height, -1).view(np.uint8)
    else:  # pack several samples into each byte, the first in the high bits
        per_byte = 8 // depth
        padded = np.zeros((height, -(-width // per_byte) * per_byte), np.uint8)
        padded[:, :width] = values
        shifts = (8 - depth * (np.arange(per_byte) + 1)).astype(np.uint8)
        rows = (padded.reshape(height, -1, per_byte) << shifts).sum(axis=2).astype(np.uint8)
    step = max(1, depth // 8)  # bytes per pixel, for the filters
    raw, previous = b"", np.zeros(rows.shape[1], np.int64)
    for y, row in enumerate(rows.astype(np.int64)):
        kind = y % 5
        left = np.concatenate([np.zeros(step, np.int64), row[:-step]])
        up_left = np.concatenate([np.zeros(step, np.int64), previous[:-step]])
        if kind == 4:
            estimate = left + previous - up_left
            pa, pb, pc = abs(estimate - left), abs(estimate - previous), abs(estimate - up_left)
            predicted = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, previous, up_left))
        else:
            predicted = [np.zeros_like(row), left, previous, (left + previous) // 2][kind]
        raw += bytes([kind]) + ((row - predicted) % 256).astype(np.uint8).tobytes()
        previous = row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, depth, 3 if palette_png else 0, 0, 0, 0)
    data = zlib.compress(raw)
    parts = [chunk(b"IHDR", header)]
    if palette_png:
        parts.append(chunk(b"PLTE", bytes(range(256)) * 3))
    parts += [chunk(b"IDAT", data[i : i + chunk_bytes]) for i in range(0, len(data), chunk_bytes)]
    return b"\x89PNG\r\n\x1a\n" + b"".join(parts) + chunk(b"IEND", b"")


@pytest.mark.parametrize("depth, palette_png", [(1, True), (2, True), (4, True), (8, True), (8, False), (16, False)])
def test_page_png_decoder_matches_numpy(server, browser, depth, palette_png):
    """The page's own PNG decoder on awkward label maps (odd sizes, every row filter, split data): the values
    it reads are the ones written (filled with random values, so a wrong filter or bit order shows)."""
    browser.get(f"{server}/")
    for seed, (height, width) in enumerate([(1, 1), (7, 13), (23, 37)]):
        values = np.random.default_rng(seed).integers(0, 2**depth, (height, width))
        encoded = base64.b64encode(filtered_png(values, depth, palette_png)).decode("ascii")
        decoded = browser.execute_script(
            "return decodeLabelPng(arguments[0], arguments[1], arguments[2]).then(r => Array.from(r.values));",
            encoded, width, height,
        )  # fmt: skip
        assert np.array_equal(np.asarray(decoded).reshape(height, width), values), (depth, height, width)
    error = browser.execute_script(
        "return decodeLabelPng(arguments[0], 5, 5).then(() => 'no error', e => e.message);",
        base64.b64encode(filtered_png(np.zeros((4, 5), np.int64), 8, True)).decode("ascii"),
    )
    assert "4" in error and "5x5" in error, error
