"""The text tower exactly as open_clip computes it, at any length.

CLIP's text transformer is causal and pools at the end-of-text token, so the tokens after a prompt's
end change nothing it outputs: each prompt can run only up to its end (:func:`encode_text_eager`),
in passes by length, with the prefix every prompt shares run once. Which towers allow it is decided
from the model's own modules and config (:func:`truncation_problem`); the others keep the full length.
:class:`pacl_fast.backbone.ClipBackbone` is the interface; this module is its text-side machinery.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, TextTransformer
from torch import nn


class PromptTruncatedWarning(UserWarning):
    """A text is longer than the text tower's context: the tokenizer cut it, so texts that differ only
    after the cut embed identically."""


def describe_cut_texts(cut: list[str], total: int, context: int) -> str:
    """The warning for texts the tokenizer cut: how many, and the first few by name."""
    shown = ", ".join(repr(text) for text in cut[:5]) + (", ..." if len(cut) > 5 else "")
    return (
        f"{len(cut)} of {total} texts are longer than the text tower's {context}-token context and were cut "
        f"(texts that differ only after the cut embed identically): {shown}"
    )


@dataclass(frozen=True)
class TextParts:
    """open_clip's text tower, wherever the CLIP keeps it (a ``CLIP`` on itself, a ``CustomTextCLIP``
    in ``.text``). Read from the module each call: views of the CLIP replace some of these."""

    token_embedding: nn.Embedding
    positional_embedding: torch.Tensor  # [context, D]
    transformer: nn.Module  # open_clip Transformer, batch first
    attn_mask: torch.Tensor | None  # [context, context] additive causal mask, or None (bidirectional)
    ln_final: nn.Module
    text_projection: nn.Module | torch.Tensor | None
    pool_type: str
    eos_id: int | None


def text_parts(clip: nn.Module) -> TextParts | None:
    """The pieces of a CLIP's text tower, or None for towers this module does not run itself: Hugging
    Face towers, and open_clip towers that append a class token (CoCa) or mask padding."""
    text = getattr(clip, "text", None)
    if text is None:
        source, pool_type, eos_id = clip, getattr(clip, "text_pool_type", None), getattr(clip, "text_eos_id", None)
    elif isinstance(text, TextTransformer) and text.cls_emb is None and not text.use_pad_mask:
        source, pool_type, eos_id = text, text.pool_type, text.eos_id
    else:
        return None
    names = ("token_embedding", "positional_embedding", "transformer", "ln_final")
    if pool_type is None or any(getattr(source, name, None) is None for name in names):
        return None
    return TextParts(
        source.token_embedding,
        source.positional_embedding,
        source.transformer,
        getattr(source, "attn_mask", None),
        source.ln_final,
        getattr(source, "text_projection", None),
        pool_type,
        eos_id,
    )


def text_attributes(clip: nn.Module) -> tuple[str, ...]:
    """The attribute names of a CLIP that hold its text tower."""
    if getattr(clip, "text", None) is not None:
        return ("text",)
    return ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection", "attn_mask")


def truncation_problem(parts: TextParts | None) -> str | None:
    """Why a text tower must run at the full context length, or None when it may be truncated."""
    if parts is None:
        return "its text tower is not one open_clip TextTransformer that pools one token"
    if parts.attn_mask is None:
        return "its text attention is bidirectional (no causal mask)"
    if parts.pool_type not in ("argmax", "eos"):
        return f"it pools text at {parts.pool_type!r}, not at the end-of-text token"
    return None


def check_tokens(tokens: torch.Tensor, context: int) -> None:
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2:
        raise ValueError(f"tokens must be a [T, L] tensor of token ids, got {getattr(tokens, 'shape', type(tokens))}")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise TypeError(f"tokens must be integer token ids, got {tokens.dtype}")
    if not 1 <= tokens.shape[1] <= context:
        raise ValueError(f"tokens must have 1 to {context} (the context length) columns, got {tokens.shape[1]}")


def tracing() -> bool:
    """Under torch.compile / torch.export / TorchScript: no data-dependent Python, the plain graph."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting()


def pool_index(parts: TextParts, tokens: torch.Tensor) -> torch.Tensor:
    """The position each row is pooled at ``[T]``, as open_clip's ``text_global_pool`` finds it."""
    if parts.pool_type == "argmax":  # the end-of-text token has the highest id
        return tokens.argmax(dim=-1)
    return (tokens == parts.eos_id).int().argmax(dim=-1)  # the first end-of-sequence token


#: What one more pass through the text tower costs, in token positions: per-op overhead and reading
#: every weight once (CPU, ViT-B-16: ~40 tokens' work measured on 2 cores), kernel launches (CUDA).
PASS_OVERHEAD_TOKENS = {"cpu": 32, "cuda": 4096}


def _pass_overhead(device: torch.device) -> int:
    return PASS_OVERHEAD_TOKENS.get(device.type, PASS_OVERHEAD_TOKENS["cpu"])


def length_groups(lengths: torch.Tensor, offset: int = 0) -> list[tuple[int, torch.Tensor]]:
    """Rows in passes by length: ``[(length, row indices)]``, each pass run at the longest length in it.

    Rows of one length need no padding; merging lengths saves passes. The grouping minimises the
    positions run past ``offset`` (a shared prefix) plus :data:`PASS_OVERHEAD_TOKENS` per pass, by
    dynamic programming over the distinct lengths (at most the context length of them).
    """
    values, counts = lengths.unique(return_counts=True)
    values, counts = values.tolist(), counts.tolist()
    overhead = _pass_overhead(lengths.device)
    best, start = [0.0] * (len(values) + 1), [0] * (len(values) + 1)  # best[j]: the first j lengths
    for j in range(1, len(values) + 1):
        rows, best[j] = 0, float("inf")
        for i in range(j, 0, -1):  # the last pass holds lengths i..j
            rows += counts[i - 1]
            cost = best[i - 1] + overhead + rows * (values[j - 1] - offset)
            if cost < best[j]:
                best[j], start[j] = cost, i
    groups, j = [], len(values)
    while j > 0:
        i = start[j]
        rows = ((lengths >= values[i - 1]) & (lengths <= values[j - 1])).nonzero().flatten()
        groups.append((values[j - 1], rows))
        j = i - 1
    return groups[::-1]


def _text_embed(parts: TextParts, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Token + positional embeddings of tokens at positions ``start, start + 1, ...``: ``[n, l, D]``."""
    cast_dtype = parts.transformer.get_cast_dtype()
    x = parts.token_embedding(tokens).to(cast_dtype)
    return x + parts.positional_embedding[start : start + tokens.shape[1]].to(cast_dtype)


def text_hidden(parts: TextParts, tokens: torch.Tensor) -> torch.Tensor:
    """The transformer's output for tokens ``[n, L]`` at positions ``0..L-1``: ``[n, L, D]``."""
    length = tokens.shape[1]
    return parts.transformer(_text_embed(parts, tokens), attn_mask=parts.attn_mask[:length, :length])


def text_head(parts: TextParts, hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Transformer outputs ``[n, l, D]`` pooled at ``index [n]`` -> unit embeddings ``[n, E]``
    (``ln_final`` is per token, so applying it after pooling gives open_clip's numbers)."""
    x = parts.ln_final(hidden[torch.arange(hidden.shape[0], device=hidden.device), index])  # [n, D]
    projection = parts.text_projection
    if isinstance(projection, nn.Linear):
        x = projection(x)
    elif projection is not None:
        x = x @ projection
    return F.normalize(x, dim=-1)


def _attention_of(block: nn.Module) -> nn.MultiheadAttention | None:
    """A plain block's self-attention (through a traceable view's wrapper), or None."""
    attention = getattr(block, "attn", None)
    attention = getattr(attention, "attention", attention)
    if (
        type(block) is ResidualAttentionBlock
        and not hasattr(block, "ln_1_kv")
        and isinstance(attention, nn.MultiheadAttention)
        and attention.batch_first
        and attention._qkv_same_embed_dim
        and attention.bias_k is None
        and not attention.add_zero_attn
    ):
        return attention
    return None


def _shares_prefix(parts: TextParts) -> bool:
    """Whether every block is open_clip's plain residual attention block (whose keys and values
    :func:`_prefix_keys_values` can compute); custom blocks (qk-norm, scaled cosine) are not."""
    return getattr(parts.transformer, "batch_first", False) and all(
        _attention_of(block) is not None for block in parts.transformer.resblocks
    )


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[n, l, D]`` -> ``[n, H, l, D/H]``."""
    n, length, width = x.shape
    return x.view(n, length, heads, width // heads).transpose(1, 2)


def _prefix_keys_values(parts: TextParts, prefix: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each block's attention keys and values ``[1, H, p, d]`` for a prefix ``[1, p]`` that many prompts share."""
    x = _text_embed(parts, prefix)  # [1, p, D]
    length, width = prefix.shape[1], x.shape[-1]
    blocks = parts.transformer.resblocks
    keys_values = []
    for i, block in enumerate(blocks):
        attention = _attention_of(block)
        bias = attention.in_proj_bias
        kv = F.linear(block.ln_1(x), attention.in_proj_weight[width:], None if bias is None else bias[width:])
        key, value = kv.chunk(2, dim=-1)  # [1, p, D] each
        keys_values.append((_split_heads(key, attention.num_heads), _split_heads(value, attention.num_heads)))
        if i < len(blocks) - 1:  # the last block's output at the prefix is never read
            x = block(x, attn_mask=parts.attn_mask[:length, :length])
    return keys_values


def _suffix_hidden(
    parts: TextParts, tokens: torch.Tensor, start: int, keys_values: list[tuple[torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    """The transformer's output at positions ``start..L-1`` of tokens ``[n, L]`` whose first ``start``
    tokens are the prefix of ``keys_values``: ``[n, L - start, D]``. The same block arithmetic as
    open_clip's ``ResidualAttentionBlock`` (pre-norm attention and MLP, layer scales)."""
    n, length = tokens.shape
    x = _text_embed(parts, tokens[:, start:], start)  # [n, s, D]
    s, width = length - start, x.shape[-1]
    mask = parts.attn_mask[start:length, :length].to(x.dtype)  # [s, L]: position start + i sees 0..start + i
    for block, (prefix_key, prefix_value) in zip(parts.transformer.resblocks, keys_values):
        attention = _attention_of(block)
        heads = attention.num_heads
        qkv = F.linear(block.ln_1(x), attention.in_proj_weight, attention.in_proj_bias)  # [n, s, 3D]
        query, key, value = qkv.view(n, s, 3, heads, width // heads).permute(2, 0, 3, 1, 4).unbind(0)  # [n, H, s, d]
        key = torch.cat([prefix_key.expand(n, -1, -1, -1), key], dim=2)  # [n, H, L, d]
        value = torch.cat([prefix_value.expand(n, -1, -1, -1), value], dim=2)
        attended = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)  # [n, H, s, d]
        x = x + block.ls_1(attention.out_proj(attended.transpose(1, 2).reshape(n, s, width)))
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return x


def encode_text_eager(parts: TextParts, tokens: torch.Tensor) -> torch.Tensor:
    """:meth:`ClipBackbone.encode_text` on a truncatable tower, eagerly: rows trimmed to their
    pooled position + 1, run in passes by that length, and the prefix all rows share computed once
    (when that saves more than a pass costs)."""
    index = pool_index(parts, tokens)  # [T]
    lengths = index + 1
    tokens = tokens[:, : int(lengths.max())]
    prefix = 0
    if tokens.shape[0] > 1 and _shares_prefix(parts):
        same = (tokens == tokens[:1]).all(dim=0)  # [L]
        prefix = min(int(same.long().cumprod(0).sum()), int(index.min()))  # every pooled position after it
        if (tokens.shape[0] - 1) * prefix <= _pass_overhead(tokens.device):  # not worth a pass of its own
            prefix = 0
    keys_values = _prefix_keys_values(parts, tokens[:1, :prefix]) if prefix else None
    out = None
    for length, rows in length_groups(lengths, prefix):
        group = tokens[rows, :length]
        if keys_values is not None:
            embeddings = text_head(parts, _suffix_hidden(parts, group, prefix, keys_values), index[rows] - prefix)
        else:
            embeddings = text_head(parts, text_hidden(parts, group), index[rows])
        if out is None:
            out = embeddings.new_empty((tokens.shape[0], embeddings.shape[-1]))
        out[rows] = embeddings
    return out
