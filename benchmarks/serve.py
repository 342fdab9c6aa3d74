"""Load test of ``pacl-fast serve``: concurrent clients against real server processes on loopback.

    python -m benchmarks.serve                              # demo model and random-init ViT-B-16
    python -m benchmarks.serve --models demo --requests 300 --json serve.json
    python -m benchmarks.serve --quick                      # a smoke run: few requests, short caps
    python -m benchmarks.serve --device cuda                # servers and reference on the GPU

For each model, real server processes (``python -m pacl_fast.serve``) on 127.0.0.1, loaded by
``--clients`` concurrent asyncio clients (one ``httpx.AsyncClient``, raw image bodies with the options
in the query) sending ``--requests`` requests per server, bounded by ``--time-limit`` seconds of load
per server (what was sent when the time ran out still completes and counts; the table marks it):

* **batched** (``--max-batch``, default 16) and **max-batch 1** (the same server without batching),
  both up at once and loaded in ``--rounds`` alternating rounds, so that other work on a shared
  machine slows both alike; their throughput ratio is the speed-up of batching;
* **small queue**: batched, ``--max-queue`` ``--small-queue`` (default 8): the overflow must get 503
  with ``Retry-After`` and every accepted request must complete, correctly;
* **slow clients** (issue 23): a batched server with the default body bounds, ``--normal-clients``
  (default 8) clients alone for ``--slow-seconds``, then the same clients while ``--slow-clients``
  (default 64) sockets send their headers and then one body byte a second (reconnecting after each
  408): every normal answer must be 200 and equal to predict, and no slow one may be served.
  ``--slow-only`` runs this test alone.

Every 200 answer is checked against ``Segmenter.predict`` on the same image and labels in this
process (the label maps must be equal), so a lost or wrong answer fails the run. Latency is
client-side (send to last byte); throughput is answers 200 per second of load; the mean batch size
is the server's own (``/metrics``: images per model call, warm-up excluded); ``cpu ms`` is the server
process's CPU time (all threads, from /proc) per answer during the load: what batching saves, whatever
share of the cores the clients and other jobs take. The random-init ViT-B-16
is saved once to a safetensors file that both the server and the reference load (``--clip-weights``),
so both hold the same weights. Nothing leaves the machine: servers listen on 127.0.0.1 only.
"""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning (see benchmarks/throughput.py): the servers inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import asyncio  # noqa: E402
import base64  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections import Counter  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.common import machine_line, write_results  # noqa: E402
from pacl_fast.choices import ENCODERS  # noqa: E402
from pacl_fast.cli import HELP  # noqa: E402
from pacl_fast.serve.local import LocalServer  # noqa: E402
from pacl_fast.serve.render import label_map_from_png  # noqa: E402


@dataclass
class Model:
    """One model under load: how the server is started and how the reference is built."""

    name: str
    server_args: list[str]
    templates: str
    image_size: int  # scenes are rendered at the model's own size
    reference_args: dict = field(default_factory=dict)


@dataclass
class Run:
    model: str
    mode: str
    max_batch: int
    max_queue: int
    sent: int = 0
    ok: int = 0
    rejected: int = 0  # 503 queue full
    other: dict = field(default_factory=dict)  # any other status (or transport error) -> count
    wrong: int = 0
    retry_after_missing: int = 0
    seconds: float = 0.0
    capped_by_time: bool = False
    p50_ms: float = float("nan")
    p95_ms: float = float("nan")
    p99_ms: float = float("nan")
    throughput: float = 0.0
    mean_batch: float = float("nan")
    server_cpu_ms: float = float("nan")  # server process CPU time (all threads) per answer, during the load
    sent_rounds: int = 0
    rounds: list = field(default_factory=list)  # answers 200 per second in each round
    slow_clients: int = 0  # sockets dribbling their bodies during the load
    slow_answers: dict = field(default_factory=dict)  # what the slow sockets got: status (or error) -> count


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def batch_totals(base: str) -> tuple[float, float]:
    """(images, model calls) the server has run so far, from its Prometheus text."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{base}/metrics", timeout=30, trust_env=False).text
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in ("pacl_serve_batch_images_sum", "pacl_serve_batch_images_count"):
                values[sample.name] = sample.value
    return values.get("pacl_serve_batch_images_sum", 0.0), values.get("pacl_serve_batch_images_count", 0.0)


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far, from /proc (Linux); NaN elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(base: str, bodies: list[bytes], params: dict, requests: int, clients: int, time_limit: float) -> tuple:
    """``clients`` concurrent clients send ``requests`` in all (image ``i % len(bodies)``) until the time limit."""
    answers: list[tuple[int, int | str, float, bytes, str | None]] = []
    counter = itertools.count()
    start = time.perf_counter()
    stop_at = start + time_limit if time_limit > 0 else float("inf")
    capped = False
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(900), limits=limits, trust_env=False) as client:

        async def client_loop() -> None:
            nonlocal capped
            while True:
                index = next(counter)
                if index >= requests:
                    return
                if time.perf_counter() > stop_at:
                    capped = True
                    return
                image = index % len(bodies)
                sent = time.perf_counter()
                try:
                    response = await client.post(
                        "/v1/segment", content=bodies[image], params=params, headers={"Content-Type": "image/png"}
                    )
                    status, content, retry = response.status_code, response.content, response.headers.get("retry-after")
                except httpx.HTTPError as error:
                    status, content, retry = type(error).__name__, b"", None
                answers.append((image, status, time.perf_counter() - sent, content, retry))

        await asyncio.gather(*(client_loop() for _ in range(clients)))
    return answers, time.perf_counter() - start, capped


def label_map(body: bytes) -> np.ndarray:
    payload = json.loads(body)
    return label_map_from_png(base64.b64decode(payload["labels_png"]), len(payload["classes"]))


def server_args(model: Model, args: argparse.Namespace, max_batch: int, max_queue: int) -> list[str]:
    return [
        *model.server_args,
        "--device", args.device,
        "--dtype", args.dtype,
        "--encoder", args.encoder,
        "--max-batch", str(max_batch),
        "--max-wait-ms", str(args.max_wait_ms),
        "--max-queue", str(max_queue),
        "--timeout", "900",
        "--templates", model.templates,
        "--no-access-log",
    ]  # fmt: skip


def score(run: Run, answers: list, expected: list) -> None:
    """Fill ``run``'s counts and latency percentiles from the answers; label maps checked against ``expected``."""
    latencies = []
    other: Counter = Counter(run.other)
    for image, status, seconds, content, retry in answers:
        run.sent += 1
        if status == 200:
            run.ok += 1
            latencies.append(seconds * 1000)
            if not np.array_equal(label_map(content), expected[image]):
                run.wrong += 1
        elif status == 503 and b"queue_full" in content:
            run.rejected += 1
            run.retry_after_missing += retry is None
        else:
            other[str(status)] += 1
    run.other = dict(other)
    if latencies:
        p50, p95, p99 = np.percentile(latencies, [50, 95, 99])
        run.p50_ms, run.p95_ms, run.p99_ms = float(p50), float(p95), float(p99)
    run.throughput = run.ok / run.seconds if run.seconds else 0.0


def report(run: Run) -> None:
    print(
        f"  {run.model} {run.mode}: {run.ok} ok, {run.rejected} rejected, {sum(run.other.values())} other, "
        f"{run.wrong} wrong in {run.seconds:.1f} s{' (time cap)' if run.capped_by_time else ''}",
        flush=True,
    )


def run_pair(model: Model, args: argparse.Namespace, bodies: list[bytes], expected: list, log_dir: Path) -> list[Run]:
    """The batched and the ``--max-batch 1`` server, both up, loaded in alternating rounds (a noisy shared
    machine then slows both alike); each round sends its share of ``--requests`` within its share of the time cap."""
    params = {"labels": ",".join(args.labels)}
    queue = max(args.clients * 2, 64)
    modes = {"batched": args.max_batch, "max-batch 1": 1}
    runs = {mode: Run(model.name, mode, batch, queue) for mode, batch in modes.items()}
    answers: dict[str, list] = {mode: [] for mode in modes}
    per_round = -(-args.requests // args.rounds)
    print(f"  {model.name}: starting the batched and the --max-batch 1 servers ...", flush=True)
    with contextlib.ExitStack() as stack:
        servers = {
            mode: stack.enter_context(
                LocalServer(
                    server_args(model, args, batch, queue), log_dir / f"{model.name}-{mode.replace(' ', '-')}.log"
                )
            )
            for mode, batch in modes.items()
        }
        before, cpu = {}, dict.fromkeys(modes, 0.0)
        for mode, server in servers.items():  # warm-up: text embeddings and a few batches, untimed
            warm, _, _ = asyncio.run(load(server.base, bodies, params, min(len(bodies), 8), 8, 0))
            assert all(status == 200 for _, status, *_ in warm), [a[1:3] for a in warm]
            before[mode] = batch_totals(server.base)
        for round_index in range(args.rounds):
            order = list(modes) if round_index % 2 == 0 else list(reversed(modes))
            for mode in order:
                run = runs[mode]
                if run.sent_rounds >= args.rounds:
                    continue
                cpu_before = process_cpu_seconds(servers[mode].process.pid)
                got, seconds, capped = asyncio.run(
                    load(servers[mode].base, bodies, params, per_round, args.clients, args.time_limit / args.rounds)
                )
                cpu[mode] += process_cpu_seconds(servers[mode].process.pid) - cpu_before
                answers[mode].extend(got)
                run.seconds += seconds
                run.capped_by_time |= capped
                run.sent_rounds += 1
                run.rounds.append(round(sum(a[1] == 200 for a in got) / seconds, 3))
        for mode, server in servers.items():
            images, calls = batch_totals(server.base)
            if calls > before[mode][1]:
                runs[mode].mean_batch = (images - before[mode][0]) / (calls - before[mode][1])
    for mode, run in runs.items():
        run.server_cpu_ms = 1000 * cpu[mode] / max(1, len(answers[mode]))
        score(run, answers[mode], expected)
        report(run)
    return list(runs.values())


def run_small_queue(model: Model, args: argparse.Namespace, bodies: list[bytes], expected: list, log_dir: Path) -> Run:
    """A batched server with ``--max-queue`` ``--small-queue``: the overflow gets 503, the rest completes."""
    params = {"labels": ",".join(args.labels)}
    run = Run(model.name, "small queue", args.max_batch, args.small_queue)
    print(f"  {model.name}: starting the small-queue server ...", flush=True)
    args_list = server_args(model, args, args.max_batch, args.small_queue)
    with LocalServer(args_list, log_dir / f"{model.name}-small-queue.log") as server:
        warm, _, _ = asyncio.run(load(server.base, bodies, params, min(len(bodies), args.small_queue), 4, 0))
        assert all(status == 200 for _, status, *_ in warm), [a[1:3] for a in warm]
        images_before, calls_before = batch_totals(server.base)
        cpu_before = process_cpu_seconds(server.process.pid)
        got, run.seconds, run.capped_by_time = asyncio.run(
            load(server.base, bodies, params, args.requests, args.clients, args.time_limit)
        )
        run.server_cpu_ms = 1000 * (process_cpu_seconds(server.process.pid) - cpu_before) / max(1, len(got))
        images, calls = batch_totals(server.base)
    if calls > calls_before:
        run.mean_batch = (images - images_before) / (calls - calls_before)
    run.sent_rounds = 1
    score(run, got, expected)
    report(run)
    return run


async def dribble(port: int, stop: asyncio.Event, answers: Counter, length: int = 100_000) -> None:
    """One slow client: headers, then one body byte a second until answered; then again, until ``stop``."""
    head = (
        f"POST /v1/segment?labels=circle HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError as error:
            answers[type(error).__name__] += 1
            await asyncio.sleep(1)
            continue
        status = None
        try:
            writer.write(head)
            while not stop.is_set() and status is None:
                try:
                    line = await asyncio.wait_for(reader.readline(), 1.0)
                except asyncio.TimeoutError:
                    writer.write(b"\0")
                    await writer.drain()
                    continue
                status = line.split(b" ")[1].decode() if line.startswith(b"HTTP/") else "closed"
        except OSError as error:
            status = type(error).__name__
        finally:
            writer.close()
        if status is not None:
            answers[status] += 1


async def load_with_slow_clients(base: str, port: int, bodies: list[bytes], params: dict, args: argparse.Namespace
                                 ) -> tuple[tuple, Counter]:  # fmt: skip
    """``--normal-clients`` loading the server for ``--slow-seconds`` while ``--slow-clients`` sockets dribble."""
    stop, answers = asyncio.Event(), Counter()
    slow = [asyncio.create_task(dribble(port, stop, answers)) for _ in range(args.slow_clients)]
    await asyncio.sleep(2)  # every slow socket connected and dribbling before the normal clients start
    try:
        normal = await load(base, bodies, params, 10**9, args.normal_clients, args.slow_seconds)
    finally:
        stop.set()
        await asyncio.gather(*slow)
    return normal, answers


def run_slow_clients(model: Model, args: argparse.Namespace, bodies: list[bytes], expected: list, log_dir: Path
                     ) -> list[Run]:  # fmt: skip
    """The batched server with the default body bounds: normal clients alone, then beside slow clients."""
    params = {"labels": ",".join(args.labels)}
    runs = [Run(model.name, "normal alone", args.max_batch, 64), Run(model.name, "normal + slow", args.max_batch, 64)]
    runs[1].slow_clients = args.slow_clients
    print(f"  {model.name}: starting the slow-clients server ...", flush=True)
    with LocalServer(server_args(model, args, args.max_batch, 64), log_dir / f"{model.name}-slow.log") as server:
        warm, _, _ = asyncio.run(load(server.base, bodies, params, min(len(bodies), 8), 8, 0))
        assert all(status == 200 for _, status, *_ in warm), [a[1:3] for a in warm]
        got, runs[0].seconds, runs[0].capped_by_time = asyncio.run(
            load(server.base, bodies, params, 10**9, args.normal_clients, args.slow_seconds)
        )
        score(runs[0], got, expected)
        (got, runs[1].seconds, runs[1].capped_by_time), answers = asyncio.run(
            load_with_slow_clients(server.base, server.port, bodies, params, args)
        )
        runs[1].slow_answers = dict(answers)
        score(runs[1], got, expected)
    for run in runs:
        run.sent_rounds = 1
        report(run)
    print(f"  {model.name}: the slow sockets got {dict(answers)}", flush=True)
    return runs


def make_models(args: argparse.Namespace, work: Path) -> list[Model]:
    models = []
    for name in args.models:
        if name == "demo":
            models.append(Model("demo", ["--clip", "demo"], "synthetic", 64, {"clip": "demo"}))
        elif name == "vit-b-16":
            import open_clip
            from safetensors.torch import save_file

            weights = work / "vit_b_16_random.safetensors"
            torch.manual_seed(0)
            clip = open_clip.create_model("ViT-B-16", pretrained=None)
            save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(weights))
            del clip
            models.append(
                Model(
                    "vit-b-16",
                    ["--clip", "ViT-B-16", "--clip-weights", str(weights)],
                    "short",
                    224,
                    {"clip": "ViT-B-16", "clip_weights": str(weights)},
                )
            )
        else:
            raise SystemExit(f"--models: unknown model {name!r} (demo, vit-b-16)")
    return models


def table(runs: list[Run]) -> str:
    header = (
        f"{'model':<9} {'server':<13} {'batch':>5} {'queue':>5} {'sent':>5} {'ok':>5} {'503':>5} {'other':>5} "
        f"{'wrong':>5} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'req/s':>7} {'mean batch':>10} {'cpu ms':>7} "
        f"{'seconds':>8}"
    )
    lines = [header, "-" * len(header)]
    for r in runs:
        lines.append(
            f"{r.model:<9} {r.mode:<13} {r.max_batch:>5} {r.max_queue:>5} {r.sent:>5} {r.ok:>5} {r.rejected:>5} "
            f"{sum(r.other.values()):>5} {r.wrong:>5} {r.p50_ms:>8.1f} {r.p95_ms:>8.1f} {r.p99_ms:>8.1f} "
            f"{r.throughput:>7.2f} {r.mean_batch:>10.2f} {r.server_cpu_ms:>7.1f} "
            f"{r.seconds:>7.1f}{'*' if r.capped_by_time else ' '}"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.serve", description=__doc__.split("\n\n")[0], formatter_class=HELP
    )
    parser.add_argument("--models", type=lambda t: t.split(","), default=["demo", "vit-b-16"], help="demo,vit-b-16")
    parser.add_argument("--requests", type=int, default=1000, help="requests per server")
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients")
    parser.add_argument("--time-limit", type=float, default=240.0, help="seconds of load per server, at most (0: none)")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds of the batched and unbatched servers")
    parser.add_argument("--max-batch", type=int, default=16, help="the batched servers' --max-batch")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="the servers' --max-wait-ms")
    parser.add_argument("--small-queue", type=int, default=8, help="--max-queue of the small-queue server")
    parser.add_argument("--images", type=int, default=16, help="distinct synthetic scenes the clients cycle through")
    parser.add_argument("--device", default="cpu", help="the servers' and the reference's device (cpu, cuda)")
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
        help="the servers' and the reference's encoder precision",
    )  # fmt: skip
    parser.add_argument(
        "--encoder", default="torch", choices=ENCODERS,
        help="the servers' and the reference's encoder (named, not auto: a server would choose for an unending "
        "stream, the reference for a few images, and their answers must be compared)",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--slow-clients", type=int, default=64, help="slow-clients test: sockets dribbling bodies")
    parser.add_argument("--normal-clients", type=int, default=8, help="slow-clients test: normal clients")
    parser.add_argument("--slow-seconds", type=float, default=40.0,
                        help="slow-clients test: seconds of load, alone and beside the slow clients")  # fmt: skip
    parser.add_argument("--slow-only", action="store_true", help="run the slow-clients test only")
    parser.add_argument(
        "--batching-only", action="store_true", help="run the batched and --max-batch 1 servers only (the GPU check)"
    )
    parser.add_argument(
        "--min-speedup", type=float, default=None,
        help="fail unless the batched server's throughput is at least this times the --max-batch 1 server's",
    )  # fmt: skip
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 96 requests, 16 clients, 60 s caps, 20 s slow-clients phases"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.requests, args.clients, args.time_limit, args.rounds = 96, 16, 60.0, 2
        args.slow_seconds = min(args.slow_seconds, 20.0)  # still past the 15 s body deadline: 408s are seen
    from pacl_fast.backbone import RandomWeightsWarning
    from pacl_fast.data.synthetic import CLASS_NAMES, WorldConfig, render_scene
    from pacl_fast.segmenter import Segmenter

    args.labels = list(CLASS_NAMES)
    print(f"machine: {machine_line(torch.device(args.device))}")
    print(
        f"config: {args.clients} clients, {args.requests} requests per server, load capped at {args.time_limit:g} s; "
        f"{args.encoder} {args.dtype}; batched servers --max-batch {args.max_batch} --max-wait-ms "
        f"{args.max_wait_ms:g}, small queue "
        f"--max-queue {args.small_queue}; labels {','.join(args.labels)}; {args.images} distinct scenes"
    )
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="pacl-serve-bench-") as folder:
        work = Path(folder)
        for model in make_models(args, work):
            scenes = [
                render_scene(i, seed=7, config=WorldConfig(image_size=model.image_size)) for i in range(args.images)
            ]
            bodies = [png_bytes(scene.image) for scene in scenes]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RandomWeightsWarning)
                # The servers' dtype and encoder: their answers are held equal to this reference's.
                reference = Segmenter(
                    device=args.device, dtype=args.dtype, encoder=args.encoder, **model.reference_args
                )
            start = time.perf_counter()
            expected = [
                reference.predict(Image.open(io.BytesIO(body)), args.labels, templates=model.templates).labels
                for body in bodies
            ]
            print(f"{model.name}: {reference!r}; reference predictions in {time.perf_counter() - start:.1f} s")
            del reference
            if not args.slow_only:
                runs.extend(run_pair(model, args, bodies, expected, work))
            if not args.slow_only and not args.batching_only:
                runs.append(run_small_queue(model, args, bodies, expected, work))
            if not args.batching_only:
                runs.extend(run_slow_clients(model, args, bodies, expected, work))
    print()
    print(table(runs))
    print("(* load stopped by --time-limit: the requests sent by then completed and count;")
    print(" cpu ms: the server process's CPU time, all threads, per answer during the load)")
    speedups = {}
    for name in args.models:
        by_mode = {r.mode: r for r in runs if r.model == name}
        if "normal + slow" in by_mode:
            alone, beside = by_mode["normal alone"], by_mode["normal + slow"]
            print(
                f"{name}: {beside.slow_clients} slow clients: normal clients' p50 {beside.p50_ms:.1f} ms "
                f"(alone {alone.p50_ms:.1f}), {beside.throughput:.2f} req/s (alone {alone.throughput:.2f}); "
                f"the slow sockets got {beside.slow_answers}"
            )
        if "max-batch 1" in by_mode and by_mode["max-batch 1"].throughput:
            speedups[name] = by_mode["batched"].throughput / by_mode["max-batch 1"].throughput
            print(f"{name}: batched throughput {speedups[name]:.2f}x the --max-batch 1 server's")
    failures = []
    for r in runs:
        if r.wrong or r.other or (r.mode != "small queue" and r.rejected) or r.retry_after_missing:
            failures.append(f"{r.model}/{r.mode}: {r.wrong} wrong, other answers {r.other}, {r.rejected} rejected")
        if r.mode == "small queue" and not r.rejected:
            failures.append(f"{r.model}/{r.mode}: the small queue never overflowed")
        if not r.ok:
            failures.append(f"{r.model}/{r.mode}: no answer 200")
        if r.slow_clients and set(r.slow_answers) - {"408"}:
            failures.append(f"{r.model}/{r.mode}: a slow client got something other than 408: {r.slow_answers}")
    for name, speedup in speedups.items():
        if args.min_speedup is not None and speedup < args.min_speedup:
            failures.append(f"{name}: batched throughput {speedup:.2f}x the --max-batch 1 server's, "
                            f"under the goal {args.min_speedup:g}x")  # fmt: skip
    payload = {
        "machine": machine_line(torch.device(args.device)),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "runs": [asdict(r) for r in runs],
        "speedup_batched_over_max_batch_1": speedups,
        "failures": failures,
    }
    print(json.dumps(payload, indent=2))
    if args.json:
        write_results(args.json, payload)
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
