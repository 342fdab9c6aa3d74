"""What ``pacl_fast/encoders/tensorrt_encoder.py`` decides before TensorRT or a GPU does anything, checked on
the CPU: the version check, the GPU slug in engine cache paths, device/dtype/``max_batch`` validation, the
TensorRT -> torch dtype table and the build progress bars.

TensorRT and CUDA are third-party: a stand-in ``tensorrt`` module goes into ``sys.modules`` and
``torch.cuda``'s device queries are replaced for the test; nothing of pacl_fast is replaced. The model that
"lives on a GPU" is a real PACL whose tensors are torch fake tensors on ``cuda`` (no data, no device).
"""

from __future__ import annotations

import enum
import sys
import types

import pytest
import torch
from helpers import quiet_load_clip
from torch._subclasses.fake_tensor import FakeTensorMode

from pacl_fast.encoders import EncoderUnavailableError, make_encoder
from pacl_fast.encoders import tensorrt_encoder as trt_encoder
from pacl_fast.model import PACL


def stand_in_tensorrt(version: str, *, bf16: bool = True) -> types.ModuleType:
    """The bits of the ``tensorrt`` module that the encoder reads before building anything."""
    module = types.ModuleType("tensorrt")
    module.__version__ = version
    names = ["FLOAT", "HALF", "INT8", "INT32", "INT64", *(["BF16"] if bf16 else [])]
    module.DataType = enum.Enum("DataType", names)

    class IProgressMonitor:
        def __init__(self) -> None:
            pass

    module.IProgressMonitor = IProgressMonitor
    return module


@pytest.fixture()
def tensorrt(monkeypatch):
    """Install a stand-in TensorRT 10.3; returns a function that installs another version."""

    def install(version: str = "10.3.0.26", **kwargs) -> types.ModuleType:
        module = stand_in_tensorrt(version, **kwargs)
        monkeypatch.setitem(sys.modules, "tensorrt", module)
        return module

    install()
    return install


@pytest.mark.parametrize("version", ["10.1.0", "10.3.0.26", "10.13.2.6", "11.0.0", "10.1.0.post12.dev4"])
def test_supported_versions_are_accepted(tensorrt, version):
    module = tensorrt(version)
    assert trt_encoder.import_tensorrt() is module


@pytest.mark.parametrize("version", ["10.0.1.6", "9.3.0", "8.6.1.post1", "7.2"])
def test_old_versions_are_refused_with_the_version_found(tensorrt, version):
    """Numeric comparison: 8.6 and 9.3 are older than 10.1 even though they sort after it as strings."""
    tensorrt(version)
    with pytest.raises(EncoderUnavailableError, match=rf"needs TensorRT >= 10\.1, found {version}.*pip install -U"):
        trt_encoder.import_tensorrt()


def test_missing_tensorrt_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    with pytest.raises(EncoderUnavailableError, match=r"not installed: pip install pacl-fast\[trt\]"):
        trt_encoder.import_tensorrt()


@pytest.mark.parametrize(
    "name, capability, slug",
    [
        ("NVIDIA H200", (9, 0), "NVIDIA-H200-sm90"),
        ("NVIDIA GeForce RTX 4090 Laptop GPU", (8, 9), "NVIDIA-GeForce-RTX-4090-Laptop-GPU-sm89"),
        ("  Tesla T4 (PCIe) / 16GB ", (7, 5), "Tesla-T4-PCIe-16GB-sm75"),
        ("A100-SXM4-80GB", (8, 0), "A100-SXM4-80GB-sm80"),
    ],
)
def test_gpu_slug_is_a_safe_path_part_per_gpu_model(monkeypatch, name, capability, slug):
    """Engines are GPU-specific: the slug names the model and compute capability, and is one path component."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert trt_encoder.gpu_slug(torch.device("cuda", 0)) == slug


def test_torch_dtypes_of_engine_tensors(tensorrt):
    module = tensorrt()
    table = {
        module.DataType.FLOAT: torch.float32,
        module.DataType.HALF: torch.float16,
        module.DataType.INT32: torch.int32,
        module.DataType.INT64: torch.int64,
        module.DataType.BF16: torch.bfloat16,
    }
    for trt_dtype, dtype in table.items():
        assert trt_encoder._torch_dtype(module, trt_dtype) is dtype
    with pytest.raises(KeyError):
        trt_encoder._torch_dtype(module, module.DataType.INT8)  # never an input or output of ours
    older = tensorrt(bf16=False)  # a TensorRT without BF16 still maps the others
    assert trt_encoder._torch_dtype(older, older.DataType.HALF) is torch.float16


@pytest.fixture(scope="module")
def cpu_model(tiny_config) -> PACL:
    return PACL(quiet_load_clip(tiny_config)).eval()


@pytest.fixture()
def gpu_model(tiny_config, monkeypatch) -> PACL:
    """A tiny PACL on a CUDA device that torch now says it has (fake tensors: shapes and devices only)."""
    model = PACL(quiet_load_clip(tiny_config)).eval()
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert model.backbone.visual.conv1.weight.device.type == "cuda"
    return model


def test_without_cuda_the_encoder_says_so(tensorrt, cpu_model, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(EncoderUnavailableError, match="needs a CUDA device, and torch sees none"):
        make_encoder("tensorrt", cpu_model)


def test_a_model_on_the_cpu_is_refused_when_cuda_exists(tensorrt, cpu_model, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ValueError, match=r"needs the model on a CUDA device, it is on cpu \(pass device='cuda'\)"):
        make_encoder("tensorrt", cpu_model)


@pytest.mark.parametrize("dtype", [torch.bfloat16, "bf16"])
def test_only_float16_and_float32_engines(tensorrt, gpu_model, dtype):
    with pytest.raises(ValueError, match=r"builds float16 or float32 engines, got dtype=torch.bfloat16"):
        make_encoder("tensorrt", gpu_model, dtype)


@pytest.mark.parametrize("max_batch", [0, -3])
def test_max_batch_must_be_positive(tensorrt, gpu_model, max_batch):
    with pytest.raises(ValueError, match=rf"max_batch must be >= 1, got {max_batch}"):
        make_encoder("tensorrt", gpu_model, torch.float16, max_batch=max_batch)


def test_build_progress_draws_one_bar_per_phase_and_never_cancels(tensorrt):
    """TensorRT calls the monitor from its threads: nested phases get their own bars, closed when they end."""
    monitor = trt_encoder._progress_monitor(tensorrt(), "TensorRT image-64x64-b4")
    monitor.phase_start("Building", None, 3)
    monitor.phase_start("Tactics", "Building", 10)
    assert all(monitor.step_complete("Tactics", step) for step in range(10))
    assert monitor.bars["Tactics"].n == 10 and monitor.bars["Tactics"].total == 10
    monitor.phase_finish("Tactics")
    assert monitor.step_complete("Building", 1) and monitor.bars["Building"].n == 2
    assert monitor.step_complete("Unknown phase", 0)  # a step of a phase never started is ignored
    monitor.phase_finish("Building")
    monitor.phase_finish("Building")  # finishing twice is harmless
    assert monitor.bars == {}


def test_engine_cache_paths_separate_every_key():
    """Engines are specific to the weights/method/precision (export key), TensorRT version, GPU, size and profile."""
    from pathlib import Path

    root = Path("/cache")
    folders = {
        trt_encoder.engine_folder(root, f"{method}-{dtype}-{weights}", version, gpu)
        for method in ("pacl", "naclip")
        for dtype in ("fp16", "fp32")
        for weights in ("0123abcd", "4567ef01")
        for version in ("10.1.0", "10.9.0")
        for gpu in ("NVIDIA-H200-sm90", "NVIDIA-A100-SXM4-80GB-sm80")
    }
    assert len(folders) == 32 and all(folder.parent == root / "tensorrt" for folder in folders)
    names = {trt_encoder.engine_name(size, batch) for size in ((224, 288), (288, 224), (448, 448)) for batch in (1, 32)}
    assert len(names) == 6 and all(name.endswith(".engine") for name in names)


def test_bad_arguments_are_reported_before_tensorrt_is_needed(monkeypatch, cpu_model):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # TensorRT absent: the argument errors still come first
    model = cpu_model
    with pytest.raises(ValueError, match="builds float16 or float32 engines"):
        trt_encoder.TensorRTEncoder(model, torch.bfloat16)
    with pytest.raises(ValueError, match="max_batch must be >= 1"):
        trt_encoder.TensorRTEncoder(model, torch.float16, max_batch=0)
    with pytest.raises(EncoderUnavailableError, match="pip install pacl-fast\\[trt\\]"):
        trt_encoder.TensorRTEncoder(model, torch.float16)
