"""`python -m benchmarks.proxyclip` runs end to end on a tiny CLIP and a one-block VFM, and its plain
implementation of the authors' computation gives the engine's labels (not a timing test)."""

import json

from test_proxyclip_runtime import TINY16

from benchmarks.proxyclip import main


def test_proxyclip_benchmark_tiny(tmp_path, capsys):
    config = tmp_path / "clip.json"
    config.write_text(json.dumps(TINY16))
    out = tmp_path / "result.json"
    argv = ["--clip", str(config), "--vfm-depth", "1", "--size", "64", "--batch", "2", "--repeats", "1"]
    payload = main([*argv, "--json", str(out)])
    printed = capsys.readouterr().out
    assert printed.startswith("machine: CPU ") and "engine bf16 b2 / authors fp32 b1" in printed
    assert json.loads(out.read_text()) == json.loads(json.dumps(payload))
    rows = {row["path"]: row for row in payload["rows"]}
    expected = {"authors fp32 b1", "engine fp32 b1", "engine fp32 b2", "engine bf16 b1", "engine bf16 b2"}
    assert expected | {"naclip fp32 b2", "naclip bf16 b2"} == set(rows)
    assert all(row["images_per_s"] > 0 and row["fraction_of_matmul"] > 0 for row in rows.values())
    flops = payload["flops_per_crop"]
    assert flops["total"] > flops["vfm"] > 0 and flops["affinities"] > 0 and flops["naclip"] > 0
    # The authors' computation, written out in the benchmark, and the engine agree: fp32 label for label.
    assert payload["summary"]["labels_agreeing_with_authors"]["fp32"] >= 0.999
    assert payload["summary"]["labels_agreeing_with_authors"]["bf16"] >= 0.9
    assert abs(sum(payload["engine_bf16_time_by_part"].values()) - 1) < 1e-9


def test_flops_count_open_clip_blocks_whole():
    """An open_clip block under ``no_grad`` runs ``nn.MultiheadAttention``'s fused fast path, which torch's counter
    does not know: the benchmark counts its projections and attention, so a block is counted whole."""
    import warnings

    import torch

    from benchmarks.proxyclip import count_flops
    from pacl_fast.backbone import RandomWeightsWarning, load_clip

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        backbone = load_clip(TINY16, None, device="cpu").eval()
    block, width, tokens = backbone.blocks[0], TINY16["vision_cfg"]["width"], 17
    x = torch.randn(3, tokens, width)
    # q, k, v and out projections 8 D^2 N, MLP (ratio 4) 16 D^2 N, attention scores and mix 4 N^2 D; per image
    expected = 3 * (2 * 12 * width**2 * tokens + 4 * tokens**2 * width)
    assert count_flops(lambda: block(x)) == expected
