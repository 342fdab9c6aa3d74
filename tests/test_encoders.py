"""Every encoder backend against the torch fp32 reference (DESIGN §5), the traceable towers, the
export cache, and how a missing library or device is reported.

Backends whose library or device is missing skip with that reason: here (CPU, no TensorRT) the
tensorrt and CUDA cases skip; ``benchmarks/gpu_check.sh`` runs them on a GPU machine.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import MICRO_CLIP_CONFIG, quiet_load_clip, skip_unavailable
from helpers import random_pacl as make_model
from torch import nn

from pacl_fast.encoders import EncoderUnavailableError, TorchEncoder, make_encoder
from pacl_fast.encoders.artifacts import export_key, weights_digest
from pacl_fast.encoders.export import OnnxCache, _export
from pacl_fast.encoders.graph import ImageTower, SelfAttention, TextTower, supports_sdpa
from pacl_fast.model import PACL

HALF = (torch.bfloat16, torch.float16)
PROMPTS = ["a photo of a cat.", "a dog", "the sky", "a road at night", "tree", "a red car", "grass", "water"]
HAS_CUDA = torch.cuda.is_available()
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
NO_CUDA = "needs a CUDA device (torch.cuda.is_available() is False)"
NO_TENSORRT = "needs TensorRT (pip install pacl-fast[trt]); not installed"


@pytest.fixture(scope="module")
def vit_model() -> PACL:
    return make_model("ViT-B-16")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("encoder-cache")


def reference_outputs(model: PACL, pixels: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eager fp32 model's patches ``[B, h, w, E]`` and texts ``[T, E]`` (on a copy: encoders cast in place)."""
    reference = TorchEncoder(copy.deepcopy(model).float())
    return reference.encode_image(pixels).float(), reference.encode_text(tokens)


def reference_patches(model: PACL, pixels: torch.Tensor) -> torch.Tensor:
    return TorchEncoder(copy.deepcopy(model).float()).encode_image(pixels)


def assert_matches_reference(reference, outputs, dtype: torch.dtype, atol: float | None = None) -> None:
    """Patch and text cosine >= 0.999 (fp32) / 0.99 (half), same labels wherever the top-2 margin is clear;
    with ``atol``, every element within it of the reference as well."""
    (ref_patches, ref_texts), (patches, texts) = reference, outputs
    assert patches.shape == ref_patches.shape and texts.shape == ref_texts.shape
    patches, texts = patches.float().cpu(), texts.float().cpu()
    assert torch.isfinite(patches).all() and torch.isfinite(texts).all()
    if atol is not None:
        torch.testing.assert_close(patches, ref_patches, atol=atol, rtol=0)
        torch.testing.assert_close(texts, ref_texts, atol=atol, rtol=0)
    threshold = 0.99 if dtype in HALF else 0.999
    patch_cosine = F.cosine_similarity(patches, ref_patches, dim=-1).min().item()
    text_cosine = F.cosine_similarity(texts, ref_texts, dim=-1).min().item()
    assert patch_cosine >= threshold and text_cosine >= threshold, (patch_cosine, text_cosine)
    torch.testing.assert_close(patches.norm(dim=-1), torch.ones(patches.shape[:-1]), atol=2e-2, rtol=0)

    ref_logits = torch.einsum("bhwe,ce->bhwc", ref_patches, ref_texts)
    logits = torch.einsum("bhwe,ce->bhwc", patches, texts)
    top2 = ref_logits.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > (1e-2 if dtype in HALF else 1e-3)
    assert clear.float().mean() >= 0.25, "too few clear-margin patches for the label check to mean anything"
    assert torch.equal(logits.argmax(-1)[clear], ref_logits.argmax(-1)[clear])


def run_backend(name: str, dtype: torch.dtype, model: PACL, pixels, tokens, device: str = "cpu", **options):
    model = copy.deepcopy(model).to(device)  # torch backends cast their model in place
    try:
        encoder = make_encoder(name, model, dtype, **options)
    except EncoderUnavailableError as error:
        skip_unavailable(name, error, device)  # fails instead on CI when the test extra installs the backend
    return encoder, (encoder.encode_image(pixels.to(device)), encoder.encode_text(tokens.to(device)))


# --- the traceable towers -------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [None, "float", "bool", "per-head"])
def test_self_attention_equals_multihead_attention(mask):
    torch.manual_seed(3)
    mha = nn.MultiheadAttention(24, 3, batch_first=True).eval()
    x = torch.randn(5, 7, 24)  # [B, L, D]
    masks = {
        None: None,
        "float": torch.full((7, 7), float("-inf")).triu(1),  # open_clip's causal text mask
        "bool": torch.rand(7, 7) > 0.6,
        "per-head": torch.randn(5 * 3, 7, 7),
    }
    attn_mask = masks[mask]
    if mask == "bool":
        attn_mask.fill_diagonal_(False)  # every query keeps one key
    with torch.no_grad():
        expected = mha(x, x, x, need_weights=False, attn_mask=attn_mask)[0]
        got, weights = SelfAttention(mha)(x, x, x, need_weights=False, attn_mask=attn_mask)
    assert weights is None
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # Cross-attention is not rewritten: it takes the module's own path.
    y = torch.randn(5, 4, 24)
    with torch.no_grad():
        torch.testing.assert_close(SelfAttention(mha)(x, y, y)[0], mha(x, y, y, need_weights=False)[0])


def test_self_attention_refuses_modules_it_cannot_replace():
    assert not supports_sdpa(nn.MultiheadAttention(8, 2, batch_first=False))
    assert not supports_sdpa(nn.MultiheadAttention(8, 2, batch_first=True, add_bias_kv=True))
    with pytest.raises(ValueError, match="batch-first"):
        SelfAttention(nn.MultiheadAttention(8, 2, batch_first=False))


def test_towers_equal_the_model_and_share_its_weights(tiny_model):
    model = copy.deepcopy(tiny_model)
    pixels, tokens = torch.randn(3, 3, 48, 80), model.backbone.tokenize(PROMPTS[:3])
    image, text = ImageTower(model).eval(), TextTower(model).eval()
    with torch.no_grad():
        torch.testing.assert_close(image(pixels), model.encode_image(pixels), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(text(tokens), model.encode_text(tokens), atol=1e-5, rtol=1e-5)
    # The model itself is untouched; the towers see its parameters, not copies.
    blocks = model.backbone.visual.transformer.resblocks
    assert all(isinstance(block.attn, nn.MultiheadAttention) for block in blocks)
    assert all(isinstance(block.attn, SelfAttention) for block in image.backbone.visual.transformer.resblocks)
    model_ptrs = {p.data_ptr() for p in model.backbone.parameters()} | {p.data_ptr() for p in model.parameters()}
    assert {p.data_ptr() for p in image.parameters()} <= model_ptrs
    with torch.no_grad():
        model.embedder.fc2.bias.add_(0.5)
        torch.testing.assert_close(image(pixels), model.encode_image(pixels), atol=1e-5, rtol=1e-5)


# --- every backend against the torch fp32 reference (CPU) -----------------------------------------

# fp32 backends on CPU, element by element on the unit embeddings: the largest error measured (torch 2.14,
# this venv's onnxruntime) is 2.5e-7 on the tiny CLIP (compile 1.6e-7, onnxruntime 2.5e-7) and 2.1e-7 on
# ViT-B/16 (compile 1.9e-7, onnxruntime 2.1e-7); the tolerance is about 4x that.
FP32_ATOL = {"tiny": 1e-6, "ViT-B-16": 1e-6}

CPU_CASES = [
    ("torch", torch.bfloat16),
    ("torch", torch.float16),
    ("compile", torch.float32),
    pytest.param("compile", torch.bfloat16, marks=pytest.mark.slow),
    ("onnxruntime", torch.float32),
    ("onnxruntime", torch.float16),  # the half-precision graph TensorRT builds from, checked on CPU
]


@pytest.mark.parametrize("name,dtype", CPU_CASES, ids=lambda v: str(v).removeprefix("torch."))
def test_backend_matches_reference_tiny(name, dtype, tiny_model, cache):
    """Batch 3 at 48x80: a grid (6x10) that is not the CLIP's native 8x8, so positions are interpolated."""
    torch.manual_seed(7)
    pixels, tokens = torch.randn(3, 3, 48, 80), tiny_model.backbone.tokenize(PROMPTS)
    reference = reference_outputs(tiny_model, pixels, tokens)
    options = {"cache_dir": cache} if name == "onnxruntime" else {}
    encoder, outputs = run_backend(name, dtype, tiny_model, pixels, tokens, **options)
    assert encoder.dtype == dtype and outputs[0].dtype == dtype
    atol = FP32_ATOL["tiny"] if dtype == torch.float32 else None
    assert_matches_reference(reference, outputs, dtype, atol)
    # Another batch size runs through the same graph (dynamic batch axis).
    pair = torch.randn(2, 3, 48, 80)
    ref_pair = reference_outputs(tiny_model, pair, tokens[:2])
    assert_matches_reference(ref_pair, (encoder.encode_image(pair), encoder.encode_text(tokens[:2])), dtype, atol)


VIT_CASES = [
    ("torch", torch.bfloat16),
    pytest.param("torch", torch.float16, marks=pytest.mark.slow),  # fp16 matmuls are emulated on CPU: ~40 s
    pytest.param("onnxruntime", torch.float32, marks=pytest.mark.slow),
    pytest.param("onnxruntime", torch.float16, marks=pytest.mark.slow),
    pytest.param("compile", torch.float32, marks=pytest.mark.slow),
    pytest.param("compile", torch.bfloat16, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name,dtype", VIT_CASES, ids=lambda v: str(v).removeprefix("torch."))
def test_backend_matches_reference_vit_b_16(name, dtype, vit_model, cache):
    torch.manual_seed(8)
    pixels, tokens = torch.randn(2, 3, 224, 224), vit_model.backbone.tokenize(PROMPTS)
    reference = reference_outputs(vit_model, pixels, tokens)
    options = {"cache_dir": cache} if name == "onnxruntime" else {}
    _, outputs = run_backend(name, dtype, vit_model, pixels, tokens, **options)
    assert_matches_reference(reference, outputs, dtype, FP32_ATOL["ViT-B-16"] if dtype == torch.float32 else None)


def test_onnxruntime_writes_every_output_element(tiny_model, cache):
    encoder = make_encoder("onnxruntime", tiny_model, cache_dir=cache)
    pixels = torch.randn(2, 3, 40, 56)
    out = torch.full((2, 5, 7, tiny_model.config.embed_dim), float("nan"))
    assert encoder.encode_image(pixels, out=out) is out
    torch.testing.assert_close(out, reference_patches(tiny_model, pixels))
    with pytest.raises(ValueError, match=r"out must be a contiguous \(2, 5, 7, 64\)"):
        encoder.encode_image(pixels, out=torch.empty(2, 5, 7, 32))
    with pytest.raises(ValueError, match="multiples of the patch size 8"):
        encoder.encode_image(torch.randn(1, 3, 30, 64))


# --- the export cache -------------------------------------------------------------------------------


def test_export_cache_reuses_graphs_and_keys_on_the_weights(tiny_model, tmp_path):
    cache = OnnxCache(tiny_model, torch.float32, tmp_path)
    path = cache.image((64, 64))
    stamp = path.stat().st_mtime_ns
    again = OnnxCache(tiny_model, torch.float32, tmp_path)
    assert again.key == cache.key and again.image((64, 64)) == path and path.stat().st_mtime_ns == stamp
    assert OnnxCache(tiny_model, torch.float16, tmp_path).key != cache.key
    edited = copy.deepcopy(tiny_model)
    with torch.no_grad():
        edited.embedder.fc1.weight[0, 0] += 1e-3
    assert weights_digest(edited) != weights_digest(tiny_model)
    assert export_key(edited, torch.float32) != cache.key
    # A second random CLIP of the same architecture is not confused with the first.
    other = make_model(tiny_model.backbone.model_cfg, seed=1)
    assert other.backbone.identity == tiny_model.backbone.identity and export_key(other, torch.float32) != cache.key


def test_interrupted_export_leaves_nothing_behind(tmp_path):
    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        _export(Broken(), torch.zeros(2, 3), ("x", "y"), tmp_path / "image-8x8")
    assert list(tmp_path.iterdir()) == []


# --- choosing a backend, and what a missing one says -----------------------------------------------


def test_missing_onnxruntime_names_the_extra(tiny_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    with pytest.raises(EncoderUnavailableError, match=r"pip install pacl-fast\[onnx\]"):
        make_encoder("onnxruntime", tiny_model)


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_missing_tensorrt_names_the_extra(tiny_model):
    with pytest.raises(EncoderUnavailableError, match=r"pip install pacl-fast\[trt\]"):
        make_encoder("tensorrt", tiny_model)


@pytest.mark.skipif(not HAS_TENSORRT or HAS_CUDA, reason="needs TensorRT installed on a machine without CUDA")
def test_tensorrt_without_cuda_says_so(tiny_model):
    with pytest.raises(EncoderUnavailableError, match="needs a CUDA device"):
        make_encoder("tensorrt", tiny_model)


def test_bad_encoder_arguments(tiny_model):
    with pytest.raises(ValueError, match="encoder must be one of"):
        make_encoder("tvm", tiny_model)
    with pytest.raises(ValueError, match="float32 or float16 graphs"):
        make_encoder("onnxruntime", tiny_model, torch.bfloat16)
    with pytest.raises(ValueError, match="dtype must be float32, bfloat16 or float16"):
        make_encoder("torch", copy.deepcopy(tiny_model), torch.float64)


# --- CUDA: every backend present, on the GPU (run by benchmarks/gpu_check.sh) ----------------------


def trt(dtype: torch.dtype, arch: str):  # noqa: ANN201 - a pytest param
    return pytest.param("tensorrt", dtype, arch, marks=pytest.mark.skipif(not HAS_TENSORRT, reason=NO_TENSORRT))


# Kept to what fits benchmarks/gpu_check.sh's time budget: TensorRT builds take minutes.
GPU_CASES = [
    ("torch", torch.float16, "tiny"),
    ("torch", torch.bfloat16, "tiny"),
    ("compile", torch.float16, "tiny"),
    ("onnxruntime", torch.float32, "tiny"),
    ("onnxruntime", torch.float16, "tiny"),
    trt(torch.float16, "tiny"),
    trt(torch.float32, "tiny"),
    ("torch", torch.float16, "ViT-B-16"),
    ("torch", torch.bfloat16, "ViT-B-16"),
    pytest.param("compile", torch.float16, "ViT-B-16", marks=pytest.mark.slow),
    ("onnxruntime", torch.float16, "ViT-B-16"),
    trt(torch.float16, "ViT-B-16"),
]


@pytest.fixture(scope="module")
def vit_model_cuda_source():
    return make_model("ViT-B-16") if HAS_CUDA else None


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)
@pytest.mark.parametrize("name,dtype,arch", GPU_CASES, ids=lambda v: str(v).removeprefix("torch."))
def test_backend_matches_reference_cuda(name, dtype, arch, tiny_model, vit_model_cuda_source, cache):
    model = tiny_model if arch == "tiny" else vit_model_cuda_source
    size = (48, 80) if arch == "tiny" else (224, 224)
    torch.manual_seed(9)
    pixels, tokens = torch.randn(5, 3, *size), model.backbone.tokenize(PROMPTS)
    reference = reference_outputs(model, pixels, tokens)
    options = {"cache_dir": cache} if name in ("onnxruntime", "tensorrt") else {}
    if name == "tensorrt":
        options.update(max_batch=4, progress=False)  # batch 5 runs as 4 + 1: chunking is exercised
    encoder, outputs = run_backend(name, dtype, model, pixels, tokens, device="cuda", **options)
    assert outputs[0].device.type == "cuda"
    assert_matches_reference(reference, outputs, dtype)
    if name in ("onnxruntime", "tensorrt"):  # every element written, into a caller's buffer
        out = torch.full_like(outputs[0], float("nan"))
        encoder.encode_image(pixels.cuda(), out=out)
        assert torch.equal(out, outputs[0])
    if name == "tensorrt":  # the engine is cached on disk: a new encoder loads it without building
        engine = encoder.engine_path(size)
        stamp = engine.stat().st_mtime_ns
        again = make_encoder(name, copy.deepcopy(model).cuda(), dtype, **options)
        assert_matches_reference(reference, (again.encode_image(pixels.cuda()), outputs[1]), dtype)
        assert engine.stat().st_mtime_ns == stamp


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)
@pytest.mark.skipif(not HAS_TENSORRT, reason=NO_TENSORRT)
def test_tensorrt_on_a_side_stream(tiny_model, cache):
    """Kernels go on torch's current stream: results are right when that is not the default stream."""
    model = copy.deepcopy(tiny_model).cuda()
    encoder = make_encoder("tensorrt", model, cache_dir=cache, max_batch=4, progress=False)  # engine of the test above
    pixels = torch.randn(4, 3, 48, 80, device="cuda")
    expected = encoder.encode_image(pixels)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = encoder.encode_image(pixels)
    torch.cuda.current_stream().wait_stream(stream)
    assert torch.equal(got, expected)


# --- Segmenter(encoder=...) and `pacl-fast export` -------------------------------------------------


def test_segmenter_with_onnxruntime_matches_torch(tiny_config, tmp_path):
    from helpers import make_segmenter

    eager = make_segmenter(tiny_config)
    onnx = make_segmenter(tiny_config, encoder="onnxruntime", encoder_options={"cache_dir": tmp_path})
    assert onnx.encoder.name == "onnxruntime" and onnx.dtype == torch.float32 and "onnxruntime" in repr(onnx)
    labels = ["circle", "square", "sky"]
    torch.testing.assert_close(onnx.encode_labels(labels, "single"), eager.encode_labels(labels, "single"))
    image = torch.rand(3, 50, 70)
    ours, theirs = onnx.predict(image, labels, templates="single"), eager.predict(image, labels, templates="single")
    assert (ours.labels == theirs.labels).mean() > 0.99
    torch.testing.assert_close(torch.from_numpy(ours.scores), torch.from_numpy(theirs.scores), atol=1e-4, rtol=0)


def test_segmenter_names_the_missing_extra(tiny_config, monkeypatch):
    from helpers import make_segmenter

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(EncoderUnavailableError, match=r"pip install pacl-fast\[onnx\]"):
        make_segmenter(tiny_config, encoder="onnxruntime")


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory, tiny_config):
    """A local-dir CLIP (open_clip's layout) for the command line."""
    import json

    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("tiny-clip")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": tiny_config}))
    torch.manual_seed(0)
    state = quiet_load_clip(tiny_config).clip.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "open_clip_model.safetensors"))
    return folder


def test_export_command_writes_graphs_that_run(tmp_path, capsys):
    """On the one-block CLIP (embedding width 32): what is proved is the command, its manifest and its cache."""
    import json

    import onnxruntime
    from layouts import write_tiny_clip

    from pacl_fast.cli import main

    clip = write_tiny_clip(tmp_path / "clip", MICRO_CLIP_CONFIG)
    exported = tmp_path / "export"
    argv = ["export", "--format", "onnx", "--out", str(exported), "--clip", f"local-dir:{clip}"]
    argv += ["--method", "pacl", "--device", "cpu", "--image-sizes", "48x80"]  # PACL without weights: it warns
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "pacl-fast: warning: " in err and "untrained" in err  # the untrained embedder, one line
    manifest = json.loads((exported / "manifest.json").read_text())
    assert [(a["tower"], a["input"]["shape"]) for a in manifest["artifacts"]] == [
        ("image", ["B", 3, 48, 80]),
        ("text", ["T", "L"]),  # prompts run at their own length (length_range 1..16)
    ]
    assert manifest["artifacts"][1]["length_range"] == [1, 16]
    image = manifest["artifacts"][0]
    assert image["output"]["shape"] == ["B", 6, 10, 32]
    session = onnxruntime.InferenceSession(str(exported / image["path"]), providers=["CPUExecutionProvider"])
    (patches,) = session.run(None, {"pixels": torch.randn(3, 3, 48, 80).numpy()})
    assert patches.shape == (3, 6, 10, 32)
    # The export folder is a cache: an encoder pointed at it finds the graphs, a second export reuses them.
    stamps = {a["path"]: (exported / a["path"]).stat().st_mtime_ns for a in manifest["artifacts"]}
    assert main(argv) == 0
    assert stamps == {path: (exported / path).stat().st_mtime_ns for path in stamps}
    assert "image 48x80" in capsys.readouterr().out


def test_export_command_without_tensorrt_says_what_to_install(tiny_clip_dir, tmp_path, capsys):
    from pacl_fast.cli import main

    if HAS_TENSORRT and HAS_CUDA:
        pytest.skip("TensorRT and CUDA are present: the export would build an engine")
    argv = ["export", "--format", "tensorrt", "--out", str(tmp_path), "--clip", f"local-dir:{tiny_clip_dir}"]
    argv += ["--method", "pacl"]
    assert main([*argv, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert ("pip install pacl-fast[trt]" in err) or ("needs a CUDA device" in err)
    assert "untrained" in err and "pacl-fast: warning: " in err  # PACL without weights, as one line


def test_cache_dir_environment_variable(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("PACL_FAST_CACHE", str(tmp_path))
    cache = OnnxCache(tiny_model, torch.float32)
    assert cache.root.parent.parent == tmp_path and os.fspath(cache.root).startswith(os.fspath(tmp_path))


# --- the house: encoders/ imports in one direction, no print, short functions (issue 22) ---------------

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
ENCODERS_DIR = ROOT / "pacl_fast" / "encoders"


def encoder_imports(path) -> set[str]:  # noqa: ANN001
    """The ``pacl_fast.encoders`` modules ``path`` imports, also inside functions."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pacl_fast.encoders"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names if (ENCODERS_DIR / f"{a.name}.py").is_file())
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("pacl_fast.encoders"))
    return found


def test_encoder_modules_import_each_other_in_one_direction_only():
    def name(path) -> str:  # noqa: ANN001
        return "pacl_fast.encoders" + ("" if path.stem == "__init__" else f".{path.stem}")

    graph = {name(path): encoder_imports(path) - {name(path)} for path in sorted(ENCODERS_DIR.glob("*.py"))}
    assert graph["pacl_fast.encoders.export"] and graph["pacl_fast.encoders.tensorrt_encoder"]  # the parser sees them

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        return any(n == target or (n not in seen and reaches(n, target, seen | {n})) for n in graph.get(start, ()))

    cycles = sorted(module for module in graph if reaches(module, module, {module}))
    assert cycles == [], f"modules of encoders/ that import themselves through others: {cycles}"


def test_no_print_in_encoders_and_no_function_over_110_lines():
    import ast

    paths = [*sorted(ENCODERS_DIR.glob("*.py")), ROOT / "pacl_fast" / "build.py", ROOT / "pacl_fast" / "segmenter.py"]
    for path in paths:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id != "print", f"{path.name}:{node.lineno}: print in library code (use logging)"
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                assert length <= 110, f"{path.name}: {node.name} is {length} lines long (at most 110)"


def test_the_segmenter_chooses_the_fused_path_by_capability_not_by_name(tiny_config, tiny_pacl, tmp_path):
    """Any encoder declaring ``embedder`` + ``encode_tokens`` (base.FusedEmbedderEncoder) gets the fused PACL
    head, whatever its name; the torch encoder offers it only eagerly and only for PACL."""
    from pacl_fast.encoders.base import FusedEmbedderEncoder, fused_embedder
    from pacl_fast.head import Head
    from pacl_fast.segmenter import Segmenter

    class Wrapped:  # a third-party encoder: delegates to the torch encoder, under another name
        name = "mine"

        def __init__(self, inner: TorchEncoder):
            self.inner, self.dtype = inner, inner.dtype

        def __getattr__(self, attribute: str):  # noqa: ANN204
            return getattr(self.inner, attribute)

        @property
        def embedder(self):  # noqa: ANN201
            return self.inner.embedder

        def encode_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
            return self.inner.encode_tokens(pixels)

    eager = TorchEncoder(tiny_pacl)
    assert isinstance(eager, FusedEmbedderEncoder) and fused_embedder(eager) is tiny_pacl.embedder
    assert fused_embedder(make_encoder("onnxruntime", tiny_pacl, cache_dir=tmp_path)) is None  # no such capability
    from pacl_fast.methods import TrainingFreeCLIP

    assert fused_embedder(TorchEncoder(TrainingFreeCLIP(tiny_pacl.backbone, "naclip"))) is None  # no embedder
    mine = Segmenter(tiny_pacl, encoder=Wrapped(eager), head=Head("triton"))
    plain = Segmenter(tiny_pacl, encoder=eager, head=Head("reference"))
    assert mine.fused_embedder and not plain.fused_embedder and "encoder=mine" in repr(mine)
    calls = []
    mine.encoder.encode_tokens = lambda pixels: calls.append(pixels.shape) or eager.encode_tokens(pixels)
    pixels, classes = torch.randn(2, 3, 40, 64), torch.nn.functional.normalize(torch.randn(3, 64), dim=-1)
    expected = plain.patch_logits(pixels, classes)
    torch.testing.assert_close(mine.patch_logits(pixels, classes), expected, atol=1e-5, rtol=0)
    assert calls == [(2, 3, 40, 64)]  # the tokens path ran


# --- cache entries broken in any shape are rebuilt once; an unwritable cache is still used (issue 23) ----


def onnx_breakages(key_folder):  # noqa: ANN001, ANN201
    """name -> (a function breaking the 64x128 entry in ``key_folder`` (onnx/<key>), the reason it is named by)."""
    entry = key_folder / "image-64x128"

    def replace_by_file(path, data=b"not a folder") -> None:  # noqa: ANN001
        import shutil

        shutil.rmtree(path)
        path.write_bytes(data)

    def edit_record(change) -> None:  # noqa: ANN001
        import json

        record = json.loads((entry / "entry.json").read_text())
        change(record)
        (entry / "entry.json").write_text(json.dumps(record))

    def onnx_to_folder() -> None:
        (entry / "model.onnx").unlink()
        (entry / "model.onnx").mkdir()

    def garbage_graph() -> None:
        size = (entry / "model.onnx").stat().st_size
        (entry / "model.onnx").write_bytes(b"\x07" * size)  # the recorded size, not a graph

    def fifo_record() -> None:
        (entry / "entry.json").unlink()
        os.mkfifo(entry / "entry.json")

    return {
        "entry is a file": (lambda: replace_by_file(entry), "it is not a folder"),
        "key folder is a file": (lambda: replace_by_file(key_folder), "should be a folder"),
        "model.onnx is a folder": (onnx_to_folder, "model.onnx is not a regular file"),
        "model.onnx missing": (lambda: (entry / "model.onnx").unlink(), "model.onnx is missing"),
        "weights truncated": (
            lambda: (entry / "model.onnx.data").write_bytes((entry / "model.onnx.data").read_bytes()[:100]),
            "model.onnx.data has 100 bytes",
        ),
        "garbage graph": (garbage_graph, "not a readable ONNX file"),
        "record truncated": (
            lambda: (entry / "entry.json").write_text((entry / "entry.json").read_text()[:20]),
            "entry.json is not valid JSON",
        ),
        "record missing": (lambda: (entry / "entry.json").unlink(), "entry.json is missing"),
        "record forged outside": (
            lambda: edit_record(lambda r: r["files"].update({"../../../etc/passwd": 1})),
            "names a file outside its folder",
        ),
        "record forged sizes": (
            lambda: edit_record(lambda r: r["files"].update({"model.onnx": 3})),
            "model.onnx has",
        ),
        "record nested": (lambda: (entry / "entry.json").write_text("[" * 100_000), "entry.json is not valid JSON"),
        "record is a FIFO": (fifo_record, "entry.json cannot be read"),
        "record not an object": (lambda: (entry / "entry.json").write_text("[1, 2]"), "not a JSON object"),
    }


def test_a_broken_onnx_entry_of_any_shape_is_rebuilt_once(tmp_path, caplog):
    """Issue 23 item 6: a file at onnx/<key>/image-64x128 failed every 64x128 image on every run. On the
    one-block CLIP: the cache's logic does not depend on depth, and the 14 exports here cost half as much."""
    from pacl_fast.encoders.export import entry_problem

    model = make_model(MICRO_CLIP_CONFIG)
    caplog.set_level("WARNING", logger="pacl_fast.encoders")
    pixels = torch.randn(2, 3, 64, 128)
    expected = reference_patches(model, pixels)
    first = make_encoder("onnxruntime", model, cache_dir=tmp_path)
    torch.testing.assert_close(first.encode_image(pixels), expected, atol=FP32_ATOL["tiny"], rtol=0)
    key_folder = first.cache.root
    entry = key_folder / "image-64x128"
    assert entry_problem(entry) is None
    for case, (breakage, reason) in onnx_breakages(key_folder).items():
        breakage()
        caplog.clear()
        encoder = make_encoder("onnxruntime", model, cache_dir=tmp_path)
        torch.testing.assert_close(encoder.encode_image(pixels), expected, atol=FP32_ATOL["tiny"], rtol=0)
        assert reason in caplog.text and str(key_folder) in caplog.text, (case, caplog.text)
        assert entry_problem(entry) is None, case  # whole again, where it belongs
        caplog.clear()
        make_encoder("onnxruntime", model, cache_dir=tmp_path).encode_image(pixels[:1])
        assert caplog.text == "", (case, caplog.text)  # the next run reuses it: rebuilt once
    assert sorted(p.name for p in key_folder.iterdir()) == ["image-64x128"]  # no temporary folders left


def test_a_graph_the_runtime_cannot_load_is_rebuilt_once_then_named(tmp_path, caplog):
    """The store's own contract, on file entries (TensorRT's shape): a folder where the file belongs, a file
    its runtime refuses once, and a file it refuses right after building it (an error naming the entry)."""
    from pacl_fast.encoders.artifacts import ArtifactStore, file_problem
    from pacl_fast.files import atomic_write

    caplog.set_level("WARNING", logger="pacl_fast.encoders")
    store = ArtifactStore(tmp_path, "kind/key", "Thing")
    builds = []

    def build(path):  # noqa: ANN001, ANN202
        builds.append(path)
        return atomic_write(path, b"good")

    def load(path):  # noqa: ANN001, ANN202
        data = path.read_bytes()
        if data != b"good":
            raise RuntimeError(f"cannot deserialise {data[:4]!r}\nsecond line")
        return data

    assert store.get("a.bin", "the thing", build, load, problem=file_problem) == b"good" and len(builds) == 1
    assert store.get("a.bin", "the thing", build, load, problem=file_problem) == b"good" and len(builds) == 1
    (tmp_path / "kind/key/a.bin").unlink()
    (tmp_path / "kind/key/a.bin").mkdir()  # a folder where the file belongs
    assert store.get("a.bin", "the thing", build, load, problem=file_problem) == b"good" and len(builds) == 2
    assert "Thing cache entry" in caplog.text and "it is not a regular file" in caplog.text
    (tmp_path / "kind/key/a.bin").write_bytes(b"stale")
    caplog.clear()
    assert store.get("a.bin", "the thing", build, load, problem=file_problem) == b"good" and len(builds) == 3
    assert "is broken (it failed to load: cannot deserialise b'stal'); building it again" in caplog.text

    def bad_build(path):  # noqa: ANN001, ANN202
        return atomic_write(path, b"bad")

    with pytest.raises(RuntimeError, match=r"Thing cannot load the thing it built in .*b\.bin: cannot deserialise"):
        store.get("b.bin", "the thing", bad_build, load, problem=file_problem)


def run_as_nobody(function):  # noqa: ANN001, ANN201
    """``function()`` where a read-only folder is read-only: here when not root, else in a forked child that
    drops to the ``nobody`` user (root writes through permissions). Its return value is pickled back."""
    import multiprocessing
    import pickle

    if os.geteuid() != 0:
        return function()
    context = multiprocessing.get_context("fork")
    reader, writer = context.Pipe(duplex=False)

    def child() -> None:
        torch.set_num_threads(1)  # OpenMP's pool does not survive fork: run single-threaded
        try:
            os.setgid(65534)
            os.setuid(65534)
            result = ("ok", function())
        except BaseException as error:  # noqa: BLE001 - carried back to the parent
            result = ("error", f"{type(error).__name__}: {error}")
        writer.send_bytes(pickle.dumps(result))

    process = context.Process(target=child)
    process.start()
    status, value = pickle.loads(reader.recv_bytes())
    process.join(60)
    assert status == "ok", value
    return value


def read_only_tree(folder) -> None:  # noqa: ANN001
    for path in sorted(folder.rglob("*"), reverse=True):
        path.chmod(0o555 if path.is_dir() else 0o444)
    folder.chmod(0o555)


def test_a_read_only_cache_is_read_and_what_is_missing_is_built_in_a_temporary_folder():
    """Issue 23 item 5: ``--encoder onnxruntime`` with a read-only cache was a traceback. Cached graphs are
    read from it; missing ones (here two: an image size and the text tower) are exported into a temporary
    folder, with one warning saying what it costs. On the one-block CLIP: what is proved is the cache's."""
    import logging
    import shutil
    import tempfile
    from pathlib import Path

    model = make_model(MICRO_CLIP_CONFIG)
    base = Path(tempfile.mkdtemp(prefix="pacl-read-only-"))
    base.chmod(0o755)
    cache = base / "cache"
    try:
        make_encoder("onnxruntime", model, cache_dir=cache).image_session((48, 80))  # cached before
        read_only_tree(cache)
        before = sorted(p.relative_to(cache) for p in cache.rglob("*"))
        torch.manual_seed(11)
        pixels = {size: torch.randn(2, 3, *size) for size in ((48, 80), (40, 56))}  # cached, missing
        tokens = model.backbone.tokenize(PROMPTS[:3])

        def run() -> tuple:
            records = []
            handler = logging.Handler(logging.WARNING)
            handler.emit = records.append
            logging.getLogger("pacl_fast.encoders").addHandler(handler)
            encoder = make_encoder("onnxruntime", model, cache_dir=cache)
            patches = {size: encoder.encode_image(p) for size, p in pixels.items()}
            texts = encoder.encode_text(tokens)
            return patches, texts, [r.getMessage() for r in records]

        patches, texts, warnings_seen = run_as_nobody(run)
        for size, got in patches.items():
            torch.testing.assert_close(got, reference_patches(model, pixels[size]), atol=FP32_ATOL["tiny"], rtol=0)
        torch.testing.assert_close(texts, reference_outputs(model, pixels[(40, 56)], tokens)[1], atol=1e-5, rtol=0)
        assert len(warnings_seen) == 1, warnings_seen  # one warning for the run, not one per graph
        assert f"the encoder cache {cache} cannot be written" in warnings_seen[0]
        assert "every run pays the export again" in warnings_seen[0]
        assert sorted(p.relative_to(cache) for p in cache.rglob("*")) == before  # nothing written there
    finally:
        for path in [base, *base.rglob("*")]:
            path.chmod(0o755)
        shutil.rmtree(base)


def test_exporting_into_a_read_only_folder_fails_in_one_line(tiny_clip_dir):
    import contextlib
    import io
    import shutil
    import tempfile
    from pathlib import Path

    from pacl_fast.cli import main

    base = Path(tempfile.mkdtemp(prefix="pacl-read-only-out-"))
    shutil.copytree(tiny_clip_dir, base / "clip")
    for path in [base, *base.rglob("*")]:
        path.chmod(0o755)
    out = base / "out"
    out.mkdir()
    read_only_tree(out)
    argv = ["export", "--format", "onnx", "--out", str(out), "--clip", f"local-dir:{base / 'clip'}"]
    argv += ["--method", "maskclip", "--device", "cpu", "--image-sizes", "48x80"]

    def run() -> tuple[int, str]:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            return main(argv), err.getvalue()

    try:
        code, err = run_as_nobody(run)
        assert code == 2 and list(out.iterdir()) == []
        assert f"pacl-fast export: error: cannot write the export folder {out}" in err and "Traceback" not in err
    finally:
        out.chmod(0o755)
        shutil.rmtree(base)
