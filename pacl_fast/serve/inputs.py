"""What a client sends, made safe: bounded bodies, in-memory multipart, image bytes, request options.

Everything here treats the request as hostile. The body is read with a byte bound and a deadline
before anything is parsed, by at most ``max_body_readers`` requests at once; multipart is parsed in
memory (no temporary files); image bytes are opened from memory only (a client never names a path),
in an allow-list of formats, and their pixel count is checked from the header before a single pixel
is decoded. Problems become :class:`~pacl_fast.serve.errors.ApiError`: a 4xx with a sentence naming
the problem (or 503 when every body reader's place is taken), never a 500.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import warnings
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi.exceptions import RequestValidationError
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, ValidationError

from pacl_fast.choices import SERVE_IMAGE_FORMATS
from pacl_fast.serve.errors import CLOSE, ApiError
from pacl_fast.serve.settings import TEMPLATE_PRESETS, ServeSettings

if TYPE_CHECKING:
    from pacl_fast.segmenter import Segmenter

#: PIL formats decoded from uploads (``images.IMAGE_SUFFIXES``' formats). Others are refused: some
#: PIL plugins hand data to external programs (EPS runs Ghostscript) or parse rarely-audited formats.
ALLOWED_FORMATS = SERVE_IMAGE_FORMATS

#: Bytes a multipart body may carry beyond the image: boundaries, part headers and the option fields.
MULTIPART_OVERHEAD = 64 * 1024

#: The options ``POST /v1/segment`` understands (query parameters or multipart fields).
SEGMENT_OPTIONS = ("labels", "templates", "background_threshold", "sliding_window", "with_scores")
#: The multipart field that carries the image.
FILE_FIELD = "file"


# ----------------------------------------------------------------------------- the body


class BodyReaders:
    """A cap on requests reading their bodies at once, apart from the model's queue.

    A slow client holds a reader's place, never a place in the model's queue; with the body deadline
    (:func:`read_body`) it holds it at most ``body_timeout`` seconds. Over the cap a request is refused
    at once (503, ``Retry-After``) rather than made to wait: a waiting line would fill with the slow
    clients' reconnections and hold every waiting socket open, while a refusal costs nothing and tells
    a client or proxy when to retry. Used from the event loop only (no lock).
    """

    def __init__(self, limit: int, gauge: Any = None):
        self.limit, self.active, self._gauge = limit, 0, gauge

    @contextmanager
    def slot(self) -> Iterator[None]:
        if self.active >= self.limit:
            message = f"{self.active} requests are sending their bodies, the most this server reads at once"
            raise ApiError(503, "busy", f"{message}; retry in 1 s", {"Retry-After": "1", **CLOSE})
        self._count(+1)
        try:
            yield
        finally:
            self._count(-1)

    def _count(self, step: int) -> None:
        self.active += step
        if self._gauge is not None:
            self._gauge.set(self.active)


def upload_kind(content_type: str) -> bool:
    """True for a multipart upload, False for a raw image body; 415 for anything else (before reading)."""
    media_type = content_type.split(";")[0].strip().lower()
    if media_type == "multipart/form-data":
        return True
    if media_type.startswith("image/") or media_type == "application/octet-stream":
        return False
    raise ApiError(
        415,
        "unsupported_media_type",
        f"send the image as multipart/form-data (field {FILE_FIELD!r}) or as the raw body with an image/* "
        f"or application/octet-stream Content-Type, not {media_type or 'no Content-Type'}",
        CLOSE,
    )


async def read_body(chunks: AsyncIterator[bytes], content_length: str | None, limit: int, seconds: float) -> bytearray:
    """The whole body within ``seconds`` (408 after), refused (413) past ``limit`` bytes: at once from
    ``Content-Length``, else as it streams."""
    if content_length is not None:
        try:
            declared = int(content_length)
        except ValueError:
            message = f"Content-Length must be a number, got {content_length!r}"
            raise ApiError(400, "bad_request", message, CLOSE) from None
        if declared > limit:
            message = f"request body has {declared} bytes, over the limit of {limit}"
            raise ApiError(413, "too_many_bytes", message, CLOSE)
    body = bytearray()
    try:
        async with asyncio.timeout(seconds):
            async for chunk in chunks:
                body.extend(chunk)
                if len(body) > limit:
                    raise ApiError(413, "too_many_bytes", f"request body is over the limit of {limit} bytes", CLOSE)
    except TimeoutError:
        message = f"the request body did not arrive within {seconds:g} s ({len(body)} bytes came)"
        raise ApiError(408, "body_timeout", message, CLOSE) from None
    return body  # no copy: up to --max-image-bytes


@dataclass
class Upload:
    """A parsed ``POST /v1/segment`` request: the image bytes and the option fields (name -> values)."""

    image: bytes | bytearray
    fields: dict[str, list[str]]


def parse_upload(body: bytearray, multipart: str | None, query: dict[str, list[str]]) -> Upload:
    """A CPU thread's work: the image bytes and every option (multipart fields and query parameters);
    ``multipart`` is the multipart Content-Type, None for a raw image body."""
    upload = parse_multipart(body, multipart) if multipart else Upload(body, {})
    both = sorted(set(query) & set(upload.fields))
    if both:
        raise ApiError(422, "bad_option", f"option(s) {both} given both in the query and in the form")
    upload.fields.update(query)
    return upload


def parse_multipart(body: bytes | bytearray, content_type: str, max_fields: int = 16) -> Upload:
    """``multipart/form-data`` in memory: exactly one ``file`` part (the image), option fields as text."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise ApiError(400, "bad_multipart", "multipart/form-data without a boundary in its Content-Type")

    parts: list[dict] = []
    header: dict[str, bytes] = {"field": b"", "value": b""}

    def on_part_begin() -> None:
        if len(parts) >= max_fields:
            raise ApiError(400, "bad_multipart", f"more than {max_fields} multipart fields")
        parts.append({"headers": {}, "data": bytearray()})

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header["value"] += data[start:end]

    def on_header_end() -> None:
        name, value = header["field"].lower(), header["value"]
        parts[-1]["headers"][name] = value
        if name == b"content-disposition":
            parts[-1]["file"] = parse_options_header(value)[1].get(b"name") == FILE_FIELD.encode()
        header["field"], header["value"] = b"", b""

    def on_part_data(data: bytes, start: int, end: int) -> None:
        part = parts[-1]
        part["data"].extend(data[start:end])
        if not part.get("file") and len(part["data"]) > MULTIPART_OVERHEAD:  # option fields are short text
            raise ApiError(413, "too_many_bytes", f"an option field is over {MULTIPART_OVERHEAD} bytes")

    callbacks = {
        "on_part_begin": on_part_begin,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_part_data": on_part_data,
    }
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except ApiError:
        raise
    except Exception as error:  # python_multipart raises its own error types for malformed input
        raise ApiError(400, "bad_multipart", f"malformed multipart body: {error}") from None

    image: bytes | None = None
    fields: dict[str, list[str]] = {}
    for part in parts:
        _, disposition = parse_options_header(part["headers"].get(b"content-disposition", b""))
        name = disposition.get(b"name")
        if name is None:
            raise ApiError(400, "bad_multipart", "a multipart part has no name in its Content-Disposition")
        name = name.decode("utf-8", "replace")
        if name == FILE_FIELD:
            if image is not None:
                raise ApiError(400, "bad_multipart", f"send one image: the {FILE_FIELD!r} field appears twice")
            image = bytes(part["data"])
            continue
        try:
            fields.setdefault(name, []).append(part["data"].decode("utf-8"))
        except UnicodeDecodeError:
            raise ApiError(422, "bad_option", f"field {name!r} is not UTF-8 text") from None
    if image is None:
        raise ApiError(422, "missing_image", f"no image: send it in a multipart field named {FILE_FIELD!r}")
    return Upload(image, fields)


# ----------------------------------------------------------------------------- the image


def open_image(data: bytes, max_pixels: int, max_bytes: int) -> Image.Image:
    """Encoded image bytes -> a decoded PIL image, refusing too many bytes (413), too many pixels
    (413, from the header, before decoding) and anything that is not a whole image (422)."""
    if len(data) > max_bytes:
        raise ApiError(413, "too_many_bytes", f"image has {len(data)} bytes, over the limit of {max_bytes}")
    if not data:
        raise ApiError(422, "not_an_image", "the image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as error:
        raise ApiError(413, "too_many_pixels", f"decompression bomb refused: {error}") from None
    except UnidentifiedImageError:
        raise ApiError(
            422, "not_an_image", f"the upload is not an image in a supported format ({', '.join(ALLOWED_FORMATS)})"
        ) from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ApiError(422, "not_an_image", f"cannot read the image header: {error}") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise ApiError(422, "not_an_image", f"the image has zero size ({width}x{height})")
    if width * height > max_pixels:
        raise ApiError(
            413,
            "too_many_pixels",
            f"image has {width * height} pixels ({width}x{height}), over the limit of {max_pixels}",
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
    except Image.DecompressionBombError as error:  # e.g. a TIFF whose frames disagree with the first header
        raise ApiError(413, "too_many_pixels", f"decompression bomb refused: {error}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        kind = "truncated" if "truncated" in str(error).lower() else "undecodable"
        raise ApiError(422, "not_an_image", f"cannot decode the image ({image.format}, {kind}): {error}") from None
    return image


# ----------------------------------------------------------------------------- the options


@dataclass(frozen=True)
class SegmentOptions:
    """What a segmentation request asks for beyond the image, the model's defaults filled in for what it
    left out (``Segmenter.resolve``, as ``predict`` does); requests with equal options batch together."""

    labels: tuple[str, ...]
    templates: str | tuple[str, ...]  # a preset name, or the model's own templates
    background_threshold: float | None = None
    sliding_window: tuple[int, int, int | None] | None = None  # (crop, stride, short side)
    with_scores: bool = False


def parse_labels(value: str | list, settings: ServeSettings) -> tuple[str, ...]:
    """``"a, b, c"`` or a JSON list of strings -> class names, validated (count, length, blanks, duplicates)."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except (json.JSONDecodeError, RecursionError) as error:  # nesting past the parser's depth: RecursionError
                raise ApiError(422, "bad_labels", f"labels look like JSON but are not: {error}") from None
        else:
            value = [name.strip() for name in text.split(",")] if text else []
    if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
        raise ApiError(422, "bad_labels", "labels must be comma-separated names or a JSON list of strings")
    if not value:
        raise ApiError(422, "bad_labels", "labels is empty: give at least one class name, e.g. labels=cat,dog")
    if len(value) > settings.max_labels:
        raise ApiError(422, "too_many_labels", f"{len(value)} labels, over the limit of {settings.max_labels}")
    names = [name.strip() for name in value]
    if any(not name for name in names):
        raise ApiError(422, "bad_labels", f"labels has an empty name (label {names.index('') + 1} of {len(names)})")
    long = [name[:40] + "..." for name in names if len(name) > settings.max_label_chars]
    if long:
        raise ApiError(422, "bad_labels", f"labels over {settings.max_label_chars} characters: {long}")
    from pacl_fast.prompts import validate_labels

    try:  # whatever else the library refuses is the client's mistake too, found before the job is queued
        return validate_labels(names)
    except (ValueError, TypeError) as error:
        raise ApiError(422, "bad_labels", str(error)) from None


def _boolean(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ApiError(422, "bad_option", f"{name} must be true or false, got {value!r}")


def default_sliding_window(segmenter: Segmenter) -> tuple[int, int, int | None]:
    """``(crop, stride, short side)`` for ``sliding_window=true``: the model's window if it has one, else
    model-size crops, half overlap, 2x short side."""
    window = segmenter.defaults.sliding_window
    if window is not None:
        return window.crop, window.stride, window.short_side
    image_size, patch_size = segmenter.image_size, segmenter.pixel_multiple  # CLIP's patch size but for ProxyCLIP
    crop = max(patch_size, image_size // patch_size * patch_size)
    stride = max(patch_size, crop // 2 // patch_size * patch_size)
    return crop, stride, 2 * image_size


def parse_sliding_window(value: str, segmenter: Segmenter) -> tuple[int, int, int | None] | bool | None:
    """``true`` (the default window), ``false`` (none: False), or ``CROP,STRIDE[,SHORT]`` pixels, at most 4x
    the model's size; not given (empty): None, the model's."""
    image_size, patch_size = segmenter.image_size, segmenter.pixel_multiple  # CLIP's patch size but for ProxyCLIP
    text = value.strip().lower()
    if not text:
        return None
    if text in ("0", "false", "no", "off"):
        return False
    if text in ("1", "true", "yes", "on"):
        return default_sliding_window(segmenter)
    try:
        numbers = [int(part) for part in text.split(",")]
    except ValueError:
        numbers = []
    if len(numbers) not in (2, 3):
        raise ApiError(422, "bad_option", f"sliding_window must be true, false or CROP,STRIDE[,SHORT], got {value!r}")
    crop, stride = numbers[:2]
    short = numbers[2] if len(numbers) == 3 else image_size
    limit = 4 * image_size
    if not (0 < stride <= crop <= limit and patch_size <= short <= limit):
        raise ApiError(
            422,
            "bad_option",
            f"sliding_window {value!r}: need 0 < STRIDE <= CROP <= {limit} and {patch_size} <= SHORT <= {limit}",
        )
    if crop % patch_size or stride % patch_size:
        raise ApiError(
            422, "bad_option", f"sliding_window CROP and STRIDE must be multiples of the {segmenter.multiple_words}"
        )
    return crop, stride, short


def parse_threshold(value: str) -> float | None:
    if not value.strip():
        return None
    try:
        threshold = float(value)
    except ValueError:
        threshold = math.nan
    if not 0.0 <= threshold <= 1.0:
        raise ApiError(422, "bad_option", f"background_threshold must be a probability in [0, 1], got {value!r}")
    return threshold


def parse_segment_options(fields: Mapping[str, list[str]], settings: ServeSettings, segmenter: Segmenter
                          ) -> SegmentOptions:  # fmt: skip
    """Option fields (name -> the values sent) -> :class:`SegmentOptions`, with ``settings.templates`` and then
    the model's defaults (``segmenter.resolve``) for what the request leaves out; unknown or repeated names are
    errors. ``background_threshold=0`` asks for no threshold, ``sliding_window=false`` for no window."""
    unknown = sorted(set(fields) - set(SEGMENT_OPTIONS))
    if unknown:
        raise ApiError(
            422, "unknown_option", f"unknown option(s) {unknown}; /v1/segment understands {', '.join(SEGMENT_OPTIONS)}"
        )
    repeated = sorted(name for name, values in fields.items() if len(values) > 1)
    if repeated:
        raise ApiError(422, "bad_option", f"option(s) given more than once: {repeated}")
    value = {name: values[0] for name, values in fields.items()}
    if "labels" not in value:
        raise ApiError(422, "bad_labels", "labels are missing: give labels=cat,dog,sofa")
    templates = value.get("templates", "").strip() or settings.templates
    if templates is not None and templates not in TEMPLATE_PRESETS:
        raise ApiError(422, "bad_option", f"templates must be one of {', '.join(TEMPLATE_PRESETS)}, got {templates!r}")
    from pacl_fast.images import SlidingWindow

    labels = parse_labels(value["labels"], settings)
    window = parse_sliding_window(value.get("sliding_window", ""), segmenter)
    asked = segmenter.resolve(
        templates,
        parse_threshold(value.get("background_threshold", "")),
        SlidingWindow(*window) if isinstance(window, tuple) else window,
    )
    window = asked.sliding_window
    return SegmentOptions(
        labels=labels,
        templates=asked.templates,
        background_threshold=asked.background_threshold,
        sliding_window=None if window is None else (window.crop, window.stride, window.short_side),
        with_scores=_boolean("with_scores", value.get("with_scores", "")),
    )


class EmbedRequest(BaseModel):
    """Class names to embed ahead of time (so that the first segmentation with them is fast)."""

    model_config = ConfigDict(extra="forbid")
    labels: list[str] | str
    templates: str | None = None


def parse_embed_request(body: bytes | bytearray, settings: ServeSettings, segmenter: Segmenter
                        ) -> tuple[tuple[str, ...], str | tuple[str, ...]]:  # fmt: skip
    """A ``POST /v1/embed-labels`` JSON body -> (labels, templates: a preset, else the service's or the
    model's default as ``/v1/segment`` uses it), each checked."""
    try:
        asked = EmbedRequest.model_validate_json(body)
    except ValidationError as error:
        raise RequestValidationError(error.errors()) from None
    labels = parse_labels(asked.labels, settings)
    templates = asked.templates or settings.templates
    if templates is not None and templates not in TEMPLATE_PRESETS:
        raise ApiError(422, "bad_option", f"templates must be one of {', '.join(TEMPLATE_PRESETS)}")
    return labels, segmenter.resolve(templates).templates
