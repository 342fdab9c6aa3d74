"""Training on a GPU, checked in one call: the PACL stage on ViT-B-16 (random init), bf16, CUDA.

    python -m benchmarks.train_check                  # CUDA: ViT-B-16, 224 px, bf16, batch 64, 2 x 20 steps
    python -m benchmarks.train_check --dry-run        # the same code path on the CPU: a tiny CLIP, 2 x 3 steps
    python -m benchmarks.train_check --json out.json --work "$OUT/train_check"

Three runs of ``train/train.py``'s ``Trainer`` on synthetic pairs, with the same options:

1. **straight**: 2N steps in this process (its log gives the run's images/s, data loading included;
   then ``train_step`` on one fixed batch, synchronised, gives the images/s of the step alone);
2. **killed**: the same run in a child process that kills itself (SIGKILL) right after writing
   the checkpoint of step N, as a lost machine or ``kill -9`` would;
3. **resumed**: the same run again in this process, in the killed run's folder: it resumes at
   step N and runs to 2N.

Every step also draws random numbers on the run's device (as dropout would), and they are kept.
PASS when every loss is finite; the child died of SIGKILL after writing checkpoint N and no
export; the resumed run started at N; its weights equal the straight run's (max |difference| at
most ``--tolerance`` times the largest change training made, and whether bitwise equal is
said); and its draws after step N are the straight run's, so the checkpoint carried the
device's generator (CUDA's RNG on a GPU, the CPU's in the dry run). Runs use deterministic
algorithms where torch has them (``torch.use_deterministic_algorithms(warn_only=True)``, the cuBLAS
workspace config), so that two processes can compute the same numbers; memory-efficient attention's
backward has none in warn-only mode, hence the tolerance (the fixed-batch timing runs with the
default kernels). Exit 1 on FAIL, with one ``train_check: FAIL`` line saying why.

Needs torch, open_clip (and its tokenizer's ftfy/regex), numpy, pillow, tqdm, safetensors; not
webdataset (the synthetic pairs never import it).
"""

from __future__ import annotations

import os

# cuBLAS needs this before CUDA starts to run its GEMMs deterministically; children inherit it.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from benchmarks.common import machine_line, timed, versions, write_results  # noqa: E402
from train.checkpoints import checkpoint_path, read_checkpoint  # noqa: E402
from train.config import TrainConfig  # noqa: E402
from train.train import Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
#: The tiny open_clip CLIP of the dry run (random init): 32 px, an 4x4 grid of 8-px patches.
TINY_CLIP = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
#: Random numbers each step draws on the device, standing in for dropout.
DRAWS_PER_STEP = 4


class CheckTrainer(Trainer):
    """The Trainer of ``train/train.py``, which also draws ``DRAWS_PER_STEP`` random numbers on its device
    every step (kept, by step, on the device), and as the killed run dies by SIGKILL right after the
    checkpoint of step ``kill_at``."""

    def __init__(self, config: TrainConfig, kill_at: int | None = None):
        super().__init__(config)
        self.kill_at = kill_at
        self.draws: dict[int, torch.Tensor] = {}

    def train_step(self, module: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.draws[self.step + 1] = torch.rand(DRAWS_PER_STEP, device=self.device)
        return super().train_step(module, batch)

    def save(self) -> None:
        super().save()
        if self.step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)


def settings_for(args: argparse.Namespace, work: Path) -> dict:
    """The TrainConfig fields every run shares (all but ``out``), JSON-serialisable for the child."""
    if args.dry_run:
        clip = work / "tiny-clip"
        if not clip.exists():
            make_tiny_clip(clip)
        model = {"clip": f"local-dir:{clip}", "image_size": 32, "device": "cpu"}
    else:
        model = {"clip": args.model, "image_size": args.image_size, "device": "cuda"}
    return {
        "stage": "pacl",
        **model,
        "clip_weights": None,
        "data": "synthetic",
        "precision": args.precision,
        "steps": 2 * args.steps,
        "save_every": args.steps,
        "log_every": args.log_every,
        "batch_size": args.batch_size,
        "lr": 1e-3,
        "warmup": 2,
        "workers": args.workers,
        "threads": args.threads,
        "seed": 0,
    }


def make_tiny_clip(folder: Path) -> None:
    """A random tiny CLIP in open_clip's local-dir layout (what the clip stage exports)."""
    import open_clip

    from train.stages import export_clip

    torch.manual_seed(0)
    export_clip(open_clip.CLIP(**TINY_CLIP), TINY_CLIP, (0.5,) * 3, (0.25,) * 3, folder)


def make_config(settings: dict, out: Path) -> TrainConfig:
    config = TrainConfig(out=out, **settings)
    config.check()
    return config


def deterministic() -> None:
    """Kernels that compute the same numbers in two processes (a warning where an op has no such kernel)."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = False


def child(settings_file: Path, out: Path, kill_at: int) -> int:
    """The killed run: a CheckTrainer that dies by SIGKILL after the checkpoint of ``kill_at``."""
    deterministic()
    config = make_config(json.loads(settings_file.read_text()), out)
    CheckTrainer(config, kill_at=kill_at).run()
    return 0  # not reached when the kill works


def run_in_process(config: TrainConfig) -> tuple[CheckTrainer, int, dict[str, torch.Tensor]]:
    """``Trainer.run`` step by step: the trainer, the step it started at (0: from scratch) and the
    weights it started from."""
    trainer = CheckTrainer(config)
    trainer.setup()
    trainer.check_outputs()
    trainer.resume()
    started = trainer.step
    initial = {k: v.detach().clone() for k, v in trainer.stage.state_dict().items()}
    trainer.train()
    trainer.export()
    return trainer, started, initial


def log_records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].float().cpu() - b[k].float().cpu()).abs().max()) for k in a)


def check(args: argparse.Namespace, work: Path) -> dict:
    """The three runs and what they show; ``result["failures"]`` lists what failed."""
    settings = settings_for(args, work)
    settings_file = work / "settings.json"
    settings_file.write_text(json.dumps(settings, indent=2))
    n, device = args.steps, torch.device(settings["device"])
    failures: list[str] = []
    result: dict = {"settings": settings, "failures": failures}
    print(machine_line(device))
    print(
        f"PACL stage, {settings['clip']} (random init), {settings['image_size']} px, {settings['precision']}, "
        f"batch {settings['batch_size']}, {2 * n} steps; killed after step {n}, resumed to {2 * n}"
    )

    # 1. straight
    started = time.perf_counter()
    straight, _, initial = run_in_process(make_config(settings, work / "straight"))
    result["straight_seconds"] = time.perf_counter() - started
    final = {k: v.detach().clone() for k, v in straight.stage.state_dict().items()}
    records = log_records(work / "straight")
    windows = [r["images_per_s"] for r in records[1:]] or [r["images_per_s"] for r in records]
    result["run_images_per_s"] = statistics.median(windows)
    result["step_images_per_s"] = fixed_batch_rate(straight, args.timed_steps)

    # 2. killed (a child process)
    killed_out = work / "killed"
    log_file = work / "killed.log"
    with open(log_file, "w") as log:
        process = subprocess.run(
            [sys.executable, "-m", "benchmarks.train_check", "--child", str(settings_file), str(killed_out), str(n)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])),
            timeout=args.child_timeout,
        )
    result["killed_exit"] = process.returncode
    if process.returncode != -signal.SIGKILL:
        tail = log_file.read_text(errors="replace")[-1500:]
        failures.append(f"the killed run ended with exit {process.returncode}, not SIGKILL; its log ends: {tail!r}")
        return result
    if not checkpoint_path(killed_out, n).is_file() or (killed_out / "pacl.safetensors").exists():
        failures.append(f"the killed run did not stop right after its checkpoint of step {n}")
        return result
    checkpoint = read_checkpoint(checkpoint_path(killed_out, n))
    result["checkpoint_cuda_rng_devices"] = len(checkpoint["cuda_rng"][0])
    if device.type == "cuda" and len(checkpoint["cuda_rng"][0]) != torch.cuda.device_count():
        failures.append("the checkpoint does not hold the CUDA RNG of every device")

    # 3. resumed
    resumed, resumed_at, _ = run_in_process(make_config(settings, killed_out))
    result["resumed_at"] = resumed_at
    if resumed_at != n:
        failures.append(f"the resumed run started at step {resumed_at}, not {n}")
    losses = [r["loss"] for r in records + log_records(killed_out)]
    result["losses_finite"] = all(math.isfinite(x) for x in losses)
    result["first_loss"], result["last_loss"] = records[0]["loss"], records[-1]["loss"]
    if not result["losses_finite"]:
        failures.append("a logged loss is not finite")
    resumed_weights = resumed.stage.state_dict()
    difference = max_difference(resumed_weights, final)
    moved = max_difference(final, initial)
    result.update(
        max_weight_difference=difference,
        max_training_change=moved,
        bitwise_equal=all(torch.equal(resumed_weights[k].cpu(), final[k].cpu()) for k in final),
    )
    if not moved > 0:
        failures.append("training did not change the weights")
    elif difference > args.tolerance * moved:
        failures.append(
            f"the resumed weights differ from the straight run's by {difference:.3g}, over "
            f"{args.tolerance:g} x the {moved:.3g} that training moved them"
        )
    later = range(n + 1, 2 * n + 1)
    result["draws_equal_after_resume"] = all(torch.equal(resumed.draws[s], straight.draws[s]) for s in later)
    result["draws_differ_from_a_fresh_seed"] = not torch.equal(straight.draws[n + 1], straight.draws[1])
    if not result["draws_equal_after_resume"]:
        failures.append(f"the random numbers drawn on {device.type} after step {n} differ: its RNG was not resumed")
    if not result["draws_differ_from_a_fresh_seed"]:
        failures.append("the draws after step N equal those of step 1: they cannot tell a resumed RNG from a fresh one")
    return result


def fixed_batch_rate(trainer: Trainer, steps: int) -> float:
    """Images/s of ``train_step`` alone on one batch, synchronised: the step without data loading, with the
    kernels a run gets by default (not the deterministic ones the comparison needs)."""
    batch = next(iter(trainer.loader()))
    module = trainer.stage.module
    torch.use_deterministic_algorithms(False)
    try:
        trainer.train_step(module, batch)  # warm-up
        seconds = [timed(lambda: trainer.train_step(module, batch), trainer.device)[0] for _ in range(steps)]
    finally:
        deterministic()
    return batch["images"].shape[0] / statistics.median(seconds)


def report(result: dict, args: argparse.Namespace) -> None:
    s = result["settings"]
    print("\n| what | value |\n|---|---|")
    rows = [
        (
            "straight run, images/s (log windows after the first; data loading, deterministic kernels)",
            "run_images_per_s",
            ".1f",
        ),
        ("train_step alone on a fixed batch, images/s", "step_images_per_s", ".1f"),
        ("straight run, seconds (2N steps, set-up and export included)", "straight_seconds", ".1f"),
        ("first / last loss", None, None),
        ("killed run exit status", "killed_exit", ""),
        ("CUDA RNG states in the checkpoint (devices)", "checkpoint_cuda_rng_devices", ""),
        ("resumed at step", "resumed_at", ""),
        ("largest abs(resumed - straight) weight difference", "max_weight_difference", ".3g"),
        ("largest change training made to a weight", "max_training_change", ".3g"),
        ("weights bitwise equal", "bitwise_equal", ""),
        ("device draws after the resume equal", "draws_equal_after_resume", ""),
    ]
    for label, key, spec in rows:
        if key is None:
            if "first_loss" in result:
                print(f"| {label} | {result['first_loss']:.4f} / {result['last_loss']:.4f} |")
        elif key in result:
            print(f"| {label} | {format(result[key], spec)} |")
    failures = result["failures"]
    summary = (
        f"{s['clip']} {s['precision']} on {s['device']}, {result.get('step_images_per_s', float('nan')):.1f} images/s"
    )
    if failures:
        print(f"train_check: FAIL ({summary}): {'; '.join(failures)}")
    else:
        print(f"train_check: PASS ({summary}; kill at step {args.steps} and resume equal an uninterrupted run)")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="the same code path on the CPU, tiny (default: off)")
    parser.add_argument("--model", default="ViT-B-16", help="open_clip model, random init (default: ViT-B-16)")
    parser.add_argument("--image-size", type=int, default=224, help="training image side (default: 224)")
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp32", "fp16"), help="(default: bf16)")
    parser.add_argument("--steps", type=int, default=None, help="N: kill after N, run to 2N (default: 20; dry: 3)")
    parser.add_argument("--batch-size", type=int, default=None, help="pairs per step (default: 64; dry: 8)")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: 8; dry: 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; dry: 1)")
    parser.add_argument("--log-every", type=int, default=None, help="log window in steps (default: 5; dry: 1)")
    parser.add_argument("--timed-steps", type=int, default=None, help="fixed-batch steps timed (default: 10; dry: 2)")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=1e-3,
        help="largest |resumed - straight| weight difference, as a fraction of the largest change training "
        "made (default: 1e-3; a lost batch or optimiser state moves weights by a few percent of it)",
    )
    parser.add_argument("--child-timeout", type=float, default=300, help="seconds for the killed run (default: 300)")
    parser.add_argument("--work", type=Path, default=None, help="run folders here, kept (default: a temp folder)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here (default: none)")
    parser.add_argument("--child", nargs=3, metavar=("SETTINGS", "OUT", "KILL_AT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    defaults = {"steps": (20, 3), "batch_size": (64, 8), "workers": (8, 1), "threads": (None, 1), "log_every": (5, 1),
                "timed_steps": (10, 2)}  # fmt: skip
    for name, (gpu, dry) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, dry if args.dry_run else gpu)
    if args.steps < 2:
        parser.error("--steps must be >= 2")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.child:
        settings_file, out, kill_at = args.child
        return child(Path(settings_file), Path(out), int(kill_at))
    if not args.dry_run and not torch.cuda.is_available():
        print("train_check: FAIL: no CUDA device (use --dry-run on a CPU)")
        return 1
    logging.basicConfig(level=logging.ERROR)  # the random-CLIP warning is expected here
    warnings.filterwarnings("ignore", message=".*RANDOM.*")
    deterministic()
    work = args.work or Path(tempfile.mkdtemp(prefix="train_check."))
    for name in ("straight", "killed"):
        shutil.rmtree(work / name, ignore_errors=True)  # a rerun starts clean
    work.mkdir(parents=True, exist_ok=True)
    try:
        result = check(args, work)
    except Exception as error:  # any fault is a FAIL line, with the traceback above it for whoever reads the log
        import traceback

        traceback.print_exc()
        result = {"settings": {}, "failures": [f"{type(error).__name__}: {error}"]}
        print(f"train_check: FAIL: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
    else:
        report(result, args)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        device = torch.device(result["settings"].get("device", "cpu"))
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        write_results(args.json, {"machine": machine_line(device), "versions": versions(), "config": config, **result})
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
