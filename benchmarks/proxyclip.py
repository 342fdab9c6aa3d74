"""ProxyCLIP's speed on this machine: the engine against the authors' computation, and its cost over NACLIP's.

    python -m benchmarks.proxyclip                      # 336 px, ViT-B/16 + DINO ViT-B/8 (random init), batch 4
    python -m benchmarks.proxyclip --batch 8 --repeats 3
    python -m benchmarks.proxyclip --clip <config.json> --vfm-depth 2 --size 64   # a smoke run (tests)

Every row segments the same 336 x 336 crops (one ProxyCLIP window at the presets' size) into 21 classes, on the
same random weights (random weights cost what trained ones do), in one run:

* ``authors fp32 b1``: the authors' computation written out below from their code, one crop at a time, float32
  eager (their GPU code runs fp16; this CPU's fp16 is emulated, so float32 is the authors' computation's fastest
  honest form here): DINO's hub ViT (``facebookresearch/dino`` ``vision_transformer.py`` l. 80-113, 174-233: the
  softmax attention written out, ``get_intermediate_layers``), ``proxyclip_segmentor.py`` l. 113-186 (the crop
  re-normalised for the VFM, the cosines, bilinear upsampling to the crop), open_clip's blocks ``0..L-2`` and
  ProxyCLIP's ``custom_attn`` (``open_clip/transformer.py`` l. 503-587: the affinity mask repeated per head,
  ``bmm``), then ``postprocess_result``'s softmax and argmax (l. 267-280).
* ``engine``: ``Segmenter.predict_torch`` through the eager torch encoder (the VFM and CLIP batched, the
  affinities once per image for all heads, the fused head: labels and winner scores without a
  ``[B, C, H, W]`` tensor), fp32 and bf16 (``dtype="auto"`` on a CPU with AMX or AVX512-BF16), batch 1 and
  ``--batch``.
* ``naclip``: the engine's NACLIP on the same CLIP, same crops, for ProxyCLIP's cost over it.

Work is counted first (``torch.utils.flop_counter`` on one crop, the CPU attention kernel counted as its CUDA
twins are) and set against the matmul ceiling in the same precision, a 2048^3 matmul timed in the same interleaved
rounds as the paths (best of each: the machine is shared); the bf16 batch is timed part by part (VFM, CLIP
values, affinities + attention, head). The synthetic world cannot show ProxyCLIP's benefit: no VFM is trained
there (and no pretrained VFM can be downloaded here), so this measures speed only.
"""

from __future__ import annotations

import os

# Idle OpenMP threads must not spin while other work waits for the cores (see benchmarks/throughput.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from open_clip.constants import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402

from benchmarks.common import machine_line, matmul_size, write_results  # noqa: E402
from pacl_fast.backbone import RandomWeightsWarning, load_clip  # noqa: E402
from pacl_fast.methods import TrainingFreeCLIP  # noqa: E402
from pacl_fast.proxyclip import ProxyCLIP, proxy_attention  # noqa: E402
from pacl_fast.segmenter import Segmenter  # noqa: E402
from pacl_fast.vfm import SPECS, VisionFoundationModel, load_vfm  # noqa: E402

SEED = 0
CLASSES = 21  # VOC21's
LOGIT_SCALE = 40.0  # ProxyCLIP's


# --- the authors' computation, batch 1, written out from their code -------------------------------------


def dino_features(vit: torch.nn.Module, pixels: torch.Tensor, patch: int) -> torch.Tensor:
    """DINO's hub ViT on ImageNet-normalised ``[1, 3, H, W]``: ``get_intermediate_layers(x)[0]`` (l. 196-233), the
    attention as ``Attention.forward`` computes it (l. 80-92), blocks as ``Block.forward`` (l. 107-113)."""
    _, _, height, width = pixels.shape
    x = vit.patch_embed.proj(pixels).flatten(2).transpose(1, 2)  # PatchEmbed: conv, flatten, transpose
    x = torch.cat((vit.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    pos = vit.pos_embed  # interpolate_pos_encoding (l. 174-194)
    n = pos.shape[1] - 1
    if x.shape[1] - 1 != n or height != width:
        side = math.sqrt(n)
        w0, h0 = height // patch + 0.1, width // patch + 0.1
        patch_pos = pos[:, 1:].reshape(1, int(side), int(side), -1).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos, scale_factor=(w0 / side, h0 / side), mode="bicubic")
        pos = torch.cat((pos[:, :1], patch_pos.permute(0, 2, 3, 1).reshape(1, -1, pos.shape[-1])), dim=1)
    x = x + pos
    for block in vit.blocks:
        attn = block.attn
        y = block.norm1(x)
        batch, tokens, channels = y.shape
        heads = attn.num_heads
        qkv = attn.qkv(y).reshape(batch, tokens, 3, heads, channels // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        weights = ((q @ k.transpose(-2, -1)) * (channels // heads) ** -0.5).softmax(dim=-1)
        x = x + attn.proj((weights @ v).transpose(1, 2).reshape(batch, tokens, channels))
        x = x + block.mlp(block.norm2(x))
    return vit.norm(x)


def authors_segment(model: ProxyCLIP, img: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    """One CLIP-normalised crop ``[1, 3, H, W]`` -> labels ``[1, H, W]`` as ProxyCLIP's code computes them."""
    backbone, vit = model.backbone, model.vfm.vit
    patch, clip_patch = model.vfm.patch_size, backbone.patch_size
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in backbone.mean_std)
    # proxyclip_segmentor.py l. 111-116: token sizes, norm(unnorm(img)) per image
    clip_token_size = img.shape[-2] // clip_patch, img.shape[-1] // clip_patch
    imgs_norm = torch.stack([(i * std + mean - torch.tensor(IMAGENET_MEAN).view(3, 1, 1))
                             / torch.tensor(IMAGENET_STD).view(3, 1, 1) for i in img])  # fmt: skip
    feat = dino_features(vit, imgs_norm, patch)  # l. 132
    nb_im = feat.shape[0]
    rows = cols = imgs_norm[0].shape[-2] // patch  # l. 149 (I, J both from the height)
    ex_feats = feat[:, 1:, :].reshape(nb_im, rows, cols, -1).permute(0, 3, 1, 2)  # l. 154
    # open_clip/transformer.py l. 503-538
    visual = backbone.visual
    x = visual.conv1(img).flatten(2).permute(0, 2, 1)
    x = torch.cat([visual.class_embedding.view(1, 1, -1).expand(x.shape[0], 1, -1), x], dim=1)
    pos = visual.positional_embedding  # interpolate_pos_encoding (l. 513-516, 540-558): only for another count
    if x.shape[1] != pos.shape[0]:
        side = math.sqrt(pos.shape[0] - 1)
        w0, h0 = img.shape[-2] // clip_patch + 0.1, img.shape[-1] // clip_patch + 0.1
        patch_pos = pos[1:].reshape(1, int(side), int(side), -1).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos, scale_factor=(w0 / side, h0 / side), mode="bicubic")
        pos = torch.cat((pos[:1], patch_pos.permute(0, 2, 3, 1).reshape(-1, pos.shape[-1])), dim=0)
    x = x + pos.to(x.dtype)
    x = visual.ln_pre(x)
    for block in backbone.blocks[:-1]:  # this open_clip's blocks are batch first: the same sums as LND
        x = block(x)
    block = backbone.blocks[-1]
    x = custom_attn(block.attn, block.ln_1(x).permute(1, 0, 2), ex_feats, model.beta, model.gamma, clip_token_size)
    x = visual.ln_post(x.permute(1, 0, 2)) @ visual.proj  # [1, I*J, E]
    # proxyclip_segmentor.py l. 177-182: unit features, cosines, bilinear to the crop
    x = x / x.norm(dim=-1, keepdim=True)
    logits = (x @ texts.T).permute(0, 2, 1).reshape(-1, texts.shape[0], rows, cols)
    logits = F.interpolate(logits, size=img.shape[-2:], mode="bilinear")
    return (logits[0] * LOGIT_SCALE).softmax(0).argmax(0, keepdim=True)  # postprocess_result l. 270-280


def custom_attn(attn_layer, x, ex_feats, beta, gamma, token_size):  # noqa: ANN001, ANN201 - the authors' signature
    """``open_clip/transformer.py`` l. 560-587, line for line (``x``: ``ln_1`` of the tokens, ``[L, N, D]``)."""
    num_heads = attn_layer.num_heads
    _, bsz, embed_dim = x.size()
    head_dim = embed_dim // num_heads
    q, k, v = F.linear(x, attn_layer.in_proj_weight, attn_layer.in_proj_bias).chunk(3, dim=-1)
    v = v.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
    _, _, height, width = ex_feats.shape
    q_k = F.normalize(ex_feats.flatten(2, 3), dim=1)
    similarity = torch.einsum("b c m, b c n -> b m n", q_k, q_k)
    similarity = (similarity - torch.mean(similarity) * beta) * gamma
    similarity[similarity < 0.0] = float("-inf")
    mask = similarity.to(q.dtype).unsqueeze(1).repeat(1, num_heads, 1, 1)
    mask = mask.reshape(bsz * num_heads, mask.shape[2], mask.shape[3])
    attn_weights = F.softmax(mask, dim=-1)
    v = v[:, 1:, :].reshape(bsz * num_heads, token_size[0], token_size[1], head_dim).permute(0, 3, 1, 2)
    v = F.interpolate(v, size=(height, width), mode="bilinear", align_corners=False)
    v = v.permute(0, 2, 3, 1).reshape(bsz * num_heads, height * width, head_dim)
    attn_output = torch.bmm(attn_weights, v)
    attn_output = attn_output.transpose(0, 1).contiguous().view(-1, bsz, embed_dim)
    return attn_layer.out_proj(attn_output)


# --- work ---------------------------------------------------------------------------------------------------


def count_flops(fn) -> int:  # noqa: ANN001
    """FLOPs of ``fn()`` (matmuls, convolutions, attention). torch's counter knows neither the CPU attention kernel
    (counted here as its CUDA twins are) nor ``nn.MultiheadAttention``'s inference fast path, one fused op for
    the in-projection, attention and out-projection of every open_clip block (counted here as those three)."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_attention(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:  # noqa: ANN001
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    def fused_attention(query_shape, key_shape, value_shape, embed_dim, *args, out_shape=None, **kwargs) -> int:  # noqa: ANN001
        batch, queries, _ = query_shape  # [B, Nq, D] -> q, k, v projections, two attention matmuls, out projection
        keys = key_shape[1]
        projections = 2 * batch * embed_dim * embed_dim * (queries + 2 * keys + queries)
        return projections + 4 * batch * queries * keys * embed_dim

    mapping = {
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention,
        torch.ops.aten._native_multi_head_attention: fused_attention,
    }
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return counter.get_total_flops()


def work(model: ProxyCLIP, naclip: TrainingFreeCLIP, pixels: torch.Tensor) -> dict[str, int]:
    """FLOPs of one crop through each part of ProxyCLIP, and through NACLIP."""
    grid = (pixels.shape[-2] // model.grid_patch, pixels.shape[-1] // model.grid_patch)
    features = model.vfm(model.vfm_pixels(pixels)).flatten(1, 2)
    parts = {
        "vfm": count_flops(lambda: model.vfm(model.vfm_pixels(pixels))),
        "clip_values": count_flops(lambda: model.clip_values(pixels, grid)),
        "affinities": count_flops(lambda: proxy_attention(features.float(), model.beta, model.gamma)),
        "total": count_flops(lambda: model.encode_image(pixels)),
        "naclip": count_flops(lambda: naclip.encode_image(pixels)),
    }
    parts["attention_and_projection"] = parts["total"] - parts["vfm"] - parts["clip_values"] - parts["affinities"]
    return parts


# --- timing -------------------------------------------------------------------------------------------------


def best_seconds(calls: dict[str, object], repeats: int) -> dict[str, float]:
    """Best seconds of each ``calls[name]()`` over ``repeats`` rounds, after one warm-up call each. The rounds
    interleave the calls (one of each per round): on a shared machine, load that comes and goes then weighs on
    every path alike, and the best of several rounds is the one least disturbed."""
    best = {}
    with torch.inference_mode():
        for fn in calls.values():
            fn()
        for _ in range(repeats):
            for name, fn in calls.items():
                start = time.perf_counter()
                fn()
                best[name] = min(best.get(name, math.inf), time.perf_counter() - start)
    return best


def fresh_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` that a Segmenter may cast in place; the tokenizer, a read-only vocabulary of ~50k
    Python strings that takes most of a deep copy's time, is shared."""
    tokenizer = model.backbone.tokenizer
    return copy.deepcopy(model, {id(tokenizer): tokenizer})


def engine(model: torch.nn.Module, dtype: torch.dtype, batch: int) -> Segmenter:
    return Segmenter(fresh_copy(model), encoder="torch", dtype=dtype, batch_size=batch, text_cache=False)


def build_models(args: argparse.Namespace) -> tuple[ProxyCLIP, TrainingFreeCLIP]:
    torch.manual_seed(SEED)
    clip = json.loads(Path(args.clip).read_text()) if args.clip.endswith(".json") else args.clip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        backbone = load_clip(clip, None, device="cpu")
        if args.vfm_depth:  # smoke runs: the first blocks only, built so (a whole random ViT-B takes seconds to fill)
            import timm

            vit = timm.create_model(SPECS[args.vfm].timm_name, pretrained=False, num_classes=0,
                                    dynamic_img_size=True, depth=args.vfm_depth)  # fmt: skip
            vfm = VisionFoundationModel(args.vfm, vit, f"{args.vfm}@random")
        else:
            vfm = load_vfm(args.vfm, None)
    return ProxyCLIP(backbone, vfm).eval(), TrainingFreeCLIP(backbone, "naclip").eval()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.proxyclip", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clip", default="ViT-B-16-quickgelu", help="open_clip model or config .json (random init)")
    parser.add_argument("--vfm", default="dino_vitb8", help="dino_vitb8 (default) or dinov2_vitb14_reg (random init)")
    parser.add_argument("--vfm-depth", type=int, default=None, help=argparse.SUPPRESS)  # smoke runs only
    parser.add_argument("--size", type=int, default=336, help="crop side in pixels (default 336, the presets')")
    parser.add_argument("--batch", type=int, default=4, help="the engine's batch (default 4)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after one warm-up, best kept (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/proxyclip_cpu.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    machine = machine_line(device)
    load = os.getloadavg()
    print(f"machine: {machine}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    model, naclip = build_models(args)
    size, batch = args.size, args.batch
    if size % model.pixel_multiple:
        parser.error(f"--size must be a multiple of {model.pixel_multiple}")
    grid = size // model.grid_patch
    generator = torch.Generator().manual_seed(SEED)
    pixels = torch.randn(batch, 3, size, size, generator=generator)  # CLIP-normalised crops
    texts = F.normalize(torch.randn(CLASSES, model.backbone.embed_dim, generator=generator), dim=-1)
    # The matmul ceiling is timed in the same interleaved rounds as the paths (best_seconds), so that it meets
    # the same load: a ceiling measured once, alone, on a shared machine can fall below what the paths reach.
    side = matmul_size(device)
    operands = {name: (torch.randn(side, side).to(dtype), torch.randn(side, side).to(dtype))
                for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}  # fmt: skip
    ceiling_calls = {f"matmul {name}": (lambda a=a, b=b: torch.mm(a, b)) for name, (a, b) in operands.items()}
    flops = work(model, naclip, pixels[:1])
    print(
        f"config: {args.clip} + {model.vfm.identity} (random init), {size} x {size} crops ({grid} x {grid} VFM "
        f"tokens), {CLASSES} classes, engine batch {batch}, best of {args.repeats} interleaved rounds"
    )
    print("work per crop: " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP" for k, v in flops.items()))

    # Every path, built first, then timed in interleaved rounds (best_seconds).
    authors_model = fresh_copy(model).float()
    segmenters = {
        f"{method} {name}": engine(source, dtype, batch)
        for method, source in (("engine", model), ("naclip", naclip))
        for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"))
    }

    def predict(segmenter: Segmenter, images: int):  # noqa: ANN202
        return lambda: segmenter.predict_torch(pixels[:images], texts, (size, size), with_scores=False)

    paths = {"authors fp32 b1": (lambda: authors_segment(authors_model, pixels[:1], texts), 1, "total", "fp32")}
    for name in ("fp32", "bf16"):
        for images in (1, batch):
            paths[f"engine {name} b{images}"] = (predict(segmenters[f"engine {name}"], images), images, "total", name)
    for name in ("fp32", "bf16"):
        paths[f"naclip {name} b{batch}"] = (predict(segmenters[f"naclip {name}"], batch), batch, "naclip", name)
    seconds = best_seconds({**ceiling_calls, **{name: path[0] for name, path in paths.items()}}, args.repeats)
    ceilings = {name: 2 * side**3 / seconds[f"matmul {name}"] for name in operands}
    print(f"matmul ceiling (best of the rounds): {ceilings['fp32'] / 1e9:.0f} GFLOP/s fp32, "
          f"{ceilings['bf16'] / 1e9:.0f} bf16")  # fmt: skip
    rows = []
    for name, (_, images, work_key, dtype) in paths.items():
        rate = images / seconds[name]
        achieved = flops[work_key] * rate
        rows.append({
            "path": name, "images_per_call": images, "seconds_per_call": seconds[name], "images_per_s": rate,
            "gflops_per_s": achieved / 1e9, "fraction_of_matmul": achieved / ceilings[dtype],
        })  # fmt: skip
        print(f"  {name:<22} {rate:7.3f} images/s  {achieved / 1e9:7.1f} GFLOP/s  "
              f"{achieved / ceilings[dtype]:6.1%} of the {dtype} matmul")  # fmt: skip
    agreement = {}
    with torch.inference_mode():
        authors_labels = torch.cat([authors_segment(authors_model, pixels[i : i + 1], texts) for i in range(batch)])
        for name in ("fp32", "bf16"):
            labels, _ = segmenters[f"engine {name}"].predict_torch(pixels, texts, (size, size), with_scores=False)
            agreement[name] = float((labels.long() == authors_labels.long()).float().mean())
    breakdown = parts_of(segmenters["engine bf16"], pixels, texts, args.repeats)

    rate = {r["path"]: r["images_per_s"] for r in rows}
    summary = {
        "engine_bf16_batched_vs_authors_fp32_b1": rate[f"engine bf16 b{batch}"] / rate["authors fp32 b1"],
        "engine_fp32_b1_vs_authors_fp32_b1": rate["engine fp32 b1"] / rate["authors fp32 b1"],
        "proxyclip_cost_over_naclip_bf16": rate[f"naclip bf16 b{batch}"] / rate[f"engine bf16 b{batch}"],
        "proxyclip_cost_over_naclip_fp32": rate[f"naclip fp32 b{batch}"] / rate[f"engine fp32 b{batch}"],
        "flops_proxyclip_over_naclip": flops["total"] / flops["naclip"],
        "labels_agreeing_with_authors": agreement,
    }
    print(f"engine bf16 b{batch} / authors fp32 b1: {summary['engine_bf16_batched_vs_authors_fp32_b1']:.2f}x "
          f"images/s (fp32 b1 alone: {summary['engine_fp32_b1_vs_authors_fp32_b1']:.2f}x)")  # fmt: skip
    print(f"ProxyCLIP costs {summary['proxyclip_cost_over_naclip_bf16']:.2f}x NACLIP's time in bf16 "
          f"({summary['proxyclip_cost_over_naclip_fp32']:.2f}x fp32; {summary['flops_proxyclip_over_naclip']:.2f}x "
          f"its FLOPs)")  # fmt: skip
    print(f"labels equal to the authors' computation: fp32 {agreement['fp32']:.2%}, bf16 {agreement['bf16']:.2%}")
    print(f"engine bf16 b{batch} by part: " + ", ".join(f"{k} {v:.0%}" for k, v in breakdown.items()))
    load_after = os.getloadavg()
    payload = {
        "machine": machine,
        "load_average_before": load,
        "load_average_after": load_after,
        "config": {"clip": args.clip, "vfm": model.vfm.identity, "size": size, "vfm_grid": grid, "classes": CLASSES,
                   "batch": batch, "repeats": args.repeats},  # fmt: skip
        "matmul_ceiling_flops": ceilings,
        "flops_per_crop": flops,
        "rows": rows,
        "summary": summary,
        "engine_bf16_time_by_part": breakdown,
        "note": "random init: speed only. The synthetic world cannot show ProxyCLIP's benefit (no VFM is trained "
        "there, none can be downloaded here).",
    }
    write_results(args.json, payload)
    return payload


def parts_of(segmenter: Segmenter, pixels: torch.Tensor, texts: torch.Tensor, repeats: int) -> dict[str, float]:
    """Shares of the engine's batch time: the VFM, CLIP's values, the affinities and attention with the
    projection, the head (similarity, upsampling, argmax), each timed alone on the encoder's own model
    (interleaved rounds, best of each)."""
    model = segmenter.encoder.model
    x = pixels.to(segmenter.dtype)
    size = tuple(pixels.shape[-2:])
    with torch.inference_mode():
        features = model.vfm(model.vfm_pixels(x))
        grid = tuple(features.shape[1:3])
        values = model.clip_values(x, grid)
        patches = segmenter.encoder.encode_image(x)

    def attend() -> torch.Tensor:
        attention = proxy_attention(features.flatten(1, 2).float(), model.beta, model.gamma)
        attended = model.out_proj(attention.to(values.dtype) @ values)
        visual = model.backbone.visual
        return F.normalize(visual.ln_post(attended) @ visual.proj, dim=-1)

    times = best_seconds(
        {
            "vfm": lambda: model.vfm(model.vfm_pixels(x)),
            "clip_values": lambda: model.clip_values(x, grid),
            "affinities_attention_projection": attend,
            "head": lambda: segmenter.segment_patches(patches, texts, size, with_scores=False),
        },
        repeats,
    )
    total = sum(times.values())
    return {name: seconds / total for name, seconds in times.items()}


if __name__ == "__main__":
    main()
