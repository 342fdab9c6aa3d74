"""`python -m benchmarks.throughput` runs end to end on a tiny model and reports what it promises.

Not a timing test: it checks the benchmark's plumbing (rows, ratios, FLOPs, JSON), not speed.
"""

import json

import pytest

from benchmarks.throughput import main, parse_backends, parse_head


def test_throughput_benchmark_tiny(tmp_path, capsys):
    out = tmp_path / "result.json"
    argv = ["--model", "tiny", "--image-size", "64", "--batch", "1,3", "--classes", "5", "--output-size", "40x24"]
    argv += ["--backends", "torch:fp32,torch:bf16,tensorrt:fp16", "--iters", "2", "--warmup", "0", "--device", "cpu"]
    assert main([*argv, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("CPU ") and "torch 2." in printed.splitlines()[0]
    assert "| batch | pipeline | images/s | vs naive |" in printed
    result = json.loads(out.read_text())
    assert result["encoder_flops_per_image"]["pacl"] > 1e7  # tiny ViT: ~22 MFLOP
    assert "tensorrt:fp16" in result["skipped"] or "tensorrt:fp16" in result["setup_s"]
    # The row a user gets with no speed options, named by what "auto" chose (issue 20), and the goals' verdicts.
    assert result["default_choice"].startswith("encoder=") and "(" in result["default_choice"]
    for batch in (1, 3):
        assert f"goal batch {batch}: default Segmenter(...) with scores >= 2x naive: " in printed
        assert f"goal batch {batch}: best labels-only row >= 4.5x naive: " in printed
    for batch_result in result["results"]:
        rows = {row["pipeline"]: row for row in batch_result["rows"]}
        assert rows["naive peer"]["speedup"] == pytest.approx(1.0)
        assert {"torch:fp32 + reference", "torch:bf16 + reference", "torch:bf16 + fast:labels"} <= set(rows)
        assert "torch:fp32 + fast:labels (scene-like logits)" in rows
        default = [name for name in rows if name.startswith("default Segmenter(...): ")]
        assert len(default) == 1 and default[0].endswith(" + fast"), default
        assert rows[default[0]]["head_ms_per_image"] > 0 and rows[default[0]]["setup_s"] > 0
        for row in rows.values():
            assert row["images_per_s"] > 0 and row["p95_ms"] >= row["p50_ms"] > 0
            assert row["encoder_pct_of_bf16_ceiling"] > 0
        assert len(batch_result["samples_s"]["naive/encoder"]) == len(batch_result["samples_s"]["naive/head"]) == 2
        assert set(batch_result["ceilings"]) == {"fp32", "bf16"}


def test_backend_specs_are_checked():
    assert parse_backends("torch:bf16:cl,onnxruntime:fp32") == [("torch", "bf16", True), ("onnxruntime", "fp32", False)]
    with pytest.raises(Exception, match="name:dtype"):
        parse_backends("torch:int8")


def test_head_specs_are_checked():
    head, with_scores = parse_head("fast:labels")
    assert head.backend == "fast" and not with_scores
    assert parse_head("reference")[1]
    with pytest.raises(ValueError, match="optionally with ':labels'"):
        parse_head("fast:scores")


def test_training_free_towers_are_timed_beside_pacl(tmp_path):
    out = tmp_path / "methods.json"
    argv = ["--model", "tiny", "--image-size", "64", "--batch", "2", "--methods", "pacl,naclip,sclip"]
    argv += ["--backends", "torch:fp32", "--heads", "none", "--iters", "2", "--warmup", "0", "--device", "cpu"]
    assert main([*argv, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {row["pipeline"]: row for row in result["results"][0]["rows"]}
    assert {"torch:fp32 (encoder only)", "naclip/torch:fp32 (encoder only)", "sclip/torch:fp32 (encoder only)"} <= set(
        rows
    )
    flops = result["encoder_flops_per_image"]
    assert flops["sclip"] > flops["naclip"] > 0  # SCLIP's last block keeps the FFN and runs two attention maps
    for row in rows.values():
        assert row["encoder_vs_clip_tower"] > 0
