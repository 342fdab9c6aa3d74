"""The text tower exactly as open_clip computes it, at any length.

CLIP's text transformer is causal and pools at the end-of-text token, so the tokens after a prompt's
end change nothing it outputs, and prompts that begin alike compute the same thing there: each
prompt can run only up to its end, the beginnings prompts share once, packed into long sequences
under an exact mask (:func:`encode_text_eager`). Which towers allow it is decided from the model's
own modules and config (:func:`truncation_problem`); the others keep the full length.
:class:`pacl_fast.backbone.ClipBackbone` is the interface; this module is its text-side machinery.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
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
#: Used where rows run whole, in passes by length (:func:`length_groups`).
PASS_OVERHEAD_TOKENS = {"cpu": 32, "cuda": 4096}
#: Most token positions one pass runs at once (sequences x length): bounds the activations a pass
#: holds (ViT-B-16 fp32: ~25 kB a position, so ~200 MB on a CPU) whatever the caller sends.
PASS_POSITIONS = {"cpu": 8192, "cuda": 65536}
#: Length of the packed sequences (positions) the eager tower runs: long enough that a template's
#: prefix is shared by dozens of prompts, short enough that attention over it (``4 D S`` FLOPs a
#: position against ``24 D^2`` for the rest, ~4% for CLIP's text width 512) stays small.
PACK_LENGTH = 128


def _device_value(table: dict[str, int], device: torch.device) -> int:
    return table.get(device.type, table["cpu"])


def length_groups(lengths: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """Rows in passes by length: ``[(length, row indices)]``, each pass run at the longest length in it.

    Rows of one length need no padding; merging lengths saves passes. The grouping minimises the
    positions run plus :data:`PASS_OVERHEAD_TOKENS` per pass, by dynamic programming over the
    distinct lengths (at most the context length of them).
    """
    values, counts = lengths.unique(return_counts=True)
    values, counts = values.tolist(), counts.tolist()
    overhead = _device_value(PASS_OVERHEAD_TOKENS, lengths.device)
    best, start = [0.0] * (len(values) + 1), [0] * (len(values) + 1)  # best[j]: the first j lengths
    for j in range(1, len(values) + 1):
        rows, best[j] = 0, float("inf")
        for i in range(j, 0, -1):  # the last pass holds lengths i..j
            rows += counts[i - 1]
            cost = best[i - 1] + overhead + rows * values[j - 1]
            if cost < best[j]:
                best[j], start[j] = cost, i
    groups, j = [], len(values)
    while j > 0:
        i = start[j]
        rows = ((lengths >= values[i - 1]) & (lengths <= values[j - 1])).nonzero().flatten()
        groups.append((values[j - 1], rows))
        j = i - 1
    return groups[::-1]


def _text_embed(parts: TextParts, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Token + positional embeddings ``[n, l, D]`` of tokens ``[n, l]`` at positions ``0..l-1``, or at
    ``positions [n, l]``."""
    cast_dtype = parts.transformer.get_cast_dtype()
    x = parts.token_embedding(tokens).to(cast_dtype)
    if positions is None:
        return x + parts.positional_embedding[: tokens.shape[1]].to(cast_dtype)
    return x + parts.positional_embedding[positions].to(cast_dtype)


def text_hidden(parts: TextParts, tokens: torch.Tensor) -> torch.Tensor:
    """The transformer's output for tokens ``[n, L]`` at positions ``0..L-1``: ``[n, L, D]``."""
    length = tokens.shape[1]
    return parts.transformer(_text_embed(parts, tokens), attn_mask=parts.attn_mask[:length, :length])


def _project(parts: TextParts, pooled: torch.Tensor) -> torch.Tensor:
    """Pooled transformer outputs ``[n, D]`` -> unit embeddings ``[n, E]``."""
    x = parts.ln_final(pooled)
    projection = parts.text_projection
    if isinstance(projection, nn.Linear):
        x = projection(x)
    elif projection is not None:
        x = x @ projection
    return F.normalize(x, dim=-1)


def text_head(parts: TextParts, hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Transformer outputs ``[n, l, D]`` pooled at ``index [n]`` -> unit embeddings ``[n, E]``
    (``ln_final`` is per token, so applying it after pooling gives open_clip's numbers)."""
    return _project(parts, hidden[torch.arange(hidden.shape[0], device=hidden.device), index])  # [n, D] pooled


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


def _plain_blocks(parts: TextParts) -> bool:
    """Whether every block is open_clip's plain residual attention block, whose arithmetic
    :func:`_block` repeats under a mask of its own; custom blocks (qk-norm, scaled cosine attention)
    run through their own modules, whole rows in passes by length."""
    return getattr(parts.transformer, "batch_first", False) and all(
        _attention_of(block) is not None for block in parts.transformer.resblocks
    )


# --- shared prefixes, packed -----------------------------------------------------------------------
#
# Rows that begin with the same tokens compute the same thing at those positions (the mask is causal),
# and a prompt list is mostly such rows: every prompt of a template shares the template's beginning
# (and all share the start token). So the eager tower runs each shared run of leading tokens (a chain)
# once, and each row only from the end of its shared prefix to its pooled (end-of-text) token. They
# are packed into sequences of :data:`PACK_LENGTH` positions, each holding chains followed by rows
# that use them, under a mask that lets a row's positions see the first ``prefix`` positions of its
# chain and its own earlier positions: the attention each position computes is exactly the one it
# computes in its own prompt, at the same positional embedding. Passes are these sequences, so they
# are long (a matmul's worth of rows) whatever the prompts' lengths.


@dataclass(frozen=True)
class TextPlan:
    """Which positions of token ids ``[T, L]`` run: each shared chain once, then each row's rest.

    Bookkeeping of a few thousand integers, kept in NumPy on the host: torch would enter an OpenMP
    region for each small op, and on a busy machine every one of them waits for the other threads
    (measured: plan and packing ~10 ms with idle threads sleeping, ~100 ms with them spinning)."""

    index: np.ndarray  # [T] pooled position of each row
    prefix: np.ndarray  # [T] leading positions each row takes from its chain (0: none)
    chain: np.ndarray  # [T] the chain of each row (meaningful where prefix > 0)
    chain_tokens: np.ndarray  # [C, l] the chains' tokens (each valid up to its length)
    chain_lengths: np.ndarray  # [C]

    @property
    def positions(self) -> int:
        """Token positions the plan needs: the chains once, then every row's rest up to its pooled token."""
        return int(self.chain_lengths.sum()) + int((self.index + 1 - self.prefix).sum())


def _shared_prefixes(tokens: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """How many leading tokens of each row at least one other row shares ``[T]`` (stopping before the
    pooled position), and the rows' trie node ids at each of those depths (``[T]`` per depth: equal
    ids at a depth mean equal tokens up to it)."""
    rows = tokens.shape[0]
    ids = np.zeros(rows, dtype=np.int64)
    prefix = np.zeros(rows, dtype=np.int64)
    alive = np.ones(rows, dtype=bool)
    shifted = tokens - tokens.min()  # >= 0, so (node, token) pairs map to distinct integers
    span = int(shifted.max()) + 1
    nodes = []
    for depth in range(int(index.max())):
        _, ids, counts = np.unique(ids * span + shifted[:, depth], return_inverse=True, return_counts=True)
        ids = ids.reshape(rows)
        alive &= (counts[ids] >= 2) & (index > depth)
        if not alive.any():
            break
        nodes.append(ids)
        prefix += alive
    return prefix, nodes


def plan_text(tokens: torch.Tensor, index: torch.Tensor) -> TextPlan:
    """The plan for token ids ``[T, L]`` pooled at ``index [T]``: each row's shared prefix comes from
    the longest chain (maximal shared run of leading tokens) through it."""
    tokens, index = tokens.cpu().numpy().astype(np.int64), index.cpu().numpy().astype(np.int64)
    rows = tokens.shape[0]
    prefix, nodes = _shared_prefixes(tokens, index) if rows > 1 else (np.zeros_like(index), [])
    # Each row's chain: the row with the longest shared run through the node where its own prefix ends.
    source = np.arange(rows)
    score = prefix * rows + source  # the longest run first, then the highest row: one choice per node
    for depth, ids in enumerate(nodes):
        through = prefix > depth
        best = np.full(rows, -1, dtype=np.int64)
        np.maximum.at(best, ids[through], score[through])
        ending = prefix == depth + 1
        source[ending] = best[ids[ending]] % rows
    sharing = prefix > 0
    chain_rows, chain = np.unique(source[sharing], return_inverse=True)
    chain_of = np.zeros(rows, dtype=np.int64)
    chain_of[sharing] = chain.reshape(-1)
    lengths = prefix[chain_rows]
    width = int(lengths.max()) if len(lengths) else 0
    return TextPlan(index, prefix, chain_of, tokens[chain_rows, :width], lengths)


@dataclass(frozen=True)
class TextPass:
    """Packed sequences run through the tower together."""

    tokens: torch.Tensor  # [N, S] token ids (padding: any id)
    positions: torch.Tensor  # [N, S] positional embedding of each (padding: 0)
    mask: torch.Tensor  # [N, 1, S, S] bool: which positions each position attends to
    pooled: torch.Tensor  # [R] flat indices (into N * S) of the pooled positions
    rows: torch.Tensor  # [R] the rows of the call they are
    filled: int  # positions holding a token (the rest, N * S - filled, is padding)


def _layout(plan: TextPlan, capacity: int) -> tuple[int, int, list[tuple[int, int, int, int]], list[int], list[int]]:
    """Where each position goes, filling sequences of ``capacity`` positions (or a longer prompt's
    length) in order: each chain's prefix, then the rows that use it; a chain whose rows do not fit
    goes on in the next sequence with its prefix again (rows sorted by prefix length, longest first,
    so each repeat is as short as the rows still to place allow).

    Returns the sequence length (the fullest sequence's), the number of sequences, the chain segments
    ``(flat start, positions, chain, segment number)``, and each row's flat start and chain segment
    (-1: none). Flat is ``sequence * length + offset``; rows are segments ``0..T-1``, chains after them.
    """
    prefix, chain = plan.prefix.tolist(), plan.chain.tolist()
    suffix = (plan.index + 1 - plan.prefix).tolist()
    count = len(prefix)
    by_chain: dict[int, list[int]] = {}
    for row in range(count):
        by_chain.setdefault(chain[row] if prefix[row] else -1 - row, []).append(row)  # unshared: alone
    capacity = max(capacity, max(p + s for p, s in zip(prefix, suffix)))
    sequence, used, fullest = -1, capacity, 0
    segments, place, parent = [], [(0, 0)] * count, [-1] * count  # place: (sequence, offset)
    for number, rows in by_chain.items():
        rows.sort(key=lambda row: -prefix[row])
        segment = -1  # the chain's segment in the current sequence
        for row in rows:
            if used + suffix[row] + (prefix[row] if segment < 0 else 0) > capacity:
                sequence, used, segment = sequence + 1, 0, -1
            if segment < 0 and prefix[row]:
                segment = count + len(segments)
                segments.append((sequence, used, prefix[row], number, segment))
                used += prefix[row]
            place[row], parent[row] = (sequence, used), segment
            used += suffix[row]
            fullest = max(fullest, used)
    length = fullest  # no sequence needs more (a short call runs short sequences)
    chain_parts = [(s * length + offset, width, number, segment) for s, offset, width, number, segment in segments]
    return length, sequence + 1, chain_parts, [s * length + offset for s, offset in place], parent


def _runs(starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs of ``lengths`` positions from flat ``starts``: ``(flat index, run number, offset in run)`` of each."""
    run = np.repeat(np.arange(len(lengths)), lengths)
    offset = np.arange(len(run)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return starts[run] + offset, run, offset


def pack_text(tokens: torch.Tensor, plan: TextPlan, length: int | None = None) -> list[TextPass]:
    """The passes that run ``plan`` on ``tokens [T, L]``: sequences of at most ``length`` (default
    :data:`PACK_LENGTH`) positions laid out by :func:`_layout`, at most :data:`PASS_POSITIONS`
    positions a pass."""
    device = tokens.device
    length, sequences, chain_parts, row_start, row_parent = _layout(plan, length or PACK_LENGTH)
    total = sequences * length
    flat_tokens = np.zeros(total, dtype=np.int64)
    flat_positions = np.zeros(total, dtype=np.int64)
    segment = -2 - np.arange(total)  # padding: a segment of its own, sees only itself
    parent = np.full(total, -1, dtype=np.int64)
    limit = np.zeros(total, dtype=np.int64)
    if chain_parts:
        starts, widths, chains, segments = (np.array(column, dtype=np.int64) for column in zip(*chain_parts))
        where, run, offset = _runs(starts, widths)
        flat_tokens[where] = plan.chain_tokens[chains[run], offset]
        flat_positions[where] = offset
        segment[where] = segments[run]
    own = plan.index + 1 - plan.prefix  # [T]
    where, run, offset = _runs(np.array(row_start, dtype=np.int64), own)
    columns = plan.prefix[run] + offset
    flat_tokens[where] = tokens.cpu().numpy()[run, columns]
    flat_positions[where] = columns
    segment[where] = run
    parent[where] = np.array(row_parent, dtype=np.int64)[run]
    limit[where] = plan.prefix[run]
    pooled = np.array(row_start, dtype=np.int64) + own - 1  # [T] flat index of each row's pooled position

    per_pass = max(1, _device_value(PASS_POSITIONS, device) // length)
    passes = []
    for first in range(0, sequences, per_pass):
        n = min(per_pass, sequences - first)
        cut = slice(first * length, (first + n) * length)
        seg, par, lim, pos = (t[cut].reshape(n, length) for t in (segment, parent, limit, flat_positions))
        mask = (seg[:, :, None] == seg[:, None, :]) & (pos[:, None, :] <= pos[:, :, None])  # own, causal
        mask |= (par[:, :, None] == seg[:, None, :]) & (pos[:, None, :] < lim[:, :, None])  # the chain's prefix
        rows = np.flatnonzero((pooled >= cut.start) & (pooled < cut.stop))
        passes.append(
            TextPass(
                torch.from_numpy(flat_tokens[cut].reshape(n, length)).to(device),
                torch.from_numpy(pos).to(device),
                torch.from_numpy(mask[:, None]).to(device),
                torch.from_numpy(pooled[rows] - cut.start).to(device),
                torch.from_numpy(rows).to(device),
                int((segment[cut] >= 0).sum()),
            )
        )
    return passes


def _block(
    block: ResidualAttentionBlock,
    attention: nn.MultiheadAttention,
    x: torch.Tensor,
    mask: torch.Tensor,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """open_clip's ``ResidualAttentionBlock`` on ``x [N, S, D]`` (pre-norm attention and MLP, layer
    scales) under the additive ``mask [N, 1, S, S]`` (made once a pass, not converted by every call)
    -> ``[N, S, D]``; with ``keep`` (flat indices into ``N * S``), only those positions' outputs
    ``[K, D]`` (the last block: only pooled positions are read)."""
    n, s, width = x.shape
    heads = attention.num_heads
    qkv = F.linear(block.ln_1(x), attention.in_proj_weight, attention.in_proj_bias)  # [N, S, 3D]
    query, key, value = qkv.view(n, s, 3, heads, width // heads).permute(2, 0, 3, 1, 4).unbind(0)  # [N, H, S, d]
    attended = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)  # [N, H, S, d]
    attended = attended.transpose(1, 2).reshape(n, s, width)  # [N, S, D]
    if keep is not None:
        x, attended = x.reshape(n * s, width)[keep], attended.reshape(n * s, width)[keep]  # [K, D]
    x = x + block.ls_1(attention.out_proj(attended))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def encode_text_eager(parts: TextParts, tokens: torch.Tensor) -> torch.Tensor:
    """:meth:`ClipBackbone.encode_text` on a truncatable tower, eagerly: each row runs only up to its
    pooled position, and the leading tokens rows share run once (:func:`plan_text`), packed into long
    sequences (:func:`pack_text`). Towers with custom blocks run whole rows through their own modules,
    in passes by length."""
    index = pool_index(parts, tokens)  # [T]
    tokens = tokens[:, : int(index.max()) + 1]
    out = None
    if not _plain_blocks(parts):
        for length, rows in length_groups(index + 1):
            embeddings = text_head(parts, text_hidden(parts, tokens[rows, :length]), index[rows])
            if out is None:
                out = embeddings.new_full((tokens.shape[0], embeddings.shape[-1]), math.nan)
            out[rows] = embeddings
        return out
    blocks = parts.transformer.resblocks
    for step in pack_text(tokens, plan_text(tokens, index)):
        x = _text_embed(parts, step.tokens, step.positions)  # [N, S, D]
        mask = torch.zeros(step.mask.shape, dtype=x.dtype, device=x.device).masked_fill_(~step.mask, -math.inf)
        for block in blocks[:-1]:
            x = _block(block, _attention_of(block), x, mask)
        embeddings = _project(parts, _block(blocks[-1], _attention_of(blocks[-1]), x, mask, step.pooled))
        if out is None:
            out = embeddings.new_full((tokens.shape[0], embeddings.shape[-1]), math.nan)  # a row never written shows
        out[step.rows] = embeddings
    return out
