"""train/train.py on tiny models: learning, options, checkpoints and exact resume, DDP on 2 CPU processes.

Runs go through ``train.train.main`` in this process (a subprocess costs seconds of imports) except
where the test is about processes: the hard kill (SIGKILL) and torchrun.
"""

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import open_clip
import pytest
import torch
from helpers import make_segmenter, png_bytes, write_shard
from open_clip.loss import ClipLoss
from safetensors.torch import load_file

from pacl_fast.backbone import OPENAI_MEAN, OPENAI_STD, RandomWeightsWarning, load_clip
from pacl_fast.data.synthetic import CLASS_NAMES, SyntheticSegmentation, WorldConfig, render_scene
from pacl_fast.images import normalize
from pacl_fast.model import PACL, contrastive_loss
from pacl_fast.weights import read_pacl_weights
from train.checkpoints import KEEP_CHECKPOINTS, CheckpointError, checkpoint_path, read_checkpoint, state_checksum
from train.config import TrainConfig, build_parser
from train.stages import PaclStage, export_clip, lr_factor, parameter_groups
from train.train import main

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "train" / "train.py")
TINY = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
FAST = ["--workers", "0", "--log-every", "1", "--warmup", "2", "--image-size", "32"]
# The shared PACL run: 24 steps of 16 pairs, checkpoints every 6 steps (18 and 24 are kept).
PACL_STEPS, PACL_SAVE = 24, 6


def train(*args: str) -> tuple[int, str]:
    """``train/train.py ARGS`` in this process: (exit code, what it wrote to stderr)."""
    err = sys.stderr
    sys.stderr = capture = _Capture()
    try:
        code = main([str(a) for a in args])
    finally:
        sys.stderr = err
    return code, capture.text


class _Capture:
    def __init__(self):
        self.text = ""

    def write(self, text):
        self.text += text

    def flush(self):
        pass


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and OpenMP threads spinning on a shared CPU cost 10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def subprocess_env():
    threads = str(torch.get_num_threads())  # as in this process, so that the numbers are the same
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=threads)


def run_script(args, **kwargs):
    return subprocess.run(
        [sys.executable, *map(str, args)], capture_output=True, text=True, env=subprocess_env(), timeout=600, **kwargs
    )


def log_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """Two random tiny CLIPs of one architecture in open_clip's local-dir layout, as the clip stage exports."""
    folder = tmp_path_factory.mktemp("clip")
    (folder / "config.json").write_text(json.dumps(TINY))
    for seed, name in ((0, "export"), (1, "other")):
        torch.manual_seed(seed)
        export_clip(open_clip.CLIP(**TINY), TINY, (0.5,) * 3, (0.25,) * 3, folder / name)
    return folder


def quiet_clip(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        return load_clip(f"local-dir:{path}")


def held_out_batch(backbone, count=32):
    """32 scenes of the validation seed, preprocessed as training does."""
    scenes = [render_scene(i, seed=1, config=WorldConfig(image_size=32)) for i in range(count)]
    pixels = torch.stack([torch.from_numpy(s.image).permute(2, 0, 1) for s in scenes]).float() / 255
    mean, std = backbone.mean_std if backbone is not None else (OPENAI_MEAN, OPENAI_STD)
    return normalize(pixels, mean, std), [s.caption for s in scenes]


def held_out_clip_loss(model) -> float:
    pixels, captions = held_out_batch(None)
    tokens = open_clip.SimpleTokenizer(context_length=24)(captions)
    with torch.no_grad():
        image, text, scale = model(pixels, tokens)[:3]
        return float(ClipLoss()(image, text, scale))


def pacl_model(clip_dir, weights=None) -> PACL:
    """A PACL on the tiny CLIP: untrained (the embedder starts as CLIP's projection, its MLP branch
    silent, so the output does not depend on the seed) or with exported weights."""
    model = PACL(quiet_clip(clip_dir))
    if weights is not None:
        model.load_trainable_state_dict(read_pacl_weights(weights)[0])
    return model


@pytest.fixture(scope="module")
def pacl_run(tiny_clip_dir, tmp_path_factory):
    """The shared PACL-stage run (fp32, synthetic world): its folder and the warnings it raised."""
    out = tmp_path_factory.mktemp("pacl") / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, err = train(*pacl_args(tiny_clip_dir, out))
    assert code == 0, err[-2000:]
    return out, caught


def pacl_args(clip_dir, out, *extra, clip="export"):
    return [
        "--stage", "pacl", "--clip", f"local-dir:{clip_dir / clip}", "--out", out, "--steps", PACL_STEPS,
        "--batch-size", 16, "--lr", 5e-3, "--min-lr-ratio", 0.1, "--save-every", PACL_SAVE, *FAST, *extra,
    ]  # fmt: skip


def exported(out: Path) -> dict[str, torch.Tensor]:
    return read_pacl_weights(out / "pacl.safetensors")[0]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ------------------------------------------------------------------------------------ learning


def test_clip_stage_learns_and_exports_an_open_clip_local_dir(tmp_path, tiny_clip_dir):
    before = held_out_clip_loss(open_clip.create_model(f"local-dir:{tiny_clip_dir / 'export'}"))
    out = tmp_path / "run"
    code, err = train(
        "--stage", "clip", "--clip-config", tiny_clip_dir / "config.json", "--out", out, "--steps", 30,
        "--batch-size", 32, "--lr", 3e-3, *FAST,
    )  # fmt: skip
    assert code == 0, err[-2000:]
    after = held_out_clip_loss(open_clip.create_model(f"local-dir:{out / 'export'}"))
    assert after < before - 0.15, (before, after)  # measured: 3.70 -> 3.46
    log = log_of(out)
    assert [r["step"] for r in log] == list(range(1, 31))
    assert {"loss", "lr", "logit_scale", "images_per_s", "skipped"} <= set(log[-1])


def test_pacl_stage_learns_moves_the_embedder_and_warns_nothing(pacl_run, tiny_clip_dir):
    out, caught = pacl_run
    untrained = pacl_model(tiny_clip_dir / "export")
    trained = pacl_model(tiny_clip_dir / "export", out / "pacl.safetensors")
    pixels, captions = held_out_batch(untrained.backbone)
    tokens = untrained.backbone.tokenize(captions)
    with torch.no_grad():
        before, after = float(untrained.loss(pixels, tokens)), float(trained.loss(pixels, tokens))
    assert after < before - 0.2, (before, after)  # measured: 3.93 -> about 3.5
    weights = exported(out)
    assert float(weights["embedder.fc2.weight"].abs().max()) > 1e-3  # the MLP branch starts at zero
    moved = weights["embedder.linear.weight"] - untrained.embedder.linear.weight.detach()
    assert float(moved.abs().max()) > 1e-3
    assert not [w for w in caught if "requires_grad" in str(w.message)]  # float(loss) of a graph


# --------------------------------------------------------------------------------- precision


def stage(tiny_clip_dir, precision):
    config = TrainConfig(stage="pacl", out=Path("unused"), clip=f"local-dir:{tiny_clip_dir / 'export'}")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        made = PaclStage(replace(config, precision=precision), torch.device("cpu"))
    torch.nn.init.normal_(made.model.embedder.fc2.weight, std=0.05)  # a live MLP branch
    return made


def test_pacl_fast_path_losses_match_the_plain_formulation(tiny_clip_dir):
    """fp32: the training forward is PACL.forward, bit for bit; bf16 (frozen CLIP in bf16 weights, the
    embedder under autocast) within 0.03 of it (measured: 2e-4 to 9e-3), gradients aligned (cosine >= 0.9998)."""
    from pacl_fast.distributed import DistInfo

    generator = torch.Generator().manual_seed(5)
    pixels = torch.randn(6, 3, 32, 40, generator=generator)  # non-square: a 4x5 grid
    tokens = open_clip.SimpleTokenizer(context_length=24)([f"a photo of {i} red circles" for i in range(6)])
    fp32, bf16 = stage(tiny_clip_dir, "fp32"), stage(tiny_clip_dir, "bf16")
    bf16.model.load_trainable_state_dict(fp32.model.trainable_state_dict())

    plain = contrastive_loss(*fp32.model(pixels, tokens))
    fast, _ = fp32.loss(fp32.module, pixels, tokens, DistInfo())
    assert torch.equal(plain, fast)
    fast.backward()
    seen = {}  # every frozen module called: was autocast or autograd on?

    def record(module, args):
        seen[module] = (torch.is_autocast_enabled("cpu"), torch.is_grad_enabled())

    hooks = [m.register_forward_pre_hook(record) for m in bf16.model.backbone.modules()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, _ = bf16.loss(bf16.module, pixels, tokens, DistInfo())
    low.backward()
    for hook in hooks:
        hook.remove()
    assert bf16.model.backbone.visual.transformer in seen and set(seen.values()) == {(False, False)}
    assert bf16.model.backbone.visual.conv1.weight.dtype == torch.bfloat16
    assert fp32.model.backbone.visual.conv1.weight.dtype == torch.float32
    assert not any(p.requires_grad for p in bf16.model.backbone.parameters())
    assert abs(low.item() - fast.item()) < 0.03, (low.item(), fast.item())
    for name in ("linear", "fc1", "fc2"):
        a = getattr(fp32.model.embedder, name).weight.grad.flatten()
        b = getattr(bf16.model.embedder, name).weight.grad.flatten().float()
        assert float(torch.nn.functional.cosine_similarity(a, b, dim=0)) > 0.999, name
    # DDP leaves the frozen CLIP alone: every backbone tensor, nothing that trains
    frozen = set(bf16.frozen_names())
    assert frozen == {f"model.{n}" for n, _ in bf16.model.named_parameters() if n.startswith("backbone.")} | {
        f"model.{n}" for n, _ in bf16.model.named_buffers() if n.startswith("backbone.")
    }
    assert frozen and not frozen & {f"model.{n}" for n in bf16.model.trainable_state_dict()}


def test_bf16_run_and_fp16_refused_on_cpu(pacl_run, tiny_clip_dir, tmp_path):
    out, _ = pacl_run
    code, err = train(*pacl_args(tiny_clip_dir, tmp_path / "bf16", "--precision", "bf16", "--steps", 2))
    assert code == 0, err[-2000:]
    first_fp32, first_bf16 = log_of(out)[0]["loss"], log_of(tmp_path / "bf16")[0]["loss"]
    assert first_bf16 != first_fp32 and abs(first_bf16 - first_fp32) < 0.03  # same init and batch, bf16 numbers

    code, err = train(*pacl_args(tiny_clip_dir, tmp_path / "fp16", "--precision", "fp16"))
    assert code == 2 and "--precision fp16 needs CUDA" in err and "Traceback" not in err
    assert not (tmp_path / "fp16").exists()


def test_bf16_training_step_runs_the_embedder_under_autocast_and_the_clip_in_bf16(tiny_clip_dir, tmp_path):
    """The fast path: frozen CLIP weights cast to bf16, only the trained embedder under autocast."""
    from train.train import Trainer

    config = TrainConfig(
        stage="pacl", out=tmp_path, clip=f"local-dir:{tiny_clip_dir / 'export'}", precision="bf16",
        batch_size=4, steps=10, warmup=1, device="cpu",
    )  # fmt: skip
    trainer = Trainer(config)
    trainer.setup()
    seen = []
    hook = trainer.stage.model.embedder.register_forward_hook(
        lambda module, inputs, output: seen.append((torch.is_autocast_enabled("cpu"), output.dtype))
    )
    batch = next(iter(trainer.loader()))
    trainer.train_step(trainer.stage.module, batch)
    hook.remove()
    assert seen and all(on and dtype == torch.bfloat16 for on, dtype in seen), seen
    assert trainer.stage.model.backbone.visual.conv1.weight.dtype == torch.bfloat16
    assert trainer.stage.model.embedder.linear.weight.dtype == torch.float32  # trained in fp32, run in bf16


# ------------------------------------------------------------------------------------ options


def test_lr_schedule_values_in_the_log(pacl_run):
    out, _ = pacl_run
    peak, warmup, steps, floor = 5e-3, 2, PACL_STEPS, 0.1
    expected = [peak * 0.5, peak]  # linear warm-up: step 0 at 1/2, step 1 at 2/2
    for step in range(warmup, steps):  # then the cosine from 1 at step 2 down towards 0.1 at step 24
        expected.append(peak * (floor + (1 - floor) * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup))) / 2))
    assert [r["lr"] for r in log_of(out)] == pytest.approx(expected, rel=1e-9)
    assert lr_factor(5, 10, 100, 0.0) == pytest.approx(0.6) and lr_factor(100, 10, 100, 0.2) == pytest.approx(0.2)


def test_no_weight_decay_on_gains_biases_scales_and_embeddings(tiny_clip_dir):
    model = PACL(quiet_clip(tiny_clip_dir / "export"))
    no_decay, decay = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    assert {names[id(p)] for p in decay["params"]} == {f"embedder.{m}.weight" for m in ("linear", "fc1", "fc2")}
    assert {names[id(p)] for p in no_decay["params"]} == {
        "embedder.fc1.bias", "embedder.fc2.bias", "log_logit_scale", "log_patch_logit_scale",
    }  # fmt: skip
    clip = open_clip.CLIP(**TINY)
    no_decay, decay = parameter_groups(clip, 0.1)
    names = {id(p): n for n, p in clip.named_parameters()}
    plain = {names[id(p)] for p in no_decay["params"]}
    assert {"positional_embedding", "visual.class_embedding", "visual.positional_embedding", "logit_scale"} <= plain
    assert {"ln_final.weight", "visual.transformer.resblocks.0.ln_1.bias", "visual.conv1.weight"} - plain == {
        "visual.conv1.weight"
    }
    assert {"token_embedding.weight", "visual.conv1.weight", "text_projection"} <= {
        names[id(p)] for p in decay["params"]
    }


def test_grad_clip_and_fixed_patch_temperature(pacl_run, tiny_clip_dir, tmp_path):
    out, _ = pacl_run
    free = exported(out)
    assert float(free["log_patch_logit_scale"]) != 0.0  # learnt: it left -log(1.0)
    # A gradient clipped to norm 1e-9 is far below AdamW's eps (1e-6): steps shrink ~1000x.
    code, err = train(*pacl_args(tiny_clip_dir, tmp_path / "clip", "--grad-clip", 1e-9, "--steps", 2))
    assert code == 0, err[-2000:]
    code, err = train(*pacl_args(tiny_clip_dir, tmp_path / "free", "--steps", 2))
    assert code == 0, err[-2000:]
    clipped, unclipped = exported(tmp_path / "clip"), exported(tmp_path / "free")
    ratio = clipped["embedder.fc2.weight"].norm() / unclipped["embedder.fc2.weight"].norm()  # fc2 starts at 0
    assert float(ratio) < 0.01, float(ratio)

    code, err = train(
        *pacl_args(tiny_clip_dir, tmp_path / "fixed", "--steps", 2, "--fixed-patch-temperature"),
        "--patch-temperature", 0.5,
    )  # fmt: skip
    assert code == 0, err[-2000:]
    fixed = exported(tmp_path / "fixed")
    assert float(fixed["log_patch_logit_scale"]) == pytest.approx(math.log(2.0), abs=1e-7)
    assert float(fixed["embedder.fc2.weight"].abs().max()) > 0  # the rest trained
    assert read_pacl_weights(tmp_path / "fixed" / "pacl.safetensors")[1].config["learn_patch_temperature"] is False


def test_export_dtype_and_save_every_zero(tiny_clip_dir, tmp_path):
    out = tmp_path / "run"
    code, err = train(
        "--stage", "clip", "--clip-config", tiny_clip_dir / "config.json", "--out", out, "--steps", 3,
        "--batch-size", 4, "--export-dtype", "float16", "--save-every", 0, *FAST,
    )  # fmt: skip
    assert code == 0, err[-2000:]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000003.pt"]  # 0: only at the end
    state = torch.load(out / "checkpoints" / "step_00000003.pt", weights_only=True)["model"]
    tensors = load_file(out / "export" / "open_clip_model.safetensors")
    assert tensors.keys() == state.keys()
    for name, tensor in tensors.items():
        assert tensor.dtype == torch.float16 and torch.equal(tensor, state[name].to(torch.float16)), name


def test_help_documents_every_option_with_its_default():
    parser = build_parser()
    actions = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert {a.dest for a in actions} == set(TrainConfig.__dataclass_fields__)
    for action in actions:
        assert "(default: " in action.help or "(required)" in action.help, action.option_strings
    text = parser.format_help()
    assert "(default: 500)" in " ".join(text.split())  # --save-every
    assert "--resume" in text and "--precision" in text


def test_bad_options_are_one_line_errors(tmp_path, tiny_clip_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--stage", "pacl", "--out", str(tmp_path), "--clip", "x", "--steps", "0"])
    assert exit_info.value.code == 2 and "--steps must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--stage", "pacl", "--out", str(tmp_path), "--data", "wds"])
    assert "--stage pacl needs --clip" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--stage", "clip", "--out", str(tmp_path), "--clip-config", "c", "--data", "wds", "--train-data", "x"] + [
            "--workers", "2", "--data-streams", "3"
        ])  # fmt: skip
    assert "--data-streams 3 must be a multiple of --workers 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--stage", "clip", "--out", str(tmp_path), "--clip-config", "c", "--save-every", "-1"])
    assert "--save-every must be >= 0" in capsys.readouterr().err


# -------------------------------------------------------------------------- checkpoints, resume


def test_checkpoints_are_pruned_and_resume_from_a_path(pacl_run, tiny_clip_dir, tmp_path):
    out, _ = pacl_run
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == [f"step_{s:08d}.pt" for s in (PACL_STEPS - PACL_SAVE, PACL_STEPS)] and KEEP_CHECKPOINTS == 2
    older = out / "checkpoints" / f"step_{PACL_STEPS - PACL_SAVE:08d}.pt"
    code, err = train(*pacl_args(tiny_clip_dir, tmp_path / "again"), "--resume", older)
    assert code == 0, err[-2000:]
    assert f"resuming from {older} at step {PACL_STEPS - PACL_SAVE}" in err
    assert [r["step"] for r in log_of(tmp_path / "again")] == list(range(PACL_STEPS - PACL_SAVE + 1, PACL_STEPS + 1))
    assert_same_weights(exported(tmp_path / "again"), exported(out))


def test_resume_errors_are_one_line(pacl_run, tiny_clip_dir, tmp_path):
    out, _ = pacl_run
    code, err = train(*pacl_args(tiny_clip_dir, tmp_path / "a"), "--resume", tmp_path / "nope.pt")
    assert code == 2 and f"--resume {tmp_path / 'nope.pt'}: no checkpoint file there" in err
    plain = tmp_path / "plain.pt"
    torch.save(pacl_model(tiny_clip_dir / "export").trainable_state_dict(), plain)
    code, err = train(*pacl_args(tiny_clip_dir, tmp_path / "b"), "--resume", plain)
    assert code == 2 and "is a plain state dict" in err and "Traceback" not in err
    # Another CLIP of the same architecture: refused, naming both
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    code, err = train(*pacl_args(tiny_clip_dir, copy, clip="other"))
    ours, theirs = (str(quiet_clip(tiny_clip_dir / name).identity) for name in ("export", "other"))
    assert ours.split("@")[0] == theirs.split("@")[0] and ours != theirs  # same architecture, other weights
    assert code == 2 and "cannot resume" in err and ours in err and theirs in err, err
    code, err = train(*pacl_args(tiny_clip_dir, copy, "--batch-size", 8))
    assert code == 2 and "batch_size (checkpoint: 16, this run: 8)" in err


def forge(path: Path, edit, checksum: bool = True, name: str = "forged.pt") -> Path:
    """A copy of the checkpoint at ``path`` with ``edit(state)`` applied, written beside it as ``name``;
    with ``checksum``, the checksum recomputed as a forger who knows the format would (so that the
    field checks behind it are what is tested)."""
    state = torch.load(path, weights_only=True)
    edit(state)
    if checksum:
        state["checksum"] = state_checksum(state)
    forged = path.parent / name
    torch.save(state, forged)
    return forged


def test_resume_takes_hyperparameters_and_schedule_from_the_config_not_the_file(pacl_run, tiny_clip_dir, tmp_path):
    """A checkpoint's own learning rate, betas, weight decay or schedule position are never used: the resumed
    run logs the learning rates and ends with the weights of the uninterrupted one."""
    out, _ = pacl_run
    older = out / "checkpoints" / f"step_{PACL_STEPS - PACL_SAVE:08d}.pt"

    def edit(state):
        for group in state["optimizer"]["param_groups"]:
            group.update(lr=1.0, initial_lr=1.0, betas=(0.0, 0.0), weight_decay=100.0)
        state["scheduler"] = {"base_lrs": [1.0, 1.0], "last_epoch": 0, "optimizer": "x"}

    forged = forge(shutil.copy(older, tmp_path / "step.pt"), edit)
    code, err = train(*pacl_args(tiny_clip_dir, tmp_path / "again"), "--resume", forged)
    assert code == 0, err[-2000:]
    assert [r["lr"] for r in log_of(tmp_path / "again")] == [r["lr"] for r in log_of(out)][PACL_STEPS - PACL_SAVE :]
    assert_same_weights(exported(tmp_path / "again"), exported(out))


def _set(key, value):
    return lambda state: state.__setitem__(key, value)


@pytest.mark.parametrize(
    "edit, message",
    [
        (_set("step", 10**6), "step 1000000 is outside 1..24"),
        (_set("step", True), "entry 'step' is missing or not a int"),
        (_set("rng", []), "entry 'rng' has 0 ranks, the signature 1"),
        (_set("rng", [torch.zeros(3)]), "entry 'rng' does not hold RNG states"),
        (_set("model", {"embedder.linear.weight": 1}), "entry 'model' is not a dict of named tensors"),
        (lambda s: s["data"].__setitem__(0, {"positions": {0: [0, -1, 0]}, "skipped": 0}), "data position 0"),
        (lambda s: s["data"].__setitem__(0, {"positions": {}, "skipped": -3}), "skipped count -3"),
        (lambda s: s["optimizer"]["state"][0].__setitem__("exp_avg", torch.zeros(7)), "moment exp_avg of parameter 0"),
        (lambda s: s["optimizer"]["param_groups"].pop(), "1 parameter groups, this run 2"),
        (lambda s: s["optimizer"]["state"].__setitem__(99, {}), "parameter 99 is not AdamW's"),
        (_set("cuda_rng", []), "entry 'cuda_rng' has 0 ranks, the signature 1"),
        (_set("cuda_rng", [[torch.zeros(3)]]), "entry 'cuda_rng' does not hold lists of CUDA RNG states"),
        (_set("format", "pacl-fast-train-checkpoint/1"), "written by an older train/train.py"),
    ],
)
def test_a_forged_checkpoint_is_one_line_error(pacl_run, tiny_clip_dir, tmp_path, edit, message):
    out, _ = pacl_run
    forged = forge(shutil.copy(out / "checkpoints" / f"step_{PACL_STEPS:08d}.pt", tmp_path / "step.pt"), edit)
    code, err = train(*pacl_args(tiny_clip_dir, tmp_path / "again"), "--resume", forged)
    assert code == 2 and message in err and "Traceback" not in err, err[-2000:]


def unfinished_copy(out: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the finished run ``out`` without its exported ``pacl.safetensors``, and the copy's newest
    checkpoint: the start of the tests that damage a run's checkpoints and run the same command again."""
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "pacl.safetensors").unlink()
    return copy, copy / "checkpoints" / f"step_{PACL_STEPS:08d}.pt"


def test_a_truncated_newest_checkpoint_falls_back_to_the_older_one(pacl_run, tiny_clip_dir, tmp_path):
    out, _ = pacl_run
    copy, newest = unfinished_copy(out, tmp_path)
    newest.write_bytes(newest.read_bytes()[:5000])
    code, err = train(*pacl_args(tiny_clip_dir, copy))
    assert code == 0, err[-2000:]
    assert f"skipping checkpoint {newest}" in err and "truncated or corrupt" in err
    assert f"at step {PACL_STEPS - PACL_SAVE}" in err
    assert [r["step"] for r in log_of(copy)] == list(range(1, PACL_STEPS + 1))  # cut back, then logged once
    assert_same_weights(exported(copy), exported(out))


def test_an_edited_step_or_data_state_is_refused_by_the_checksum(pacl_run, tiny_clip_dir, tmp_path):
    """Issue 23 item 11: a checkpoint's step edited 18 -> 22 was accepted, and four steps skipped silently."""
    out, _ = pacl_run
    older = shutil.copy(out / "checkpoints" / f"step_{PACL_STEPS - PACL_SAVE:08d}.pt", tmp_path / "step.pt")
    edits = [
        _set("step", PACL_STEPS - PACL_SAVE + 4),
        lambda s: s["data"][0].__setitem__("skipped", 5),
        lambda s: s["signature"].__setitem__("seed", 1),
        lambda s: s["model"]["log_logit_scale"].add_(0.5),
        lambda s: s["rng"][0][100:].bitwise_xor_(1),
    ]
    for edit in edits:
        forged = forge(older, edit, checksum=False)
        code, err = train(*pacl_args(tiny_clip_dir, tmp_path / "again"), "--resume", forged)
        assert code == 2 and f"{forged}: its checksum does not match its content (edited or damaged)" in err, err
    assert not (tmp_path / "again" / "log.jsonl").exists()  # refused before any step
    no_checksum = forge(older, _set("checksum", 5), checksum=False)
    code, err = train(*pacl_args(tiny_clip_dir, tmp_path / "again"), "--resume", no_checksum)
    assert code == 2 and "entry 'checksum' is missing or not a str" in err
    # A checkpoint renamed to a later step: the name is not the step it holds
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "checkpoints" / f"step_{PACL_STEPS:08d}.pt").unlink()
    renamed = (copy / "checkpoints" / f"step_{PACL_STEPS - PACL_SAVE:08d}.pt").rename(
        copy / "checkpoints" / f"step_{PACL_STEPS - PACL_SAVE + 4:08d}.pt"
    )
    code, err = train(*pacl_args(tiny_clip_dir, copy))
    assert code == 2 and f"{renamed} holds step {PACL_STEPS - PACL_SAVE}, not the step its name says" in err, err


def test_a_checkpoint_holding_nan_is_refused_and_auto_resume_falls_back(pacl_run, tiny_clip_dir, tmp_path):
    """Issue 23 item 4: a checkpoint with a NaN tensor ran on with a NaN loss and exported NaN weights."""
    out, _ = pacl_run
    copy, newest = unfinished_copy(out, tmp_path)

    def poison(state):
        state["model"]["embedder.fc1.bias"][3] = float("nan")
        state["optimizer"]["state"][0]["exp_avg_sq"].fill_(float("inf"))

    forged = forge(newest, poison)
    code, err = train(*pacl_args(tiny_clip_dir, tmp_path / "again"), "--resume", forged)
    assert code == 2 and "Traceback" not in err, err
    assert f"{forged} holds NaN/Inf values in model.embedder.fc1.bias (1), optimizer.state.0.exp_avg_sq" in err
    assert "the run that wrote it had diverged" in err and not (tmp_path / "again" / "pacl.safetensors").exists()
    forged.rename(newest)  # the newest checkpoint of the run, poisoned: the older one is used instead
    code, err = train(*pacl_args(tiny_clip_dir, copy))
    assert code == 0, err[-2000:]
    assert f"skipping checkpoint {newest}" in err and "NaN/Inf" in err and f"at step {PACL_STEPS - PACL_SAVE}" in err
    assert_same_weights(exported(copy), exported(out))


@pytest.mark.parametrize("save_every, log_every", [(2, 1), (0, 100)])
def test_a_diverging_run_stops_naming_the_step_and_keeps_its_last_good_checkpoint(
    tiny_clip_dir, tmp_path, save_every, log_every
):
    """Issue 23 item 4: --lr 1e4 ran on with a NaN loss and wrote an all-NaN pacl.safetensors, exit 0.
    AdamW's decoupled weight decay multiplies the weights by 1 - lr * 0.1 = -999 a step: NaN within ~10 steps.
    Caught where the run syncs anyway: at a log line, before a checkpoint, before the export."""
    out = tmp_path / "run"
    args = pacl_args(tiny_clip_dir, out, "--lr", 1e4, "--save-every", save_every, "--log-every", log_every)
    code, err = train(*args)
    lines = [line for line in err.splitlines() if "error:" in line]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    found = re.search(r"training diverged: (the loss is NaN or Inf from step (\d+)|after step (\d+), .* hold NaN)", err)
    assert found, lines[0]
    first = int(found.group(2) or found.group(3))
    assert 2 < first < PACL_STEPS and "try a lower --lr than 10000" in lines[0]
    assert not (out / "pacl.safetensors").exists()
    kept = sorted((out / "checkpoints").glob("step_*.pt")) if save_every else []
    for path in kept:  # every checkpoint left is whole, finite and older than the divergence
        assert read_checkpoint(path)["step"] < first
    if kept:
        assert f"the last good checkpoint is {kept[-1]}" in lines[0]
    else:
        assert "no checkpoint was written" in lines[0]
    logged = log_of(out) if (out / "log.jsonl").exists() else []
    assert all(math.isfinite(r["loss"]) for r in logged) and all(r["step"] < first for r in logged)
    # the same command again resumes from the last good checkpoint and stops at the same step, in one line
    code, again = train(*args)
    assert code == 1 and (f"from step {first}" in again or f"after step {first}" in again), again[-2000:]


def test_nan_weights_are_never_checkpointed(tiny_clip_dir, tmp_path):
    """The weights check before a checkpoint: finite losses so far, a trained tensor gone NaN."""
    from train.train import Trainer, TrainingDiverged

    config = TrainConfig(
        stage="pacl", out=tmp_path / "run", clip=f"local-dir:{tiny_clip_dir / 'export'}", batch_size=4, steps=4,
        workers=0, image_size=32,
    )  # fmt: skip
    trainer = Trainer(config)
    trainer.setup()
    trainer.step = 2
    trainer.save()
    with torch.no_grad():
        trainer.stage.model.embedder.fc2.weight[0, :3] = float("inf")
    trainer.step = 3
    with pytest.raises(TrainingDiverged, match=r"after step 3, model.embedder.fc2.weight hold NaN or Inf"):
        trainer.save()
    assert [p.name for p in (config.out / "checkpoints").iterdir()] == ["step_00000002.pt"]


def test_export_clip_refuses_non_finite_tensors(tmp_path):
    model = open_clip.CLIP(**TINY)
    with torch.no_grad():
        model.logit_scale.fill_(float("nan"))
    with pytest.raises(ValueError, match=r"not exporting the CLIP to .*: NaN/Inf values in logit_scale \(1\)"):
        export_clip(model, TINY, (0.5,) * 3, (0.25,) * 3, tmp_path / "export")
    assert not (tmp_path / "export").exists()


@pytest.mark.timeout(120)
def test_a_fifo_where_a_checkpoint_or_the_log_is_expected_never_hangs(pacl_run, tiny_clip_dir, tmp_path):
    """Issue 23 item 3: reading a FIFO waits for a writer, forever; a FIFO at log.jsonl blocks its writer."""
    out, _ = pacl_run
    copy, newest = unfinished_copy(out, tmp_path)
    newest.unlink()
    os.mkfifo(newest)
    code, err = train(*pacl_args(tiny_clip_dir, copy))
    assert code == 0, err[-2000:]
    assert f"skipping checkpoint {newest}: {newest}: expected a regular file, found a FIFO" in err
    assert f"at step {PACL_STEPS - PACL_SAVE}" in err and newest.is_file()  # the final save replaced it
    assert_same_weights(exported(copy), exported(out))

    fifo = tmp_path / "fifo.pt"
    os.mkfifo(fifo)
    code, err = train(*pacl_args(tiny_clip_dir, tmp_path / "b"), "--resume", fifo)
    assert code == 2 and f"{fifo}: expected a regular file, found a FIFO" in err and "Traceback" not in err

    (tmp_path / "c").mkdir()
    os.mkfifo(tmp_path / "c" / "log.jsonl")
    code, err = train(*pacl_args(tiny_clip_dir, tmp_path / "c"))
    assert code == 2 and f"{tmp_path / 'c' / 'log.jsonl'} is not a regular file, where this run writes" in err

    os.mkfifo(tmp_path / "config.json")
    code, err = train("--stage", "clip", "--clip-config", tmp_path / "config.json", "--out", tmp_path / "d", *FAST)
    assert code == 2 and "--clip-config" in err and "found a FIFO" in err and "Traceback" not in err, err


@pytest.mark.parametrize(
    "where, kind",
    [
        ("checkpoints/step_00000024.pt", "is a folder, where this run writes a file"),
        ("pacl.safetensors", "is a folder, where this run writes a file"),
        ("log.jsonl", "is a folder, where this run writes a file"),
        ("checkpoints", "is not a folder, and this run writes files in it"),
        ("", "is not a folder, and this run writes files in it"),
    ],
)
def test_what_is_in_the_way_of_the_runs_files_is_refused_before_training(tiny_clip_dir, tmp_path, where, kind):
    """Issue 23 item 5: a folder where the newest checkpoint goes was found at the final save, after the
    whole run, as a traceback."""
    out = tmp_path / "run"
    target = out / where if where else out
    if kind.startswith("is a folder"):
        target.mkdir(parents=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("a file")
    code, err = train(*pacl_args(tiny_clip_dir, out))
    lines = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(lines) == 1 and f"{target} {kind}" in lines[0] and "Traceback" not in err, err[-2000:]
    assert "step" not in err.replace(str(target), "")  # no step ran: no progress bar, nothing logged
    assert not (out / "log.jsonl").is_file()


def test_rng_state_round_trips_through_a_checkpoint(tiny_clip_dir, tmp_path):
    """The real CPU path: the state a checkpoint holds is the one a resumed run continues from, not --seed's;
    a CPU run records no CUDA state."""
    from train.train import Trainer

    config = TrainConfig(
        stage="pacl", out=tmp_path / "run", clip=f"local-dir:{tiny_clip_dir / 'export'}", batch_size=4, steps=4,
        workers=0, image_size=32,
    )  # fmt: skip
    first = Trainer(config)
    first.setup()
    torch.rand(100)  # what dropout or augmentation draws
    first.step = 2
    first.save()
    saved = torch.get_rng_state()
    state = read_checkpoint(checkpoint_path(config.out, 2))
    assert torch.equal(state["rng"][0], saved) and state["cuda_rng"] == [[]]
    second = Trainer(config)
    second.setup()
    assert not torch.equal(torch.get_rng_state(), saved)  # seeded afresh
    second.resume()
    assert second.step == 2 and torch.equal(torch.get_rng_state(), saved)
    # making the data loader draws nothing from it (its base seed drew from the global RNG, so that a resumed
    # run, which makes its loader after the restore, drew other numbers than an uninterrupted one)
    next(iter(second.loader()))
    assert torch.equal(torch.get_rng_state(), saved)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_rng_and_pinned_batches_on_a_gpu(tiny_clip_dir, tmp_path):
    """Issue 21: the CUDA RNG of every device goes into the checkpoint and back; a checkpoint of another
    device count is refused; batches arrive pinned so that the copies to the GPU overlap."""
    from train.train import Trainer

    config = TrainConfig(
        stage="pacl", out=tmp_path / "run", clip=f"local-dir:{tiny_clip_dir / 'export'}", batch_size=4, steps=4,
        workers=0, image_size=32, device="cuda", precision="bf16",
    )  # fmt: skip
    first = Trainer(config)
    first.setup()
    batch = next(iter(first.loader()))
    assert batch["images"].is_pinned()
    first.train_step(first.stage.module, batch)
    torch.rand(100, device="cuda")  # what dropout draws
    first.step = 2
    first.save()
    saved = torch.cuda.get_rng_state_all()
    state = read_checkpoint(checkpoint_path(config.out, 2))
    assert len(state["cuda_rng"][0]) == torch.cuda.device_count()
    assert all(torch.equal(a, b) for a, b in zip(state["cuda_rng"][0], saved))
    second = Trainer(config)
    second.setup()
    second.resume()
    assert all(torch.equal(a, b) for a, b in zip(torch.cuda.get_rng_state_all(), saved))

    forged = forge(checkpoint_path(config.out, 2), lambda s: s["cuda_rng"][0].append(s["cuda_rng"][0][0]))
    third = Trainer(replace(config, out=tmp_path / "other", resume=str(forged)))
    third.setup()
    with pytest.raises(CheckpointError, match=f"CUDA RNG states of {torch.cuda.device_count() + 1} device"):
        third.resume()


def test_the_clip_stage_builds_its_loss_once(tiny_clip_dir, tmp_path):
    """Issue 21: ClipLoss was rebuilt every step (and with it its label cache)."""
    from train.train import Trainer

    config = TrainConfig(
        stage="clip", out=tmp_path / "run", clip_config=tiny_clip_dir / "config.json", batch_size=6, steps=4,
        workers=0, image_size=32,
    )  # fmt: skip
    trainer = Trainer(config)
    trainer.setup()
    loss_fn = trainer.stage.loss_fn
    batch = next(iter(trainer.loader()))
    for _ in range(2):
        trainer.train_step(trainer.stage.module, batch)
    # the one instance made the steps: its label cache holds this batch's labels
    assert trainer.stage.loss_fn is loss_fn and loss_fn.prev_num_logits == 6
    assert list(loss_fn.labels) == [torch.device("cpu")] and torch.equal(loss_fn.labels[torch.device("cpu")],
                                                                           torch.arange(6))  # fmt: skip


def test_gpu_check_training_dry_run_passes_without_webdataset(tmp_path):
    """benchmarks/train_check.py --dry-run: the GPU check's training section on the CPU (a straight run, a run
    that SIGKILLs itself after its checkpoint, the resume), in processes where webdataset cannot be imported,
    as on the lent GPU machine."""
    blocked = tmp_path / "blocked"
    for name in ("webdataset", "braceexpand"):
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(f"raise ImportError('no {name} on the lent GPU machine')\n")
    env = dict(subprocess_env(), PYTHONPATH=os.pathsep.join([str(blocked), str(ROOT)]))
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.train_check", "--dry-run", "--json", tmp_path / "check.json",
         "--work", tmp_path / "work"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "train_check: PASS" in done.stdout and "FAIL" not in done.stdout
    result = json.loads((tmp_path / "check.json").read_text())
    assert result["killed_exit"] == -signal.SIGKILL and result["resumed_at"] == 3 and result["losses_finite"]
    assert result["bitwise_equal"] and result["draws_equal_after_resume"] and result["max_training_change"] > 0
    assert result["step_images_per_s"] > 0 and result["settings"]["precision"] == "bf16"
    assert "webdataset" not in done.stderr and seconds < 240, seconds


def test_ctrl_c_then_resume_equals_an_uninterrupted_pacl_run(pacl_run, tiny_clip_dir, tmp_path):
    """A real Ctrl-C (SIGINT to a training process): one line, exit 130, and the same command resumes.

    In a subprocess: SIGINT sent to pytest's own main thread, after other tests loaded OpenVINO, crashed
    numpy's RNG in the scene renderer (a segfault in random_standard_normal), so the signal goes where a
    user's would, to a process of its own."""
    out, _ = pacl_run
    interrupted = tmp_path / "interrupted"
    first = interrupted / "checkpoints" / f"step_{PACL_SAVE:08d}.pt"
    process = subprocess.Popen(
        [sys.executable, TRAIN, *map(str, pacl_args(tiny_clip_dir, interrupted))],
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while not first.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.002)
    process.send_signal(signal.SIGINT)
    err = process.communicate(timeout=300)[1]
    assert process.returncode == 130, "the run ended before Ctrl-C arrived" if process.returncode == 0 else err[-2000:]
    line = [ln for ln in err.splitlines() if ln.startswith("interrupted at step")]
    assert line and line[0].endswith("; run the same command to resume") and "Traceback" not in err
    stopped = int(line[0].split()[3].rstrip(";"))
    assert PACL_SAVE <= stopped < PACL_STEPS and not (interrupted / "pacl.safetensors").exists()

    code, err = train(*pacl_args(tiny_clip_dir, interrupted))
    assert code == 0, err[-2000:]
    assert [r["step"] for r in log_of(interrupted)] == list(range(1, PACL_STEPS + 1))  # no step twice
    # (another process made the first steps: equal to rounding, where another batch would change the loss by ~0.1)
    expected = [r["loss"] for r in log_of(out)]
    assert [r["loss"] for r in log_of(interrupted)] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    resumed, straight = exported(interrupted), exported(out)
    assert resumed.keys() == straight.keys()
    assert max(float((resumed[k] - straight[k]).abs().max()) for k in resumed) <= 1e-6


def write_scene_shards(folder: Path, shards: int = 6, per_shard: int = 6) -> str:
    """WebDataset shards of synthetic scenes (caption = the scene's); one sample in 7 is broken."""
    number = 0
    for shard in range(shards):
        members = []
        for _ in range(per_shard):
            scene = render_scene(number, seed=4, config=WorldConfig(image_size=32))
            key = f"scene{number:04d}"
            image = b"broken" if number % 7 == 3 else png_array_bytes(scene.image)
            members += [(f"{key}.png", image), (f"{key}.txt", scene.caption.encode())]
            number += 1
        write_shard(folder / f"{shard:05d}.tar", members)
    return str(folder / f"{{00000..{shards - 1:05d}}}.tar")


def png_array_bytes(array) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def test_killed_webdataset_run_with_workers_resumes_to_the_same_weights(tmp_path, tiny_clip_dir):
    """Hard kill (SIGKILL) of a CLIP-stage run reading 6 shards through 2 streams in 2 workers, then resume."""
    pattern = write_scene_shards(tmp_path)
    common = [
        "--stage", "clip", "--clip-config", tiny_clip_dir / "config.json", "--data", "wds", "--train-data", pattern,
        "--steps", 20, "--batch-size", 4, "--save-every", 3, "--log-every", 1, "--warmup", 2, "--image-size", 32,
        "--workers", 2, "--data-streams", 2,
    ]  # fmt: skip
    code, err = train(*common, "--out", tmp_path / "straight")
    assert code == 0, err[-2000:]
    straight = log_of(tmp_path / "straight")
    assert straight[-1]["skipped"] >= 3  # 20 steps x 4 pairs cross every shard, one sample in 7 is broken

    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(
        [sys.executable, TRAIN, *map(str, common), "--out", str(interrupted)],
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not list((interrupted / "checkpoints").glob("step_*.pt")) and time.time() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (interrupted / "export").exists()

    code, err = train(*common, "--out", interrupted)
    assert code == 0, err[-2000:]
    assert "resuming from" in err
    resumed = log_of(interrupted)
    assert [r["step"] for r in resumed] == list(range(1, 21))
    # the same batches step by step (the loss of a step is a function of its batch and the weights)
    # (another process made the first steps: equal to rounding, where another batch would change the loss by ~0.1)
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in straight], rel=1e-5, abs=1e-6)
    assert resumed[-1]["skipped"] == straight[-1]["skipped"]
    a = open_clip.create_model(f"local-dir:{tmp_path / 'straight' / 'export'}").state_dict()
    b = open_clip.create_model(f"local-dir:{interrupted / 'export'}").state_dict()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-6, worst


# --------------------------------------------------------------------------------------- data


def test_clip_on_a_csv_table_shows_skipped_samples(tmp_path, tiny_clip_dir):
    rows = []
    for i in range(8):
        (tmp_path / f"{i}.png").write_bytes(png_bytes(i))
        rows.append(f"{i}.png,a picture number {i}")
    rows.append("missing.png,gone")
    (tmp_path / "pairs.csv").write_text("filepath,title\n" + "\n".join(rows) + "\n")
    out = tmp_path / "run"
    code, err = train(
        "--stage", "clip", "--clip-config", tiny_clip_dir / "config.json", "--data", "csv",
        "--train-data", tmp_path / "pairs.csv", "--steps", 3, "--batch-size", 6, "--out", out, *FAST,
    )  # fmt: skip
    assert code == 0, err[-2000:]
    log = log_of(out)
    assert log[-1]["step"] == 3 and log[-1]["skipped"] >= 1  # 18 draws from 9 rows meet the missing one
    assert f"skipped={log[-1]['skipped']}" in err  # on the progress bar
    assert (out / "export" / "open_clip_model.safetensors").is_file()


def test_a_table_of_bad_paths_names_them(tmp_path, tiny_clip_dir):
    (tmp_path / "pairs.csv").write_text("filepath,title\n" + "".join(f"gone{i}.png,a cat\n" for i in range(4)))
    code, err = train(
        *pacl_args(tiny_clip_dir, tmp_path / "run", "--data", "csv", "--train-data", tmp_path / "pairs.csv"),
        "--workers", 1,
    )  # fmt: skip
    lines = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert lines[0].count("gone") >= 3 and "image file not found" in lines[0], lines[0]


# ---------------------------------------------------------------------------------------- DDP


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_pacl_ddp_two_processes_match_one_process_with_the_global_batch(tmp_path, tiny_clip_dir):
    clip = f"local-dir:{tiny_clip_dir / 'export'}"
    common = ["--stage", "pacl", "--clip", clip, "--steps", "3", "--lr", "5e-3", *FAST]
    ddp = run_script(
        ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(), TRAIN, *common]
        + ["--batch-size", "4", "--out", tmp_path / "ddp", "--threads", "1"]
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    digests = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text())["parameters_sha256"] for r in (0, 1)]
    assert digests[0] == digests[1]  # both ranks end with identical weights

    code, err = train(*common, "--batch-size", "8", "--out", tmp_path / "single")
    assert code == 0, err[-3000:]
    ddp_weights, meta = read_pacl_weights(tmp_path / "ddp" / "pacl.safetensors")
    single_weights, _ = read_pacl_weights(tmp_path / "single" / "pacl.safetensors")
    assert meta.steps == 3 and meta.extra["batch_size"] == 8
    for name, tensor in single_weights.items():
        # all-gathered negatives with gradient + DDP averaging = the one-process global batch
        assert (ddp_weights[name] - tensor).abs().max() < 1e-4, name
    assert (ddp_weights["embedder.fc2.weight"]).abs().max() > 1e-3  # and they trained

    segmenter = make_segmenter(clip, pacl_weights=tmp_path / "ddp" / "pacl.safetensors")
    result = segmenter.predict(SyntheticSegmentation(1, seed=1)[0][0], CLASS_NAMES, templates="single")
    assert result.labels.shape == (64, 64) and result.labels.max() < len(CLASS_NAMES)


def test_resume_cleanup_removes_only_dead_writers_checkpoint_temporaries(tmp_path):
    """A run's start deleted every ``.step_*.tmp`` in the checkpoint folder, a live writer's too (a
    second run or another node saving into it): now only those of killed writers go (files' rules)."""
    from helpers import killed_write

    from train.checkpoints import remove_stale_temporaries

    out = tmp_path / "run"
    dead = killed_write(checkpoint_path(out, 3))
    prefix, writer_id, _, end = dead.name.rsplit("-", 3)
    live = dead.with_name(f"{prefix}-{writer_id}-{os.getpid()}-{end}")  # as if this process were writing it
    live.write_bytes(b"half")
    assert remove_stale_temporaries(out) == 1
    assert not dead.exists() and live.read_bytes() == b"half"
