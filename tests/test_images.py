import io

import numpy as np
import pytest
import torch
from helpers import opencv
from PIL import Image

from kernels.reference import upsample_logits
from pacl_fast.images import SlidingWindow, fit_to_model, load_image, plan_resize


def test_modes_convert_to_rgb(tmp_path):
    grey = Image.fromarray(np.full((5, 7), 200, np.uint8))
    assert load_image(grey).shape == (3, 5, 7) and int(load_image(grey)[1, 2, 3]) == 200
    la = grey.convert("LA")
    assert load_image(la).shape == (3, 5, 7)
    palette = grey.convert("P")
    assert load_image(palette).dtype == torch.uint8
    palette.info["transparency"] = 0
    assert load_image(palette).shape == (3, 5, 7)
    rgba = Image.new("RGBA", (7, 5), (10, 20, 30, 0))
    assert load_image(rgba)[:, 0, 0].tolist() == [10, 20, 30]
    cmyk = Image.new("CMYK", (7, 5), (0, 255, 255, 0))
    assert load_image(cmyk)[:, 0, 0].tolist() == [255, 0, 0]
    sixteen = Image.fromarray(np.array([[0, 257 * 128, 65535]], np.uint16))
    assert load_image(sixteen)[0, 0].tolist() == [0, 128, 255]
    path = tmp_path / "sixteen.png"
    sixteen.save(path)
    assert load_image(path)[0, 0].tolist() == [0, 128, 255]


def test_exif_orientation(tmp_path):
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 10, 20))  # left quarter blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif.tobytes(), quality=95)
    loaded = load_image(path)
    assert loaded.shape == (3, 40, 20)
    assert loaded[2, 2, 10] > 200 and loaded[0, 38, 10] > 200  # blue went to the top


def test_arrays_and_tensors():
    hwc = np.random.default_rng(0).integers(0, 255, (6, 9, 3), dtype=np.uint8)
    assert torch.equal(load_image(hwc), torch.from_numpy(hwc).permute(2, 0, 1))
    assert load_image(hwc[:, :, :1]).shape == (3, 6, 9)
    rgba = np.concatenate([hwc, np.zeros((6, 9, 1), np.uint8)], axis=2)
    assert torch.equal(load_image(rgba), load_image(hwc))
    chw = torch.rand(3, 4, 5, dtype=torch.float64)
    assert load_image(chw).dtype == torch.float32 and load_image(chw).shape == (3, 4, 5)


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"\xff\xd8 this is not really a jpeg")
    with pytest.raises(ValueError, match="cannot decode image file .*junk.jpg"):
        load_image(junk)
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, format="PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(buffer.getvalue()[:60])
    with pytest.raises(ValueError, match="truncated.png"):
        load_image(truncated)
    with pytest.raises(ValueError, match="zero size"):
        load_image(np.zeros((0, 5, 3), np.uint8))
    big = tmp_path / "big.png"
    Image.new("RGB", (300, 200)).save(big)
    with pytest.raises(ValueError, match="60000 pixels .* over the limit max_pixels=50000"):
        load_image(big, max_pixels=50_000)
    for channels in (2, 5):
        with pytest.raises(ValueError, match="1, 3 or 4 channels"):
            load_image(np.zeros((4, 4, channels), np.uint8))
    with pytest.raises(ValueError, match="values must be in 0..1, found -0.5..2"):
        load_image(torch.tensor([[[-0.5, 2.0]]], dtype=torch.float64).expand(3, 1, 2))
    with pytest.raises(TypeError, match="numpy images must be uint8"):
        load_image(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(TypeError, match="unsupported image type"):
        load_image(3.5)


def test_resize_policy():
    geometry = plan_resize((480, 640), 224, 16)
    assert geometry.resized_size == (224, 299) and geometry.canvas_size == (224, 304)
    assert geometry.grid_size == (14, 19) and geometry.grid_extent == (14.0, 299 / 16)
    pixels = fit_to_model(torch.zeros(3, 480, 640, dtype=torch.uint8), geometry, (0.5,) * 3, (0.25,) * 3)
    assert pixels.shape == (3, 224, 304)
    assert torch.allclose(pixels[:, :, :299], torch.tensor(-2.0)) and torch.all(pixels[:, :, 299:] == 0)


@pytest.mark.parametrize("original", [(480, 640), (37, 50), (224, 224), (101, 13)])
def test_grid_maps_back_exactly_to_original_pixels(original):
    """The inverse of the resize policy: a logit that is linear in the resized image's
    coordinates, sampled at patch centres, comes back as that same linear function at each
    original pixel's centre (away from the clamped borders)."""
    patch = 8
    geometry = plan_resize(original, 64, patch)
    grid_h, grid_w = geometry.grid_size
    centres_y = (torch.arange(grid_h) + 0.5) * patch  # patch centres in resized pixels
    centres_x = (torch.arange(grid_w) + 0.5) * patch
    logits = torch.stack([centres_y[:, None].expand(grid_h, grid_w), centres_x[None, :].expand(grid_h, grid_w)], -1)
    up = upsample_logits(logits[None].double().float(), original, geometry.grid_extent)[0]  # [2, H, W]
    height, width = original
    rh, rw = geometry.resized_size
    want_y = (torch.arange(height) + 0.5) * rh / height
    want_x = (torch.arange(width) + 0.5) * rw / width
    inside_y = (want_y >= patch / 2) & (want_y <= (grid_h - 0.5) * patch)
    inside_x = (want_x >= patch / 2) & (want_x <= (grid_w - 0.5) * patch)
    torch.testing.assert_close(up[0][inside_y][:, 0], want_y[inside_y], atol=1e-3, rtol=0)
    torch.testing.assert_close(up[1][:, inside_x][0], want_x[inside_x], atol=1e-3, rtol=0)


def test_sliding_windows():
    window = SlidingWindow(crop=64, stride=48)
    origins = window.origins((64, 160), 16)
    assert origins == [(0, 0, 64, 64), (0, 48, 64, 64), (0, 96, 64, 64)]
    covered = np.zeros((64, 160), bool)
    for y, x, h, w in origins:
        covered[y : y + h, x : x + w] = True
    assert covered.all()
    assert SlidingWindow(64, 32).origins((32, 32), 16) == [(0, 0, 32, 32)]
    with pytest.raises(ValueError, match="multiples of the patch size 16"):
        SlidingWindow(60, 30).origins((64, 64), 16)
    with pytest.raises(ValueError, match="would leave gaps"):
        SlidingWindow(32, 48)


def test_plan_resize_refuses_strips_it_would_blow_up():
    """The short side is scaled up to the model's size: a 1x4000 strip would be a 64x256000 canvas."""
    with pytest.raises(ValueError, match=r"1x4000 .*over 16 times its short side"):
        plan_resize((1, 4000), 64, 8)
    with pytest.raises(ValueError, match="over 16 times"):
        plan_resize((170, 10), 64, 8)
    assert plan_resize((10, 160), 64, 8).canvas_size == (64, 1024)  # 16:1, the longest taken


# --- mmcv's Resize, as the training-free protocols resize (issue 19 item 3) ---------------------------------


def mmcv_size(height: int, width: int, short: int, long: int = 2048) -> tuple[int, int]:
    """mmcv's ``rescale_size((w, h), (long, short))`` written out (mmcv/image/geometric.py l. 219-255 and
    ``_scale_size`` l. 17-33): ``(h, w)``."""
    scale = min(max(long, short) / max(height, width), min(long, short) / min(height, width))
    return int(height * float(scale) + 0.5), int(width * float(scale) + 0.5)


@pytest.mark.parametrize(
    "size, short, expected",
    [
        ((224, 335), 336, (336, 503)),  # 502.5: mmcv rounds half up (plan_resize: to even, 502)
        ((100, 1500), 336, (137, 2048)),  # the long side would be 5040: capped at 2048
        ((3000, 2000), 336, (504, 336)),
        ((375, 500), 336, (336, 448)),
        ((36, 52), 448, (448, 647)),
        ((1024, 2048), 560, (560, 1120)),  # Cityscapes at SCLIP's 560
        ((7, 13), 336, (336, 624)),
    ],
)
def test_mmcv_rescale_size_is_mmcvs_formula(size, short, expected):
    from pacl_fast.images import mmcv_rescale_size, plan_mmcv_resize

    assert mmcv_size(*size, short) == expected
    assert mmcv_rescale_size(size, short, 2048) == expected
    geometry = plan_mmcv_resize(size, short, 2048, 16)
    assert geometry.resized_size == expected and geometry.original_size == size
    assert geometry.canvas_size == tuple(-(-side // 16) * 16 for side in expected)
    if size == (224, 335):
        assert plan_resize(size, short, 16).resized_size == (336, 502)  # the engine's own rounding, kept outside
    with pytest.raises(ValueError, match="over 16 times its short side"):
        plan_mmcv_resize((10, 170), 336, 2048, 16)


@pytest.mark.parametrize("size, target", [((37, 53), (336, 481)), ((500, 375), (448, 336)), ((64, 64), (96, 96)),
                                          ((300, 301), (300, 301)), ((123, 457), (41, 152))])  # fmt: skip
def test_resize_mmcv_is_opencv_bilinear_on_the_uint8_image(size, target):
    """Exactly ``cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)`` on the HWC uint8 image (what mmcv's
    ``imresize`` calls), then / 255; on float input it is bilinear with half-pixel centres and no antialiasing,
    which the engine's own resize (bicubic, antialiased) is not."""
    from pacl_fast.images import resize, resize_mmcv

    cv2 = opencv()
    rng = np.random.default_rng(sum(size))
    image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    expected = cv2.resize(image, (target[1], target[0]), interpolation=cv2.INTER_LINEAR)
    got = resize_mmcv(torch.from_numpy(image).permute(2, 0, 1), target)
    assert got.dtype == torch.float32 and got.shape == (3, *target)
    np.testing.assert_array_equal((got * 255).round().to(torch.uint8).permute(1, 2, 0).numpy(), expected)
    floats = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    bilinear = torch.nn.functional.interpolate(floats[None], size=target, mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(resize_mmcv(floats, target), bilinear, rtol=0, atol=1e-4)  # OpenCV: float32 weights
    if target != size:
        assert (resize(floats, target) - bilinear).abs().max() > 0.05


def test_segmentation_preprocess_with_the_mmcv_kernel(tmp_path):
    from pacl_fast.images import SegmentationPreprocess, normalize

    cv2 = opencv()
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    image = np.random.default_rng(3).integers(0, 256, (224, 335, 3), dtype=np.uint8)
    prepared = SegmentationPreprocess(336, 16, mean, std, kernel="mmcv", max_long_side=2048)(image)
    resized = cv2.resize(image, (503, 336), interpolation=cv2.INTER_LINEAR)
    expected = normalize(torch.from_numpy(resized).permute(2, 0, 1).float() / 255, mean, std)
    assert prepared.geometry.resized_size == (336, 503) and prepared.pixels.shape == (3, 336, 512)
    torch.testing.assert_close(prepared.pixels[:, :, :503], expected, rtol=0, atol=1e-6)
    assert torch.equal(prepared.pixels[:, :, 503:], torch.zeros(3, 336, 9))  # zero padding after normalising
    with pytest.raises(ValueError, match="kernel must be one of"):
        SegmentationPreprocess(336, 16, mean, std, kernel="bilinear")
    with pytest.raises(ValueError, match="max_long_side goes with kernel='mmcv'"):
        SegmentationPreprocess(336, 16, mean, std, kernel="mmcv")
