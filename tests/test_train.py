"""train/train.py end to end on tiny models: learning, DDP on 2 CPU processes, kill and resume."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from open_clip.loss import ClipLoss

from pacl_fast.backbone import OPENAI_MEAN, OPENAI_STD
from pacl_fast.data.synthetic import CLASS_NAMES, SyntheticSegmentation, WorldConfig, render_scene
from pacl_fast.weights import read_pacl_weights
from tests.conftest import make_segmenter
from train.train import export_clip

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "train" / "train.py")
TINY = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
FAST = ["--workers", "0", "--threads", "1", "--log-every", "1", "--warmup", "2"]


def run(args, **kwargs):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=600, **kwargs)


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A random tiny CLIP exported in open_clip's local-dir layout, as the clip stage does."""
    folder = tmp_path_factory.mktemp("clip")
    config = folder / "config.json"
    config.write_text(json.dumps(TINY))
    torch.manual_seed(0)
    export_clip(open_clip.CLIP(**TINY), TINY, (0.5,) * 3, (0.25,) * 3, folder / "export")
    return folder


def held_out_clip_loss(model) -> float:
    """The CLIP loss on 32 scenes of the validation seed, preprocessed as training does."""
    scenes = [render_scene(i, seed=1, config=WorldConfig(image_size=32)) for i in range(32)]
    pixels = torch.stack([torch.from_numpy(s.image).permute(2, 0, 1) for s in scenes]).float() / 255
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (OPENAI_MEAN, OPENAI_STD))
    tokens = open_clip.SimpleTokenizer(context_length=24)([s.caption for s in scenes])
    with torch.no_grad():
        image, text, scale = model((pixels - mean) / std, tokens)[:3]
        return float(ClipLoss()(image, text, scale))


def test_clip_stage_learns_and_exports_an_open_clip_local_dir(tmp_path, tiny_clip_dir):
    before = held_out_clip_loss(open_clip.create_model(f"local-dir:{tiny_clip_dir / 'export'}"))
    out = tmp_path / "run"
    result = run(
        [
            TRAIN,
            "--stage",
            "clip",
            "--clip-config",
            str(tiny_clip_dir / "config.json"),
            "--out",
            str(out),
            "--steps",
            "100",
            "--batch-size",
            "32",
            "--lr",
            "3e-3",
            "--image-size",
            "32",
            *FAST,
        ]
    )
    assert result.returncode == 0, result.stderr[-2000:]
    after = held_out_clip_loss(open_clip.create_model(f"local-dir:{out / 'export'}"))
    assert after < before - 0.2, (before, after)  # held-out loss of the untrained model: 3.70; trained: 3.40
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 101))
    assert {"loss", "lr", "logit_scale", "images_per_s"} <= set(log[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_pacl_ddp_two_processes_match_one_process_with_the_global_batch(tmp_path, tiny_clip_dir):
    clip = f"local-dir:{tiny_clip_dir / 'export'}"
    common = ["--stage", "pacl", "--clip", clip, "--steps", "3", "--lr", "5e-3", *FAST]
    ddp = run(
        [
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
            TRAIN,
            *common,
            "--batch-size",
            "4",
            "--out",
            str(tmp_path / "ddp"),
        ]
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    digests = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text())["parameters_sha256"] for r in (0, 1)]
    assert digests[0] == digests[1]  # both ranks end with identical weights

    single = run([TRAIN, *common, "--batch-size", "8", "--out", str(tmp_path / "single")])
    assert single.returncode == 0, single.stderr[-3000:]
    ddp_weights, meta = read_pacl_weights(tmp_path / "ddp" / "pacl.safetensors")
    single_weights, _ = read_pacl_weights(tmp_path / "single" / "pacl.safetensors")
    assert meta.steps == 3 and meta.extra["batch_size"] == 8
    for name, tensor in single_weights.items():
        # all-gathered negatives with gradient + DDP averaging = the one-process global batch
        assert (ddp_weights[name] - tensor).abs().max() < 1e-4, name

    segmenter = make_segmenter(clip, pacl_weights=tmp_path / "ddp" / "pacl.safetensors")
    result = segmenter.predict(SyntheticSegmentation(1, seed=1)[0][0], CLASS_NAMES, templates="single")
    assert result.labels.shape == (64, 64) and result.labels.max() < len(CLASS_NAMES)


def test_killed_run_resumes_to_the_same_weights(tmp_path, tiny_clip_dir):
    config = str(tiny_clip_dir / "config.json")
    common = [
        TRAIN,
        "--stage",
        "clip",
        "--clip-config",
        config,
        "--steps",
        "40",
        "--batch-size",
        "16",
        "--image-size",
        "32",
        "--save-every",
        "5",
        *FAST,
    ]
    straight = run([*common, "--out", str(tmp_path / "straight")])
    assert straight.returncode == 0, straight.stderr[-2000:]

    interrupted = tmp_path / "interrupted"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    process = subprocess.Popen(
        [sys.executable, *common, "--out", str(interrupted)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not list((interrupted / "checkpoints").glob("step_*.pt")) and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (interrupted / "export").exists()

    resumed = run([*common, "--out", str(interrupted), "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stderr
    steps = [json.loads(line)["step"] for line in (interrupted / "log.jsonl").read_text().splitlines()]
    assert steps[-1] == 40 and sorted(set(steps)) == list(range(1, 41))  # no step lost
    a = open_clip.create_model(f"local-dir:{tmp_path / 'straight' / 'export'}").state_dict()
    b = open_clip.create_model(f"local-dir:{interrupted / 'export'}").state_dict()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-6, worst


def test_resume_refuses_a_different_run(tmp_path, tiny_clip_dir):
    config = str(tiny_clip_dir / "config.json")
    base = [
        TRAIN,
        "--stage",
        "clip",
        "--clip-config",
        config,
        "--steps",
        "2",
        "--image-size",
        "32",
        "--save-every",
        "1",
        "--out",
        str(tmp_path / "run"),
        *FAST,
    ]
    assert run([*base, "--batch-size", "4"]).returncode == 0
    changed = run([*base, "--batch-size", "8"])
    assert changed.returncode != 0 and "cannot resume" in changed.stderr


def test_help_documents_every_option():
    result = run([TRAIN, "--help"])
    assert result.returncode == 0
    for option in ("--stage", "--data", "--train-data", "--resume", "--precision", "--save-every", "torchrun"):
        assert option in result.stdout
    assert np.isfinite(1.0)


def test_pacl_on_webdataset_shards_skips_and_counts_a_corrupt_member(tmp_path, tiny_clip_dir):
    from tests.test_pairs import png_bytes, write_shard

    for shard in range(2):
        members = []
        for i in range(6):
            members += [(f"s{shard}_{i}.png", png_bytes(10 * shard + i)), (f"s{shard}_{i}.txt", f"scene {i}".encode())]
        members += [(f"s{shard}_bad.jpg", b"\xff\xd8 not a jpeg"), (f"s{shard}_bad.txt", b"broken")]
        write_shard(tmp_path / f"{shard:05d}.tar", members)
    out = tmp_path / "run"
    result = run(
        [
            TRAIN,
            "--stage",
            "pacl",
            "--clip",
            f"local-dir:{tiny_clip_dir / 'export'}",
            "--data",
            "wds",
            "--train-data",
            str(tmp_path / "{00000..00001}.tar"),
            "--steps",
            "4",
            "--batch-size",
            "4",
            "--out",
            str(out),
            *FAST,
        ]
    )
    assert result.returncode == 0, result.stderr[-2000:]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 4 and log[-1]["skipped"] >= 1
    assert (out / "pacl.safetensors").is_file()


def test_clip_on_a_csv_table(tmp_path, tiny_clip_dir):
    from tests.test_pairs import png_bytes

    rows = []
    for i in range(8):
        (tmp_path / f"{i}.png").write_bytes(png_bytes(i))
        rows.append(f"{i}.png,a picture number {i}")
    rows.append("missing.png,gone")
    (tmp_path / "pairs.csv").write_text("filepath,title\n" + "\n".join(rows) + "\n")
    out = tmp_path / "run"
    result = run(
        [
            TRAIN,
            "--stage",
            "clip",
            "--clip-config",
            str(tiny_clip_dir / "config.json"),
            "--data",
            "csv",
            "--train-data",
            str(tmp_path / "pairs.csv"),
            "--steps",
            "3",
            "--batch-size",
            "6",
            "--image-size",
            "32",
            "--out",
            str(out),
            *FAST,
        ]
    )
    assert result.returncode == 0, result.stderr[-2000:]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 3 and log[-1]["skipped"] >= 1  # 18 draws from 9 rows meet the missing one
    assert (out / "export" / "open_clip_model.safetensors").is_file()
