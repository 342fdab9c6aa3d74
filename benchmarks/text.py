"""Text-embedding benchmark: class names x templates -> class embeddings, today's path vs the new one.

    python -m benchmarks.text                      # ViT-B-16, ADE20K's 150 names x CLIP's 80 templates
    python -m benchmarks.text --today-full         # run today's path on every prompt (~10 min on 2 cores)

Paths, all on a random-init open_clip ViT-B-16 (the same weights; random weights cost what
pretrained ones do), in one run:

* ``today``: open_clip's own text tower in fp32 at the full 77 tokens, batches of 256 prompts, the
  template ensemble of ``prompts.ensemble_text_embeddings``: what ``Segmenter.encode_labels`` did.
  It takes ~10 minutes on 2 cores, so by default it runs on the first labels' prompts only
  (``--today-prompts``, whole labels), half before the new paths and half after them (the machine
  may be shared), and its time is scaled to all prompts (the work is linear in prompts: fixed
  length, fixed batch).
* ``cold``: ``prompts.TextEmbedder`` through the eager torch encoder (text in fp32) with an empty
  disk cache: tokenizing, each prompt run up to its end-of-text token with the prefix it shares
  with the other labels' prompts of its template run once, the ensemble, writing 150 entries.
* ``cold bf16``: the same with ``text_dtype=bfloat16`` (another cache key, so cold too).
* ``warm``: a fresh ``TextEmbedder`` over the filled cache (150 file reads), and the same in a new
  Python process; the key of random weights needs a hash of the text tower's tensors, timed
  apart (a pretrained tag or a checkpoint file names its weights without it).

Work is counted first: the tokens each path runs through the tower and the FLOPs they cost
(``24 D^2`` per token per layer for the projections and MLP, plus ``4 D n`` for attention over
``n`` positions), reported as GFLOP/s and as a fraction of a large matmul in the same precision,
measured in the same run.
"""

from __future__ import annotations

import os

# Idle OpenMP threads must not spin while other work waits for the cores (see benchmarks/throughput.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import machine_line, matmul_ceiling, write_results  # noqa: E402
from pacl_fast.backbone import RandomWeightsWarning  # noqa: E402
from pacl_fast.build import build_model  # noqa: E402
from pacl_fast.data.segmentation import ADE20K_CLASSES  # noqa: E402
from pacl_fast.encoders import TorchEncoder  # noqa: E402
from pacl_fast.prompts import IMAGENET_TEMPLATES, TextEmbedder, ensemble_text_embeddings  # noqa: E402
from pacl_fast.text_cache import text_model_key  # noqa: E402

SEED = 0
TODAY_BATCH = 256


def load_model(arch: str, device: str = "cpu"):  # noqa: ANN201 - PACL
    torch.manual_seed(SEED)  # the same random weights in every process
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        model, _ = build_model(arch, method="pacl", device=device)
    return model.eval()


def tower_flops(backbone, tokens: int, attended: int) -> float:  # noqa: ANN001
    """FLOPs of ``tokens`` token positions through the text transformer, each scoring ``attended``
    positions (per layer: 24 D^2 for projections and MLP, 4 D n for scores and values; the causal
    mask hides half of them, but attention kernels compute the whole square)."""
    width, layers = backbone.clip.transformer.width, backbone.clip.transformer.layers
    return tokens * layers * (24 * width**2 + 4 * width * attended)


def count_new_work(backbone, labels, templates) -> tuple[int, float]:  # noqa: ANN001
    """Tokens the new path runs (per template: the shared prefix once, then each prompt's rest up to
    its end-of-text token) and their FLOPs."""
    tokens_run, flops = 0, 0.0
    for template in templates:
        tokens = backbone.tokenize([template.format(label) for label in labels], warn=False)
        lengths = backbone.text_lengths(tokens)
        same = (tokens[:, : int(lengths.max())] == tokens[:1, : int(lengths.max())]).all(0)
        prefix = min(int(same.long().cumprod(0).sum()), int(lengths.min()) - 1)
        tokens_run += prefix + int((lengths - prefix).sum())
        flops += tower_flops(backbone, prefix, prefix)
        for length in lengths.tolist():
            flops += tower_flops(backbone, length - prefix, length)
    return tokens_run, flops


def warm_child(arch: str, cache_dir: str, labels: int, templates: int, device: str) -> None:
    """``--warm-child``: a new process reading the filled cache; prints its timings as JSON."""
    model = load_model(arch, device)
    encoder = TorchEncoder(model)
    start = time.perf_counter()
    text_model_key(model.backbone, backend=encoder.name, dtype=encoder.text_dtype)  # hashes the random weights
    key_seconds = time.perf_counter() - start
    text = TextEmbedder.for_model(model.backbone, encoder, cache_dir=cache_dir, progress=False)
    start = time.perf_counter()
    text(ADE20K_CLASSES[:labels], IMAGENET_TEMPLATES[:templates])
    seconds = time.perf_counter() - start
    print(json.dumps({"key_seconds": key_seconds, "seconds": seconds, "encoded_prompts": text.encoded_prompts}))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.text", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="ViT-B-16", help="open_clip model (random init; default ViT-B-16)")
    parser.add_argument("--labels", type=int, default=150, help="first N ADE20K class names (default 150)")
    parser.add_argument("--templates", type=int, default=80, help="first N of CLIP's 80 templates (default 80)")
    parser.add_argument("--today-prompts", type=int, default=1040, help="prompts today's path runs (whole labels)")
    parser.add_argument("--today-full", action="store_true", help="run today's path on every prompt")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 text row")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/text_cpu.json"))
    parser.add_argument("--warm-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not 1 <= args.labels <= len(ADE20K_CLASSES) or not 1 <= args.templates <= len(IMAGENET_TEMPLATES):
        parser.error(f"--labels must be 1..{len(ADE20K_CLASSES)} and --templates 1..{len(IMAGENET_TEMPLATES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.warm_child:
        warm_child(args.arch, args.warm_child, args.labels, args.templates, args.device)
        return {}

    labels, templates = list(ADE20K_CLASSES[: args.labels]), IMAGENET_TEMPLATES[: args.templates]
    prompts = len(labels) * len(templates)
    device = torch.device(args.device)
    machine = machine_line(device)
    print(f"machine: {machine}")
    model = load_model(args.arch, args.device)
    backbone = model.backbone
    ceiling, ceiling16 = matmul_ceiling(torch.float32, device), matmul_ceiling(torch.bfloat16, device)
    today_labels = (
        len(labels) if args.today_full else max(1, min(len(labels), -(-args.today_prompts // len(templates))))
    )
    print(
        f"config: {args.arch} (random init), {len(labels)} ADE20K names x {len(templates)} templates = {prompts} "
        f"prompts; today's path on {today_labels * len(templates)} of them; matmul {ceiling / 1e9:.0f} GFLOP/s "
        f"fp32, {ceiling16 / 1e9:.0f} bf16"
    )

    context = backbone.context_length
    new_tokens, new_flops = count_new_work(backbone, labels, templates)
    today_flops = tower_flops(backbone, prompts * context, context)
    print(
        f"work: today {prompts * context} tokens ({today_flops / 1e12:.1f} TFLOP); new {new_tokens} tokens "
        f"({new_flops / 1e12:.2f} TFLOP): {today_flops / new_flops:.1f}x less"
    )

    def today(subset: list[str]) -> tuple[float, torch.Tensor]:
        def encode(batch: list[str]) -> torch.Tensor:
            return backbone.clip.encode_text(backbone.tokenize(batch, warn=False).to(device), normalize=True)

        start = time.perf_counter()
        with torch.inference_mode():
            embeddings = ensemble_text_embeddings(encode, subset, templates, batch_size=TODAY_BATCH)
        return time.perf_counter() - start, embeddings

    half = max(1, today_labels // 2)
    first_seconds, first = today(labels[:half])

    rows = []
    with tempfile.TemporaryDirectory(prefix="pacl-text-bench-") as cache_dir:
        encoder = TorchEncoder(model)
        start = time.perf_counter()
        text_model_key(backbone, backend=encoder.name, dtype=encoder.text_dtype)  # hashes the random weights, once
        key_seconds = time.perf_counter() - start
        cold = TextEmbedder.for_model(backbone, encoder, cache_dir=cache_dir, progress=True)
        start = time.perf_counter()
        new = cold(labels, templates)
        cold_seconds = time.perf_counter() - start
        assert cold.encoded_prompts == prompts

        bf16_row = None
        if not args.no_bf16:
            encoder16 = TorchEncoder(model, text_dtype=torch.bfloat16)
            cold16 = TextEmbedder.for_model(backbone, encoder16, cache_dir=cache_dir, progress=True)
            start = time.perf_counter()
            new16 = cold16(labels, templates)
            bf16_row = (time.perf_counter() - start, F.cosine_similarity(new16, new, dim=-1).min().item())

        warm = TextEmbedder.for_model(backbone, encoder, cache_dir=cache_dir, progress=False)
        start = time.perf_counter()
        warm_embeddings = warm(labels, templates)
        warm_seconds = time.perf_counter() - start
        assert warm.encoded_prompts == 0 and torch.equal(warm_embeddings, new)

        child_command = [sys.executable, "-m", "benchmarks.text", "--arch", args.arch, "--warm-child", cache_dir]
        child_command += ["--labels", str(args.labels), "--templates", str(args.templates), "--device", args.device]
        if args.threads:
            child_command += ["--threads", str(args.threads)]
        child = json.loads(subprocess.run(child_command, capture_output=True, text=True, check=True).stdout.strip())
        assert child["encoded_prompts"] == 0, "the new process missed the cache"

    second_seconds, second = today(labels[half:today_labels]) if today_labels > half else (0.0, first[:0])
    today_seconds = (first_seconds + second_seconds) * len(labels) / today_labels
    reference = torch.cat([first, second])
    agreement = F.cosine_similarity(new[:today_labels], reference, dim=-1).min().item()

    def row(path: str, seconds: float, encoded: int, flops: float, note: str = "", peak: float = ceiling) -> dict:
        return {
            "path": path,
            "seconds": seconds,
            "prompts_encoded": encoded,
            "prompts_per_s": encoded / seconds if encoded else None,
            "speedup_vs_today": today_seconds / seconds,
            "gflops_per_s": flops / seconds / 1e9 if flops else None,
            "fraction_of_matmul": flops / seconds / peak if flops else None,
            "note": note,
        }

    scaled = "" if args.today_full else f"timed on {today_labels * len(templates)} prompts, scaled to {prompts}"
    rows.append(row("today: open_clip fp32, 77 tokens", today_seconds, prompts, today_flops, scaled))
    rows.append(row("cold: TextEmbedder, fp32", cold_seconds, prompts, new_flops, "empty cache; includes tokenizing"))
    if bf16_row is not None:
        note = f"min cos to fp32 {bf16_row[1]:.5f}"
        rows.append(row("cold: TextEmbedder, bf16 text", bf16_row[0], prompts, new_flops, note, ceiling16))
    rows.append(row("warm: fresh TextEmbedder", warm_seconds, 0, 0.0, f"{len(labels)} cache files read"))
    rows.append(row("warm: new process", child["seconds"], 0, 0.0, f"+ {child['key_seconds']:.2f} s weight hash"))
    summary = {
        "machine": machine,
        "date": time.strftime("%Y-%m-%d"),
        "command": "python -m benchmarks.text " + " ".join(argv if argv is not None else sys.argv[1:]),
        "arch": args.arch,
        "labels": len(labels),
        "templates": len(templates),
        "prompts": prompts,
        "today_prompts_timed": today_labels * len(templates),
        "matmul_flops_per_s": {"fp32": ceiling, "bf16": ceiling16},
        "tokens": {"today": prompts * context, "new": new_tokens},
        "flops": {"today": today_flops, "new": new_flops},
        "random_weights_hash_seconds": key_seconds,
        "new_vs_today_min_cosine": agreement,
        "rows": rows,
    }
    print()
    print("| path | time (s) | prompts/s | vs today | GFLOP/s | of matmul | note |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        rate = f"{r['prompts_per_s']:.0f}" if r["prompts_per_s"] else "-"
        gflops = f"{r['gflops_per_s']:.0f}" if r["gflops_per_s"] else "-"
        fraction = f"{r['fraction_of_matmul']:.0%}" if r["fraction_of_matmul"] else "-"
        print(
            f"| {r['path']} | {r['seconds']:.2f} | {rate} | {r['speedup_vs_today']:.1f}x | {gflops} | {fraction} "
            f"| {r['note']} |"
        )
    print(
        f"\nnew vs today's embeddings (first {today_labels} labels): min cosine {agreement:.6f}; "
        f"hashing the random text tower for the cache key: {key_seconds:.2f} s"
    )
    write_results(args.json, summary)
    return summary


if __name__ == "__main__":
    main()
