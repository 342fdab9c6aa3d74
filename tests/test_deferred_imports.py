"""pacl_fast/deferred_imports.py: open_clip imported without torchvision's and timm's package ``__init__``, which run
at first use, after which everything is as a plain import makes it."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from pacl_fast import deferred_imports
from pacl_fast.deferred_imports import deferring, waiting

ROOT = Path(__file__).resolve().parent.parent


def make_package(root: Path, name: str) -> None:
    """``name``: an ``__init__`` that logs its run and imports its subpackage; ``sub`` (logs too, imports ``leaf``
    with ``from . import``); a plain module ``leaf``; a module ``reader`` reading a name only ``__init__`` defines."""
    package = root / name
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text(
        "import builtins\nbuiltins.RUNS.append(__name__)\nDEFINED_BY_INIT = 42\nfrom . import sub\n"
    )
    (package / "sub" / "__init__.py").write_text(
        "import builtins\nbuiltins.RUNS.append(__name__)\nfrom . import leaf\nSUB_VALUE = leaf.VALUE + 1\n"
    )
    (package / "sub" / "leaf.py").write_text("import builtins\nbuiltins.RUNS.append(__name__)\nVALUE = 7\n")
    (package / "sub" / "reader.py").write_text("from . import leaf\nfrom .leaf import VALUE\nDOUBLE = 2 * VALUE\n")


@pytest.fixture()
def package(tmp_path, monkeypatch):
    """A fresh package on sys.path, the log of which ``__init__`` ran, and the package's name."""
    import builtins

    name = f"deferme_{tmp_path.name.replace('-', '_')}"
    make_package(tmp_path, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(builtins, "RUNS", [], raising=False)
    yield builtins.RUNS, name
    for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[module]


def test_a_deferred_package_waits_and_then_is_the_plain_module(package):
    runs, name = package
    with deferring([name, f"{name}.sub"]):
        leaf = __import__(f"{name}.sub.leaf", fromlist=["VALUE"])
        reader = __import__(f"{name}.sub.reader", fromlist=["DOUBLE"])  # ``from . import leaf`` inside: no load
    top, sub = sys.modules[name], sys.modules[f"{name}.sub"]
    assert runs == [f"{name}.sub.leaf"] and leaf.VALUE == 7 and reader.DOUBLE == 14
    assert waiting(top) and waiting(sub)
    assert top.__name__ == name and sub.__path__ and top.sub is sub  # what the import system set: no load
    assert runs == [f"{name}.sub.leaf"]
    assert sub.SUB_VALUE == 8  # first use: the package above first, as a plain import runs them, then this one
    assert runs == [f"{name}.sub.leaf", name, f"{name}.sub"]
    assert type(top) is types.ModuleType and type(sub) is types.ModuleType and top.DEFINED_BY_INIT == 42
    assert top.__loader__ is top.__spec__.loader and type(top.__loader__).__name__ == "SourceFileLoader"
    assert not top.__spec__._initializing
    assert sys.modules[name] is top and sys.modules[f"{name}.sub"] is sub
    sub.SUB_VALUE  # noqa: B018 - nothing runs twice
    assert runs.count(name) == 1 and runs.count(f"{name}.sub") == 1


def test_dir_and_vars_load_it_and_nothing_waits_outside_the_block(package):
    runs, name = package
    with deferring([name]):
        __import__(name)
    assert waiting(sys.modules[name]) and runs == []
    assert "DEFINED_BY_INIT" in dir(sys.modules[name]) and runs == [name, f"{name}.sub", f"{name}.sub.leaf"]
    assert deferred_imports._FINDER not in sys.meta_path and not deferred_imports._ACTIVE


def test_an_error_in_a_deferred_init_is_raised_at_first_use(package, tmp_path):
    _, name = package
    (tmp_path / name / "__init__.py").write_text("raise ImportError('broken install')\n")
    with deferring([name]):
        module = __import__(name)
    with pytest.raises(ImportError, match="broken install"):
        module.anything  # noqa: B018


def test_packages_not_installed_fail_as_usual():
    with deferring(["no_such_package_here"]), pytest.raises(ModuleNotFoundError):
        __import__("no_such_package_here")


PROBE = r"""
import hashlib, json, sys, warnings
import torch
warnings.simplefilter("ignore")
if sys.argv[1] == "deferred":
    import pacl_fast  # arranges the deferral of open_clip's import
import open_clip
names = ("torchvision", "torchvision.ops", "torchvision.models", "timm", "torch._dynamo", "timm.models")
before = {name: (name in sys.modules, type(sys.modules.get(name)).__name__) for name in names}
import torchvision, timm, torchvision.ops, torchvision.models
surface = {name: sorted(dir(sys.modules[name])) for name in ("torchvision", "torchvision.ops", "torchvision.models",
                                                             "timm")}
torch.manual_seed(0)
vision = {"timm_model_name": "vit_tiny_patch16_224", "timm_model_pretrained": False, "timm_pool": "",
          "timm_proj": "linear", "image_size": 224}
text = {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}
clip = open_clip.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text)
with torch.no_grad():
    image = clip.encode_image(torch.randn(1, 3, 224, 224))
boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]], dtype=torch.float32)
kept = torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5).tolist()
resnet = torchvision.models.resnet18(num_classes=3)
size = sum(p.numel() for p in resnet.parameters())
print(json.dumps({"before": before, "surface": surface, "kept": kept, "resnet": size,
                  "timm_tower": hashlib.sha256(image.numpy().tobytes()).hexdigest(),
                  "frozen_bn": type(open_clip.utils.freeze_batch_norm_2d(torch.nn.BatchNorm2d(3))).__name__}))
"""


@pytest.mark.skipif(
    not all(__import__("importlib").util.find_spec(n) for n in ("torchvision", "timm")), reason="needs both"
)
def test_open_clip_imports_without_them_and_they_work_as_plainly_imported():
    """In a fresh process: with pacl_fast imported first, ``import open_clip`` leaves torchvision's and timm's
    ``__init__`` (and torch._dynamo, which torchvision's detection ops import) unrun; then a timm-based open_clip
    tower, torchvision's ops and models and open_clip's FrozenBatchNorm2d work, and give what a process that
    imported open_clip plainly gives, with the same names in each package."""

    def probe(kind: str) -> dict:
        done = subprocess.run([sys.executable, "-c", PROBE, kind], capture_output=True, text=True, cwd=ROOT,
                              timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    deferred, plain = probe("deferred"), probe("plain")
    assert deferred["before"] == {
        "torchvision": [True, "DeferredPackage"],
        "torchvision.ops": [True, "DeferredPackage"],
        "torchvision.models": [True, "DeferredPackage"],
        "timm": [True, "DeferredPackage"],
        "torch._dynamo": [False, "NoneType"],
        "timm.models": [False, "NoneType"],
    }
    assert plain["before"]["torch._dynamo"] == [True, "module"] and plain["before"]["timm"] == [True, "module"]
    assert deferred["surface"] == plain["surface"]
    assert deferred["kept"] == plain["kept"] == [0, 2]
    assert deferred["resnet"] == plain["resnet"]
    assert deferred["timm_tower"] == plain["timm_tower"]
    assert deferred["frozen_bn"] == plain["frozen_bn"] == "FrozenBatchNorm2d"
