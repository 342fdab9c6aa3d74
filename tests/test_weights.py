import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from pacl_fast.backbone import ClipIdentity
from pacl_fast.weights import (
    PACLMetadata,
    load_pacl,
    metadata_for,
    read_header,
    read_pacl_weights,
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
