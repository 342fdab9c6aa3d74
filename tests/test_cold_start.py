"""Cold and warm start (issue 20): what ``encoder="auto"`` may build for a short job, and the benchmark's plumbing."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from helpers import quiet_load_clip

from pacl_fast.model import PACL

HAS_OPENVINO = all(importlib.util.find_spec(name) is not None for name in ("openvino", "onnx", "onnxscript"))
CACHED = (48, 80)  # the size whose OpenVINO model is cached
OTHER = (64, 48)  # a size nothing is cached for


def cache_files(folder) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


@pytest.mark.skipif(not HAS_OPENVINO, reason="needs OpenVINO")
def test_auto_never_builds_a_size_the_announced_work_cannot_repay(tiny_config, tmp_path):
    """An OpenVINO model cached for one size made ``encoder="auto"`` take OpenVINO for every size, so one image
    of another size paid a build (10-20 s for ViT-B-16). Now the cached sizes run through OpenVINO and the others
    through eager torch, exactly as auto runs them with nothing cached; only work that pays builds builds."""
    from pacl_fast.build import encoder_for
    from pacl_fast.encoders import choose, make_encoder
    from pacl_fast.encoders.openvino_encoder import OpenVINOEncoder

    torch.manual_seed(0)
    model = PACL(quiet_load_clip(tiny_config)).eval()
    cache = tmp_path / "cache"
    OpenVINOEncoder(model, cache_dir=cache).model_path(CACHED)  # what an earlier run or an export left
    before = cache_files(cache)
    options = {"cache_dir": cache}
    plain = choose(model, expected_images=1, options={"cache_dir": tmp_path / "empty"})  # nothing cached
    assert plain.encoder == "torch"

    encoder, choice = encoder_for(model, expected_images=1, options=options)
    assert choice.encoder == "openvino" and choice.only_sizes == (CACHED,) and choice.eager_dtype == plain.dtype
    assert "cached model found (48x80): other sizes eager, 1 images do not pay a build" in str(choice)
    rng = torch.Generator().manual_seed(3)
    other = torch.randn(2, 3, *OTHER, generator=rng)
    got = encoder.encode_image(other)
    assert cache_files(cache) == before  # no build for the new size
    eager = make_encoder("torch", model, plain.dtype).encode_image(other).float()
    assert torch.equal(got, eager)  # what auto runs on that size with nothing cached
    cached = torch.randn(2, 3, *CACHED, generator=rng)
    openvino = OpenVINOEncoder(model, choice.precision, cache_dir=cache).encode_image(cached)
    assert torch.equal(encoder.encode_image(cached), openvino)  # the cached size still runs through OpenVINO
    assert cache_files(cache) == before
    # Work that pays a build for every size runs every size through OpenVINO (and builds what it meets).
    assert choose(model, expected_images=1e6, options=options).only_sizes is None


@pytest.mark.parametrize("naive", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_the_benchmark_runs_and_writes_its_table(naive, tmp_path, capsys):
    """``python -m benchmarks.cold_start --model tiny``: a cold and a warm ``pacl-fast segment`` (and with the slow
    mark, the naive script), each in a fresh process, the phases each one reports, the medians, ratios and JSON
    (so that it cannot rot). Without the naive script: two processes, not three (~2/3 of the time)."""
    from benchmarks import cold_start

    out = tmp_path / "result.json"
    argv = ["--model", "tiny", "--rounds", "1", "--work", str(tmp_path / "work"), "--json", str(out)]
    assert cold_start.main(argv + ([] if naive else ["--no-naive"])) == 0
    printed = capsys.readouterr().out
    kinds = ("naive", "cold", "warm") if naive else ("cold", "warm")
    assert all(f"| {kind} |" in printed for kind in kinds) and ("| naive |" in printed) == naive
    result = json.loads(out.read_text())
    assert result["config"]["model"] == "tiny" and result["warm_labels_equal_cold"] is True
    assert sorted(result["medians"]) == sorted(kinds)
    for kind in kinds:
        row = result["medians"][kind]
        phases = sum(row[name] for name in (*cold_start.PHASES, "exit") if name in row)
        assert row["wall_s"] > 0 and abs(phases - row["wall_s"]) < 0.05 * row["wall_s"] + 0.05, (kind, row)
    assert result["medians"]["cold"]["text"] > 0 and result["medians"]["warm"]["text"] < 0.05  # the text cache
    if naive:
        assert set(result["ratios"]) == {"cold", "warm"} and all(np.isfinite(list(result["ratios"].values())))
        assert "cold: " in printed and "faster than the naive script" in printed
    else:
        assert result["ratios"] == {}
