"""One image through ``pacl-fast segment`` in a fresh process, cold (empty caches) and warm (the same command
again), against a naive open_clip script doing the same job; and where each one's seconds go.

    python -m benchmarks.cold_start                            # ViT-B-16 weights file, 640x427 photo, 5 labels
    python -m benchmarks.cold_start --rounds 5 --json out.json
    python -m benchmarks.cold_start --model tiny --rounds 1    # the plumbing in seconds (what the tests run)

Made once, in the work folder it prints (``--work``, default ``$TMPDIR/pacl-fast-cold-start``): a random-init
open_clip weights file (safetensors; ViT-B-16, or a tiny config as a ``local-dir:`` folder) and a photo-like
640x427 JPEG (a synthetic scene, upscaled). Then, per round, each in a fresh process:

* **naive**: the script a user would write (:data:`NAIVE_SCRIPT`): open_clip ``create_model_and_transforms``
  with the weights file, 5 labels x CLIP's 80 ImageNet templates at full length in fp32, the image's patch
  tokens through ``visual.proj``, cosine, ``F.interpolate`` to the image, argmax, a PNG written with PIL;
* **cold**: ``python -m pacl_fast segment photo.jpg --labels ... --out OUT --clip ... --clip-weights W`` with
  ``PACL_FAST_CACHE`` an empty folder (no text cache, no exported encoders, no remembered weights digest);
* **warm**: the same command again, same cache, a new ``--out`` (the same one would be skipped as done): the
  text embeddings and the weights file's sha256 (``$PACL_FAST_CACHE/digests``) come from the cold run.

Wall time is measured around each process (start to exit). The breakdown is what each process says itself: our
command with ``PACL_FAST_TIMINGS=1`` (``pacl_fast.cli.common.Timings``), the naive script with the same clock
(import statements, then its steps); ``exit`` is the wall time after the process's last line (the
interpreter's teardown). Medians over the rounds; runs alternate (naive, cold, warm, naive, ...), so that a
change in the machine's load hits all three. The machine is shared: the load average is printed before and
after, and only ratios measured in the same run mean anything.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from benchmarks.common import write_results

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "cold_start_cpu.json"
DEFAULT_LABELS = "road,car,tree,sky,person"
PHOTO_SIZE = (640, 427)  # width, height
#: The issue's goals: cold and warm segment against the naive script.
GOALS = {"cold": 3.0, "warm": 5.0}
PHASES = ("imports", "model", "text", "images", "writing", "other")

#: What a user would write to do the same with open_clip alone: plain, no speed options. The stamps only read
#: the clock (``timings:`` on stderr, as ``pacl-fast`` says it); they change nothing it computes.
NAIVE_SCRIPT = r"""
import time
started = time.perf_counter()
import os
import sys
import numpy as np
import torch
import torch.nn.functional as F
import open_clip
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from PIL import Image
imported = time.perf_counter()

clip, weights, photo, out, labels = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5].split(",")
if weights:
    model, _, preprocess = open_clip.create_model_and_transforms(clip, pretrained=weights)
else:
    model, _, preprocess = open_clip.create_model_and_transforms(clip)
tokenizer = open_clip.get_tokenizer(clip)
model.eval()
built = time.perf_counter()
with torch.no_grad():
    text = []
    for label in labels:
        tokens = tokenizer([template(label) for template in OPENAI_IMAGENET_TEMPLATES])
        embedding = F.normalize(model.encode_text(tokens), dim=-1).mean(0)
        text.append(F.normalize(embedding, dim=0))
    text = torch.stack(text)  # [C, E]
    texted = time.perf_counter()
    image = Image.open(photo).convert("RGB")
    size = model.visual.image_size[0]
    pixels = preprocess(image.resize((size, size), Image.BICUBIC)).unsqueeze(0)
    model.visual.output_tokens = True
    _, tokens = model.visual(pixels)  # [1, N, D]
    patches = F.normalize(tokens @ model.visual.proj, dim=-1)  # [1, N, E]
    grid = model.visual.grid_size
    logits = (patches @ text.T).reshape(1, grid[0], grid[1], -1).permute(0, 3, 1, 2)
    logits = F.interpolate(logits, size=(image.height, image.width), mode="bilinear")
    label_map = logits.argmax(1)[0].numpy().astype(np.uint8)
imaged = time.perf_counter()
Image.fromarray(label_map).save(out)
written = time.perf_counter()


def process_age():
    try:
        fields = open("/proc/self/stat").read().rpartition(")")[2].split()
        return time.clock_gettime(time.CLOCK_BOOTTIME) - int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except Exception:
        return written - started


total = process_age()
steps = {"model": built - imported, "text": texted - built, "images": imaged - texted, "writing": written - imaged}
steps = {"imports": total - sum(steps.values()), **steps}
sys.stderr.write("timings: " + ", ".join(f"{k} {v:.2f} s" for k, v in steps.items()) + f", total {total:.2f} s\n")
"""

TIMINGS = re.compile(r"timings: (.*)$", re.MULTILINE)


def parse_timings(stderr: str) -> dict[str, float]:
    """``timings: imports 3.10 s, model 1.20 s, ..., total 5.80 s`` (the last such line) -> ``{name: seconds}``."""
    found = TIMINGS.findall(stderr)
    if not found:
        raise RuntimeError(f"no 'timings:' line on stderr:\n{stderr[-3000:]}")
    parts = {}
    for part in found[-1].split(", "):
        name, seconds, unit = part.rsplit(" ", 2)
        if unit != "s":
            raise RuntimeError(f"cannot read timings part {part!r}")
        parts[name] = float(seconds)
    return parts


# ------------------------------------------------------------------------------------------- the inputs


def tiny_config() -> dict:
    from pacl_fast.demo import TINY_CLIP_CONFIG

    return TINY_CLIP_CONFIG


def make_inputs(work: Path, model: str) -> dict[str, str]:
    """The weights (a file, or a ``local-dir:`` folder for ``tiny``) and the photo, made once in ``work``."""
    import open_clip
    import torch
    from PIL import Image

    from pacl_fast.data.synthetic import render_scene
    from pacl_fast.files import atomic_write

    work.mkdir(parents=True, exist_ok=True)
    photo = work / "photo.jpg"
    if not photo.is_file():
        scene = render_scene(3, seed=20).image  # [64, 64, 3] uint8: shapes, textures, a background
        picture = Image.fromarray(np.asarray(scene)).resize((PHOTO_SIZE[0], PHOTO_SIZE[0]), Image.BICUBIC)
        top = (PHOTO_SIZE[0] - PHOTO_SIZE[1]) // 2
        picture = picture.crop((0, top, PHOTO_SIZE[0], top + PHOTO_SIZE[1]))
        noise = np.random.default_rng(0).normal(0, 6, (PHOTO_SIZE[1], PHOTO_SIZE[0], 3))  # sensor grain
        pixels = np.clip(np.asarray(picture, np.float32) + noise, 0, 255).astype(np.uint8)
        temporary = photo.with_suffix(".tmp.jpg")
        Image.fromarray(pixels).save(temporary, quality=90)
        temporary.replace(photo)
    folder = work / model
    folder.mkdir(exist_ok=True)
    weights = folder / "open_clip_model.safetensors"
    if not weights.is_file():
        from safetensors.torch import save_file

        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if model == "tiny":
                clip = open_clip.CLIP(**tiny_config())
                atomic_write(folder / "open_clip_config.json", json.dumps({"model_cfg": tiny_config()}))
            else:
                logging.disable(logging.WARNING)  # open_clip's "initialized randomly": that is the point here
                try:
                    clip = open_clip.create_model(model)
                finally:
                    logging.disable(logging.NOTSET)
        temporary = weights.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(temporary))
        temporary.replace(weights)
    if model == "tiny":
        return {"clip": f"local-dir:{folder}", "weights": "", "photo": str(photo)}
    return {"clip": model, "weights": str(weights), "photo": str(photo)}


# ------------------------------------------------------------------------------------------- the runs


def run_process(argv: list[str], env: dict[str, str], timeout: float) -> tuple[float, dict[str, float], str]:
    """Wall seconds of one fresh process, what it says its phases took, its stdout; RuntimeError if it fails."""
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    phases = parse_timings(done.stderr)
    phases["exit"] = max(0.0, wall - phases.pop("total"))
    return wall, phases, done.stdout


def segment_argv(inputs: dict[str, str], labels: str, out: Path) -> list[str]:
    argv = [sys.executable, "-m", "pacl_fast", "segment", inputs["photo"], "--labels", labels, "--out", str(out)]
    argv += ["--clip", inputs["clip"], "--quiet"]
    return argv + (["--clip-weights", inputs["weights"]] if inputs["weights"] else [])


def labels_png(out: Path) -> bytes:
    found = sorted(out.glob("*_labels.png"))
    if len(found) != 1:
        raise RuntimeError(f"expected one label map in {out}, found {[p.name for p in found]}")
    return found[0].read_bytes()


def measure(args: argparse.Namespace, inputs: dict[str, str], work: Path) -> dict:
    naive_script = work / "naive.py"
    naive_script.write_text(NAIVE_SCRIPT)
    base = {**os.environ, "HF_HUB_OFFLINE": "1", "PACL_FAST_TIMINGS": "1"}
    samples: dict[str, list[dict]] = {"naive": [], "cold": [], "warm": []} if args.naive else {"cold": [], "warm": []}
    same_labels = []
    for round_ in range(args.rounds):
        runs = work / f"round{round_}"
        shutil.rmtree(runs, ignore_errors=True)
        cache = runs / "cache"  # empty: the cold run's
        cache.mkdir(parents=True)
        if args.naive:
            naive = [sys.executable, str(naive_script), inputs["clip"], inputs["weights"], inputs["photo"],
                     str(runs / "naive.png"), args.labels]  # fmt: skip
            wall, phases, _ = run_process(naive, base, args.timeout)
            samples["naive"].append({"wall_s": wall, **phases})
        outputs = {}
        for kind in ("cold", "warm"):
            out = runs / f"out-{kind}"
            wall, phases, stdout = run_process(
                segment_argv(inputs, args.labels, out), {**base, "PACL_FAST_CACHE": str(cache)}, args.timeout
            )
            if not stdout.startswith("1 written"):
                raise RuntimeError(f"the {kind} run did not segment the photo: {stdout!r}")
            samples[kind].append({"wall_s": wall, **phases})
            outputs[kind] = labels_png(out)
        same_labels.append(outputs["cold"] == outputs["warm"])
        print(f"round {round_ + 1}: " + ", ".join(f"{k} {v[-1]['wall_s']:.2f} s" for k, v in samples.items()),
              flush=True)  # fmt: skip
        if not args.keep:
            shutil.rmtree(runs, ignore_errors=True)
    return {"samples": samples, "warm_labels_equal_cold": all(same_labels)}


def medians(samples: list[dict]) -> dict[str, float]:
    keys = {key for sample in samples for key in sample}
    return {key: statistics.median(sample.get(key, 0.0) for sample in samples) for key in sorted(keys)}


def table(rows: dict[str, dict[str, float]]) -> str:
    columns = [*PHASES, "exit"]
    head = "| run | wall s | vs naive | " + " | ".join(columns) + " |"
    lines = [head, "|" + "---|" * (3 + len(columns))]
    naive = rows["naive"]["wall_s"] if "naive" in rows else None
    for name, row in rows.items():
        cells = [f"{row.get(column, 0.0):.2f}" for column in columns]
        ratio = "-" if naive is None else f"{naive / row['wall_s']:.2f}x"
        lines.append(f"| {name} | {row['wall_s']:.2f} | {ratio} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-16", help="an open_clip model name, or 'tiny' (a test config)")
    parser.add_argument("--labels", default=DEFAULT_LABELS, help="comma-separated class names (5 by default)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of (naive, cold, warm); medians are reported")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "pacl-fast-cold-start",
                        help="where the weights file and photo are made once and the runs write")  # fmt: skip
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one process may take")
    parser.add_argument("--keep", action="store_true", help="keep each round's outputs and caches")
    parser.add_argument("--no-naive", dest="naive", action="store_false",
                        help="only cold and warm (no ratios): the plumbing in two processes, not three")  # fmt: skip
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")

    import torch

    from benchmarks.common import machine_line

    print(machine_line(torch.device("cpu")))
    print(f"work folder: {args.work} (weights and photo made once, reused)")
    inputs = make_inputs(args.work, args.model)
    load_before = os.getloadavg()
    print(f"load average before: {' '.join(f'{x:.2f}' for x in load_before)} ({os.cpu_count()} CPUs)")
    print(f"config: {args.model}, photo {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]}, labels {args.labels}, {args.rounds} rounds")
    measured = measure(args, inputs, args.work)
    load_after = os.getloadavg()
    print(f"load average after: {' '.join(f'{x:.2f}' for x in load_after)}")
    rows = {name: medians(samples) for name, samples in measured["samples"].items()}
    print(table(rows))
    ratios = {kind: rows["naive"]["wall_s"] / rows[kind]["wall_s"] for kind in GOALS if "naive" in rows}
    for kind, goal in GOALS.items() if ratios else ():
        verdict = "met" if ratios[kind] >= goal else "NOT met"
        print(f"{kind}: {ratios[kind]:.2f}x faster than the naive script (goal >= {goal:g}x: {verdict})")
    print(f"warm label maps equal the cold ones: {measured['warm_labels_equal_cold']}")
    config = {"model": args.model, "photo": list(PHOTO_SIZE), "labels": args.labels.split(","),
              "rounds": args.rounds, "work": str(args.work)}  # fmt: skip
    config["command"] = ["python", *segment_argv(inputs, args.labels, Path("OUT"))[1:]]
    write_results(
        args.json,
        {
            "benchmark": "cold_start",
            "machine": machine_line(torch.device("cpu")),
            "load_average_before": load_before,
            "load_average_after": load_after,
            "config": config,
            "medians": rows,
            "ratios": ratios,
            "goals": GOALS,
            **measured,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
