"""Text-embedding benchmark: class names x templates -> class embeddings, the naive peer against ours.

    python -m benchmarks.text                      # ViT-B-16, 20 and 150 ADE20K names x CLIP's 80 templates
    python -m benchmarks.text --names 20           # one count
    python -m benchmarks.text --peer-names 150     # time the peer on every prompt (~10 min on 2 cores)
    python -m benchmarks.text --labels 3 --templates 2 --today-prompts 6   # older spellings, still taken

Paths, all on a random-init open_clip ViT-B-16 (the same weights; random weights cost what
pretrained ones do), in one run:

* ``peer``: open_clip's own text tower in fp32 at the full 77 tokens (``encode_text`` on the
  tokenized prompts, batches of 256), the template ensemble of ``prompts.ensemble_text_embeddings``:
  the naive script. Its work is linear in prompts (fixed length and batch), so it runs on the first
  ``--peer-names`` labels, half before our paths and half after them (the machine may be shared),
  and its time per prompt is scaled to each ``--names`` count.
* ``cold``: ``prompts.TextEmbedder`` through the eager torch encoder in a new Python process that has
  loaded the model and never run its text tower, with an empty disk cache: what a user's first
  ``segment`` pays (tokenizing, the tower's first calls, writing the entries, and where those seconds
  went). Then in that process: the same again (another empty cache: first-call costs gone), and with
  ``text_dtype=bfloat16`` (an empty cache).
* ``warm``: a fresh ``TextEmbedder`` over the filled cache, in that process and (largest count) in
  another new one (the key of random weights needs a hash of the text tower's tensors, timed apart: a
  pretrained tag or a checkpoint file names its weights without it).

Work is counted first, from the calls the embedder makes: positions the tower runs (ours: each
shared run of leading tokens once per packed sequence, then each prompt up to its end-of-text token,
padding included) and FLOPs (``24 D^2`` per position and layer for the projections and MLP, ``6 D^2``
in the last layer where only the keys and values are read; ``4 D S`` for attention over ``S``
positions, the whole square as the kernels compute it), reported as GFLOP/s and as a fraction of a
large matmul in the same precision, measured in the same run. Every path is compared with the peer
per label (cosine).
"""

from __future__ import annotations

import os

# Idle OpenMP threads must not spin while other work waits for the cores (see benchmarks/throughput.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from benchmarks.common import machine_line, matmul_ceiling, write_results  # noqa: E402
from pacl_fast.backbone import RandomWeightsWarning  # noqa: E402
from pacl_fast.build import build_model  # noqa: E402
from pacl_fast.data.segmentation import ADE20K_CLASSES  # noqa: E402
from pacl_fast.encoders import TorchEncoder  # noqa: E402
from pacl_fast.prompts import IMAGENET_TEMPLATES, TextEmbedder, ensemble_text_embeddings  # noqa: E402
from pacl_fast.text_cache import text_model_key  # noqa: E402
from pacl_fast.text_tower import pack_text, plan_text, pool_index, text_parts  # noqa: E402

SEED = 0
PEER_BATCH = 256
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def load_model(arch: str, device: str = "cpu"):  # noqa: ANN201 - PACL
    torch.manual_seed(SEED)  # the same random weights in every process
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        model, _ = build_model(arch, method="pacl", device=device)
    return model.eval()


def layer_flops(width: int, positions: int, attended: int) -> float:
    """FLOPs of ``positions`` positions through one plain block, each scoring ``attended`` positions."""
    return positions * (24 * width**2 + 4 * width * attended)


def peer_flops(backbone, prompts: int) -> float:  # noqa: ANN001
    """open_clip's tower on ``prompts`` prompts at the full context."""
    width, layers, context = backbone.clip.transformer.width, backbone.clip.transformer.layers, backbone.context_length
    return prompts * layers * layer_flops(width, context, context)


def our_work(backbone, labels: list[str], templates: tuple[str, ...]) -> tuple[int, float]:  # noqa: ANN001
    """Positions and FLOPs of the eager tower on the calls ``TextEmbedder`` makes for these labels
    (recorded by an embedder whose tower is a stand-in, then planned and packed as the tower does)."""
    calls = []

    def record(tokens: torch.Tensor) -> torch.Tensor:
        calls.append(tokens)
        return F.normalize(torch.randn(tokens.shape[0], backbone.embed_dim), dim=-1)

    TextEmbedder(record, backbone.tokenize, "count", use_disk_cache=False, progress=False)(labels, templates)
    parts = text_parts(backbone.clip)
    width, layers = backbone.clip.transformer.width, backbone.clip.transformer.layers
    positions, flops = 0, 0.0
    for tokens in calls:
        index = pool_index(parts, tokens)
        tokens = tokens[:, : int(index.max()) + 1]
        for step in pack_text(tokens, plan_text(tokens, index)):
            sequences, length = step.tokens.shape
            run = sequences * length
            positions += run
            flops += (layers - 1) * layer_flops(width, run, length)
            flops += run * 6 * width**2 + len(step.rows) * (18 * width**2 + 4 * width * length)  # the last block
    return positions, flops


def make_row(
    names: int, peer_seconds: float, ceilings: dict[str, float], path: str, seconds: float, flops: float, dtype: str,
    cosine: float | None, note: str,
) -> dict:  # fmt: skip
    """One row of the table: time, speed-up over the peer, FLOP rate and its fraction of the matmul ceiling."""
    return {
        "names": names,
        "path": path,
        "seconds": seconds,
        "speedup_vs_peer": peer_seconds / seconds,
        "gflops_per_s": flops / seconds / 1e9 if flops else None,
        "fraction_of_matmul": flops / seconds / ceilings[dtype] if flops else None,
        "min_cosine_to_peer": cosine,
        "note": note,
    }


def child(args: argparse.Namespace) -> None:
    """``--child cold:<cache>:<names>:<dtypes>`` in a new process: the first dtype cold (empty cache), then
    again in this process (another empty cache), the other dtypes in this process (empty caches), and
    warm over ``<cache>``; ``--child warm:<cache>:<names>:fp32``: warm only. JSON on stdout; each dtype's
    embeddings go to ``<cache>/embeddings-<names>-<dtype>.safetensors``."""
    mode, cache, names, dtypes = args.child.split(":")
    dtypes = dtypes.split(",")
    labels, templates = list(ADE20K_CLASSES[: int(names)]), IMAGENET_TEMPLATES[: args.templates]
    start = time.perf_counter()
    model = load_model(args.arch, args.device)
    encoders = {dtype: TorchEncoder(model, text_dtype=DTYPES[dtype]) for dtype in dtypes}
    result = {"model_seconds": time.perf_counter() - start}
    start = time.perf_counter()
    for encoder in encoders.values():  # hashes the random weights (once: the digest is kept)
        text_model_key(model.backbone, backend=encoder.name, dtype=encoder.text_dtype)
    result["key_seconds"] = time.perf_counter() - start

    def timed(folder: str | Path, dtype: str) -> tuple[float, TextEmbedder, torch.Tensor]:
        text = TextEmbedder.for_model(model.backbone, encoders[dtype], cache_dir=folder, progress=False)
        start = time.perf_counter()
        embeddings = text(labels, templates)
        return time.perf_counter() - start, text, embeddings

    if mode == "cold":
        for number, dtype in enumerate(dtypes):
            folder = Path(cache) / dtype
            seconds, text, embeddings = timed(folder, dtype)
            result[dtype] = {"seconds": seconds, "parts": text.seconds, "encoded": text.encoded_prompts}
            save_file(
                {"embeddings": embeddings.contiguous()}, str(Path(cache) / f"embeddings-{names}-{dtype}.safetensors")
            )
            if number == 0:
                with tempfile.TemporaryDirectory(prefix="pacl-text-again-") as again:
                    result["again_seconds"] = timed(again, dtype)[0]
    seconds, text, _ = timed(Path(cache) / dtypes[0], dtypes[0])
    result["warm_seconds"], result["warm_encoded"] = seconds, text.encoded_prompts
    print(json.dumps(result))


def run_child(args: argparse.Namespace, spec: str) -> dict:
    command = [sys.executable, "-m", "benchmarks.text", "--arch", args.arch, "--child", spec]
    command += ["--templates", str(args.templates), "--device", args.device]
    if args.threads:
        command += ["--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.text", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="ViT-B-16", help="open_clip model (random init; default ViT-B-16)")
    parser.add_argument("--names", default="20,150", help="ADE20K name counts, comma-separated (default 20,150)")
    parser.add_argument("--templates", type=int, default=80, help="first N of CLIP's 80 templates (default 80)")
    parser.add_argument("--peer-names", type=int, default=20, help="names the peer runs, timed and scaled (20)")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 text rows")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/text_cpu.json"))
    old = parser.add_argument_group("older spellings (scripts such as benchmarks/gpu_check.sh may pass them)")
    old.add_argument("--labels", type=int, default=None, help="--names N")
    old.add_argument("--today-prompts", type=int, default=None, help="the peer on this many prompts, in whole names")
    old.add_argument("--today-full", action="store_true", help="the peer on every name of --names")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.labels is not None:
        args.names = str(args.labels)
    if args.today_prompts is not None:
        args.peer_names = max(1, -(-args.today_prompts // max(1, args.templates)))
    try:
        counts = sorted({int(count) for count in args.names.split(",")})
    except ValueError:
        parser.error(f"--names must be comma-separated counts, got {args.names!r}")
    most = len(ADE20K_CLASSES)
    if args.today_full:
        args.peer_names = max(counts)
    if not all(1 <= count <= most for count in counts) or not 1 <= args.peer_names <= most:
        parser.error(f"--names and --peer-names must be 1..{most}")
    if not 1 <= args.templates <= len(IMAGENET_TEMPLATES):
        parser.error(f"--templates must be 1..{len(IMAGENET_TEMPLATES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        child(args)
        return {}

    templates = IMAGENET_TEMPLATES[: args.templates]
    device = torch.device(args.device)
    machine = machine_line(device)
    print(f"machine: {machine}")
    model = load_model(args.arch, args.device)
    backbone = model.backbone
    ceilings = {"fp32": matmul_ceiling(torch.float32, device), "bf16": matmul_ceiling(torch.bfloat16, device)}
    dtypes = ["fp32"] if args.no_bf16 else ["fp32", "bf16"]
    print(
        f"config: {args.arch} (random init), ADE20K names {counts} x {len(templates)} templates; the peer on "
        f"{args.peer_names} names; matmul {ceilings['fp32'] / 1e9:.0f} GFLOP/s fp32, {ceilings['bf16'] / 1e9:.0f} bf16"
    )
    work = {}
    for count in counts:
        labels = list(ADE20K_CLASSES[:count])
        positions, flops = our_work(backbone, labels, templates)
        prompts = count * len(templates)
        work[count] = {
            "prompts": prompts,
            "peer_positions": prompts * backbone.context_length,
            "peer_flops": peer_flops(backbone, prompts),
            "positions": positions,
            "flops": flops,
        }
        print(
            f"work, {count} names: peer {prompts * backbone.context_length} positions "
            f"({work[count]['peer_flops'] / 1e12:.2f} TFLOP); ours {positions} positions ({flops / 1e12:.3f} TFLOP): "
            f"{work[count]['peer_flops'] / flops:.1f}x less"
        )

    peer_labels = list(ADE20K_CLASSES[: args.peer_names])

    def peer(subset: list[str]) -> tuple[float, torch.Tensor]:
        def encode(batch: list[str]) -> torch.Tensor:
            return backbone.clip.encode_text(backbone.tokenize(batch, warn=False).to(device), normalize=True)

        start = time.perf_counter()
        with torch.inference_mode():
            embeddings = ensemble_text_embeddings(encode, subset, templates, batch_size=PEER_BATCH)
        return time.perf_counter() - start, embeddings

    half = max(1, args.peer_names // 2)
    first_seconds, first = peer(peer_labels[:half])
    results = {}
    with tempfile.TemporaryDirectory(prefix="pacl-text-bench-") as folder:
        for count in counts:
            cache = Path(folder) / str(count)
            cache.mkdir()
            results[count] = run_child(args, f"cold:{cache}:{count}:{','.join(dtypes)}")
            for dtype in dtypes:
                stored = load_file(cache / f"embeddings-{count}-{dtype}.safetensors")
                results[count][dtype]["embeddings"] = stored["embeddings"]
        results["warm"] = run_child(args, f"warm:{Path(folder) / str(counts[-1])}:{counts[-1]}:fp32")
    second_seconds, second = peer(peer_labels[half:]) if args.peer_names > half else (0.0, first[:0])
    peer_embeddings = torch.cat([first, second])  # [peer names, E]
    per_prompt = (first_seconds + second_seconds) / (args.peer_names * len(templates))

    rows = []
    for count in counts:
        numbers = work[count]
        peer_seconds = per_prompt * numbers["prompts"]
        compared = min(count, args.peer_names)
        row = functools.partial(make_row, count, peer_seconds, ceilings)

        def cosine(embeddings: torch.Tensor, compared: int = compared) -> float:
            return F.cosine_similarity(embeddings[:compared], peer_embeddings[:compared], dim=-1).min().item()

        scaled = "" if count == args.peer_names else f"timed on {args.peer_names} names, scaled"
        rows.append(row("peer: open_clip fp32, 77 tokens", peer_seconds, numbers["peer_flops"], "fp32", 1.0, scaled))
        result = results[count]
        for number, dtype in enumerate(dtypes):
            assert result[dtype]["encoded"] == numbers["prompts"], result
            parts = result[dtype]["parts"]
            other = result[dtype]["seconds"] - sum(parts.values())
            note = (
                f"tokenize {parts['tokenize']:.2f} s, tower {parts['encode']:.2f} s, "
                f"cache {parts['cache_write']:.2f} s, other {other:.2f} s"
            )
            cos = cosine(result[dtype]["embeddings"])
            path = f"cold: new process, {dtype} text" if number == 0 else f"cold: same process, {dtype} text"
            rows.append(row(path, result[dtype]["seconds"], numbers["flops"], dtype, cos, note))
            if number == 0:
                path = f"cold again: same process, {dtype} text"
                rows.append(row(path, result["again_seconds"], numbers["flops"], dtype, cos, "first-call costs gone"))
        assert result["warm_encoded"] == 0, "a warm run missed the cache"
        rows.append(row("warm: fresh TextEmbedder", result["warm_seconds"], 0.0, "fp32", None, "same process"))
        if count == counts[-1]:
            warm = results["warm"]
            assert warm["warm_encoded"] == 0, "a warm run missed the cache"
            note = f"+ {warm['key_seconds']:.2f} s hashing random weights, + {warm['model_seconds']:.1f} s model"
            rows.append(row("warm: new process", warm["warm_seconds"], 0.0, "fp32", None, note))

    summary = {
        "machine": machine,
        "date": time.strftime("%Y-%m-%d"),
        "command": "python -m benchmarks.text " + " ".join(argv if argv is not None else sys.argv[1:]),
        "arch": args.arch,
        "templates": len(templates),
        "peer_names_timed": args.peer_names,
        "matmul_flops_per_s": ceilings,
        "work": {str(count): numbers for count, numbers in work.items()},
        "rows": rows,
    }
    print()
    print("| names | path | time (s) | vs peer | GFLOP/s | of matmul | min cos to peer | note |")
    print("|---:|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        gflops = f"{r['gflops_per_s']:.0f}" if r["gflops_per_s"] else "-"
        fraction = f"{r['fraction_of_matmul']:.0%}" if r["fraction_of_matmul"] else "-"
        cos = f"{r['min_cosine_to_peer']:.6f}" if r["min_cosine_to_peer"] is not None else "-"
        print(
            f"| {r['names']} | {r['path']} | {r['seconds']:.2f} | {r['speedup_vs_peer']:.1f}x | {gflops} | {fraction} "
            f"| {cos} | {r['note']} |"
        )
    write_results(args.json, summary)
    return summary


if __name__ == "__main__":
    main()
