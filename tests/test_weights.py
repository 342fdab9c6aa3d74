import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

from pacl_fast.backbone import ClipIdentity
from pacl_fast.files import NotARegularFileError
from pacl_fast.weights import (
    PACLMetadata,
    load_pacl,
    metadata_for,
    nonfinite_tensors,
    read_header,
    read_pacl_weights,
    read_weights_bytes,
    save_pacl_weights,
)


@pytest.fixture()
def weights_file(tmp_path, tiny_pacl):
    return save_pacl_weights(tiny_pacl, tmp_path / "pacl.safetensors", metadata_for(tiny_pacl, steps=7))


_ORIGINALS = {}


def rewrite(path, tensors=None, metadata=None):
    """Overwrite a valid PACL weights file with a variant of its first version."""
    if path not in _ORIGINALS:
        _ORIGINALS[path] = read_pacl_weights(path)
    original, meta = _ORIGINALS[path]
    header = meta.to_header()
    header.update(metadata or {})
    save_file(tensors if tensors is not None else original, str(path), metadata=header)


def test_roundtrip_keeps_tensors_and_metadata(weights_file, tiny_pacl, tiny_backbone):
    model, metadata = load_pacl(tiny_backbone, weights_file)
    for name, tensor in tiny_pacl.trainable_state_dict().items():
        torch.testing.assert_close(model.trainable_state_dict()[name], tensor)
    assert metadata.steps == 7 and metadata.clip_identity == tiny_backbone.identity
    assert metadata.clip_config == tiny_backbone.model_cfg and metadata.patch_size == 8
    pixels = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(model.encode_image(pixels), tiny_pacl.encode_image(pixels))


def test_truncated_file(weights_file):
    data = weights_file.read_bytes()
    weights_file.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="truncated"):
        read_pacl_weights(weights_file)
    weights_file.write_bytes(data[:20])
    with pytest.raises(ValueError, match="truncated"):
        read_pacl_weights(weights_file)


def test_not_safetensors(tmp_path, tiny_pacl):
    pickled = tmp_path / "pacl.pt"
    torch.save(tiny_pacl.trainable_state_dict(), pickled)
    with pytest.raises(ValueError, match="not a safetensors file.*zip"):
        read_pacl_weights(pickled)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"hello")
    with pytest.raises(ValueError, match="not a safetensors file"):
        read_pacl_weights(junk)
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        read_pacl_weights(tmp_path / "nothing.safetensors")


def test_not_pacl_weights(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not PACL weights"):
        read_pacl_weights(path)


def test_missing_and_extra_tensors(weights_file):
    tensors, _ = read_pacl_weights(weights_file)
    fewer = {k: v for k, v in tensors.items() if k != "embedder.fc1.bias"}
    rewrite(weights_file, fewer)
    with pytest.raises(ValueError, match=r"missing \['embedder.fc1.bias'\]"):
        read_pacl_weights(weights_file)
    rewrite(weights_file, {**tensors, "extra.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"unexpected \['extra.weight'\]"):
        read_pacl_weights(weights_file)


def test_shape_mismatch(weights_file):
    tensors, _ = read_pacl_weights(weights_file)
    tensors["embedder.fc2.weight"] = torch.zeros(64, 63)
    rewrite(weights_file, tensors)
    with pytest.raises(ValueError, match=r"embedder.fc2.weight has shape \(64, 63\), expected \(64, 64\)"):
        read_pacl_weights(weights_file)


def test_non_finite_values(weights_file):
    tensors, _ = read_pacl_weights(weights_file)
    tensors["embedder.fc1.weight"][3, 4] = float("nan")
    tensors["embedder.fc1.weight"][0, 0] = float("inf")
    rewrite(weights_file, tensors)
    with pytest.raises(ValueError, match="embedder.fc1.weight has 2 NaN/Inf"):
        read_pacl_weights(weights_file)


def test_integer_dtype_refused(weights_file):
    tensors, _ = read_pacl_weights(weights_file)
    tensors["log_logit_scale"] = torch.tensor(3, dtype=torch.int32)
    rewrite(weights_file, tensors)
    with pytest.raises(ValueError, match="log_logit_scale has dtype I32"):
        read_pacl_weights(weights_file)


def test_weights_for_another_clip(weights_file, tiny_backbone):
    rewrite(weights_file, metadata={"clip_model": "ViT-B-16", "clip_weights": "laion2b_s34b_b88k"})
    with pytest.raises(ValueError, match="for CLIP ViT-B-16@laion2b_s34b_b88k, but the loaded CLIP is custom-"):
        load_pacl(tiny_backbone, weights_file)
    model, _ = load_pacl(tiny_backbone, weights_file, strict_clip=False)
    assert model.config.embed_dim == 64


def test_weights_for_another_width(weights_file, tiny_backbone):
    _, meta = read_pacl_weights(weights_file)
    config = dict(meta.config, token_dim=32)
    tensors, _ = read_pacl_weights(weights_file)
    tensors["embedder.linear.weight"] = torch.zeros(64, 32)
    tensors["embedder.fc1.weight"] = torch.zeros(64, 32)
    rewrite(weights_file, tensors, metadata={"config": json.dumps(config)})
    with pytest.raises(ValueError, match="token_dim=32"):
        load_pacl(tiny_backbone, weights_file)


def test_header_describes_identity(tmp_path):
    meta = PACLMetadata(
        clip_model="ViT-B-16",
        clip_weights="openai",
        config={"token_dim": 768, "embed_dim": 512},
        image_size=224,
        patch_size=16,
        training_data="synthetic seed 0",
        steps=1200,
        clip_config={"embed_dim": 512},
        extra={"tau_p": 0.05},
    )
    header = meta.to_header()
    assert header["format"] == "pacl-fast/pacl-weights" and header["clip_weights"] == "openai"
    assert meta.clip_identity == ClipIdentity("ViT-B-16", "openai")
    assert PACLMetadata.from_header(header, tmp_path / "pacl.safetensors") == meta  # every field survives


def test_file_is_plain_safetensors_with_the_metadata_in_its_header(weights_file, tiny_pacl):
    """Read by hand as the safetensors format defines it (a little-endian u64 header length, a JSON header,
    then the data), the file holds the trained tensors as float32 and the metadata as strings."""
    raw = weights_file.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    stored = header.pop("__metadata__")
    expected = metadata_for(tiny_pacl, steps=7).to_header()
    assert stored == {**expected, "date": stored["date"]} and stored["date"]  # the date is when it was saved
    state = tiny_pacl.trainable_state_dict()
    assert set(header) == set(state)
    for name, entry in header.items():
        assert entry["dtype"] == "F32" and entry["shape"] == list(state[name].shape), name
        start, end = entry["data_offsets"]
        data = torch.frombuffer(bytearray(raw[8 + length + start : 8 + length + end]), dtype=torch.float32)
        torch.testing.assert_close(data.view(state[name].shape), state[name].float(), atol=0, rtol=0)
    assert read_header(weights_file) == ({**header, "__metadata__": stored}, len(raw) - 8 - length)


@pytest.mark.parametrize(
    "header,why",
    [
        ({"a": 5}, "must have exactly dtype, shape and data_offsets"),
        ({"a": {"dtype": "F32", "shape": [1]}}, "must have exactly dtype, shape and data_offsets"),
        ({"__metadata__": [1, 2]}, "__metadata__ must map names to strings"),
        ({"__metadata__": {"format": 3}}, "__metadata__ must map names to strings"),
        ([1, 2], "not a safetensors file"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, "starts at byte 4, where 8 was expected"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, "spans 8 bytes, its F32 \\[3\\] needs 12"),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 8]}}, "not a list of sizes"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, "not \\[start, end\\]"),
        ({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, "unknown dtype 'Q4'"),
    ],
)  # fmt: skip
def test_forged_headers_are_one_value_error(tmp_path, header, why):
    """Issue 10 item 12: forged headers raised raw TypeError/KeyError/AttributeError."""
    import json
    import struct

    raw = json.dumps(header).encode()
    path = tmp_path / "forged.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(16))
    with pytest.raises(ValueError, match=why):
        read_pacl_weights(path)


def test_export_refuses_non_finite_tensors_and_writes_nothing(tmp_path, tiny_pacl):
    """Issue 23 item 4: a diverged run wrote an all-NaN file that only loading refused."""
    with torch.no_grad():
        tiny_pacl.embedder.fc1.bias[2] = float("nan")
        tiny_pacl.log_logit_scale.fill_(float("inf"))
    path = tmp_path / "pacl.safetensors"
    with pytest.raises(ValueError, match=r"not writing PACL weights .*: NaN/Inf values in embedder.fc1.bias \(1\), "
                                         r"log_logit_scale \(1\)"):  # fmt: skip
        save_pacl_weights(tiny_pacl, path)
    assert list(tmp_path.iterdir()) == []  # not even a temporary file


def test_nonfinite_tensors_names_each_bad_tensor_with_its_count():
    tensors = {
        "a": torch.tensor([1.0, float("nan"), float("-inf")]),
        "b": torch.zeros(0),
        "c": torch.tensor([1, 2]),  # integers are always finite
        "d": torch.full((2, 3), float("inf"), dtype=torch.bfloat16),
        "e": torch.ones(4, dtype=torch.float16),
    }
    assert nonfinite_tensors(tensors) == {"a": 2, "d": 6}
    assert nonfinite_tensors({}) == {} and nonfinite_tensors({"c": tensors["c"]}) == {}


@pytest.mark.parametrize(
    "field, value, why",
    [
        ("image_size", "1e999", r"field 'image_size' must be an integer 1\.\.65536, got '1e999'"),
        ("image_size", "224.0", r"field 'image_size' must be an integer"),
        ("image_size", "true", r"field 'image_size' must be an integer"),
        ("image_size", "0", r"field 'image_size' must be an integer 1\.\.65536, got '0'"),
        ("patch_size", "[16]", r"field 'patch_size' must be an integer"),
        ("patch_size", "sixteen", r"field 'patch_size' is not JSON: 'sixteen'"),
        ("steps", "-1", r"field 'steps' must be an integer >= 0"),
        ("steps", "9" * 5000, r"field 'steps' is not JSON|field 'steps' must be an integer"),  # Python's int limit
        ("format_version", "one", r"field 'format_version' is not JSON"),
        ("config", "[1, 2]", r"field 'config' must be a JSON dict"),
        ("config", "[" * 100_000, r"field 'config' is not JSON"),
        ("extra", "3", r"field 'extra' must be a JSON dict"),
        ("clip_config", '"x"', r"field 'clip_config' must be a JSON dict"),
    ],
)
def test_malformed_metadata_is_one_value_error_naming_the_field(weights_file, field, value, why):
    """Issue 23 item 5: image_size "1e999" raised OverflowError from int(inf)."""
    rewrite(weights_file, metadata={field: value})
    with pytest.raises(ValueError, match=why):
        read_pacl_weights(weights_file)


def test_missing_metadata_field_is_named(weights_file):
    original = read_pacl_weights(weights_file)
    header = original[1].to_header()
    del header["image_size"]
    save_file(original[0], str(weights_file), metadata=header)
    with pytest.raises(ValueError, match="field 'image_size' is missing"):
        read_pacl_weights(weights_file)


@pytest.mark.parametrize(
    "edit, why",
    [
        ({"token_dim": 1e999}, r"config field 'token_dim' is inf"),
        ({"token_dim": 2.5}, r"config field 'token_dim' is 2\.5"),
        ({"hidden_dim": 10**400}, r"config field 'hidden_dim' is 1000"),
        ({"patch_temperature": -1.0}, r"config field 'patch_temperature' is -1\.0"),
        ({"logit_scale": float("nan")}, r"config field 'logit_scale' is nan"),
        ({"learn_patch_temperature": "yes"}, r"config field 'learn_patch_temperature' is 'yes'"),
        ({"surprise": 1}, r"config has unknown fields \['surprise'\]"),
    ],
)
def test_malformed_metadata_config_is_one_value_error(weights_file, edit, why):
    config = {**read_pacl_weights(weights_file)[1].config, **edit}
    rewrite(weights_file, metadata={"config": json.dumps(config)})
    with pytest.raises(ValueError, match=why):
        read_pacl_weights(weights_file)


@pytest.mark.timeout(30)
def test_a_fifo_is_refused_without_blocking(tmp_path):
    """Issue 23 item 3: opening a FIFO for reading waits for a writer, forever."""
    fifo = tmp_path / "pacl.safetensors"
    os.mkfifo(fifo)
    for read in (read_pacl_weights, read_header):
        with pytest.raises(NotARegularFileError, match=f"{fifo}: expected a regular file, found a FIFO"):
            read(fifo)
    with pytest.raises(NotARegularFileError, match="found a folder"):
        read_pacl_weights(tmp_path)
    with pytest.raises(FileNotFoundError, match="PACL weights file not found"):
        read_pacl_weights(tmp_path / "absent.safetensors")


def test_a_file_too_large_to_be_pacl_weights_is_refused_unread(weights_file):
    with pytest.raises(ValueError, match=r"is \d+ bytes, over the 100 a PACL weights file may have"):
        read_weights_bytes(weights_file, max_bytes=100)
