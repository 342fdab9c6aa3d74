"""pytest-benchmark micro-benchmarks (not part of the default test run, whose testpaths is tests/).

    python -m pytest benchmarks --benchmark-only --benchmark-json benchmarks/results/micro_cpu.json
    python -m pytest benchmarks --benchmark-only --benchmark-compare=benchmarks/results/micro_cpu.json \
        --benchmark-compare-fail=mean:25%        # fail on a 25% regression against the kept run

Each group has one baseline, the test marked ``baseline`` in its ``extra_info`` (the reference head,
open_clip's full text tower, the eager fp32 encoder); after the run every benchmark of the group
gets ``vs_baseline`` (its mean over the baseline's mean, < 1 is faster) in the JSON, and the
terminal summary prints those ratios per group.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/throughput.py: before torch starts OpenMP
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from pacl_fast.backbone import RandomWeightsWarning  # noqa: E402
from pacl_fast.build import build_model  # noqa: E402


@pytest.fixture(scope="module")
def model():  # noqa: ANN201 - a PaclModel
    """Random-init open_clip ViT-B-16 through PACL, fixed seed: what the encoder and text
    benchmarks time (an untrained model costs what a trained one does)."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        built, _ = build_model("ViT-B-16", method="pacl", device="cpu")
    return built.eval()


def _ratios(benchmarks: list[dict]) -> dict[str, dict[str, float]]:
    """group -> {name: mean / baseline mean}, from pytest-benchmark's JSON records."""
    groups: dict[str, list[dict]] = {}
    for record in benchmarks:
        groups.setdefault(record["group"] or "", []).append(record)
    ratios = {}
    for group, records in groups.items():
        baseline = next((r for r in records if r.get("extra_info", {}).get("baseline")), None)
        if baseline is None:
            continue
        ratios[group] = {r["name"]: r["stats"]["mean"] / baseline["stats"]["mean"] for r in records}
    return ratios


def pytest_benchmark_update_json(config, benchmarks, output_json) -> None:  # noqa: ANN001
    for group, ratios in _ratios(output_json["benchmarks"]).items():
        for record in output_json["benchmarks"]:
            if (record["group"] or "") == group:
                record["extra_info"]["vs_baseline"] = ratios[record["name"]]


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ANN001
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    records = [
        {"group": b.group, "name": b.name, "stats": {"mean": b.stats.mean}, "extra_info": b.extra_info}
        for b in session.benchmarks
        if b.stats is not None
    ]
    terminalreporter.write_sep("-", "mean time vs the group's baseline (< 1: faster)")
    for group, ratios in sorted(_ratios(records).items()):
        terminalreporter.write_line(group)
        for name, ratio in sorted(ratios.items(), key=lambda item: item[1], reverse=True):
            terminalreporter.write_line(f"    {ratio:7.3f}  {name}")
