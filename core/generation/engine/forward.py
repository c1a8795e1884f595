"""A small GPT-2 forward pass over ragged sequences whose KV lives in caller-owned blocks.

It runs the weights of a loaded `GPT2LMHeadModel` (shared, not copied) with the same ops the
model uses (`addmm` for Conv1D, the same activation, SDPA, tied LM head), so its logits match
Hugging Face's within float rounding. One call (`last_hidden`) advances any number of sequences
by any number of tokens each: the dense parts (layer norms, projections, MLP) run once over all
the step's tokens packed together, with no padding; attention runs over each sequence's own KV
block, so a 900-token history and a 30-token one never pad each other. On a CPU the C++ kernel
reads the blocks in place, every token of the step in one call per layer (`ArenaAttention`);
elsewhere prompt chunks take one SDPA call each and the decoding sequences (one token each) one
call per layer over a dense pool (`slots`), and a step where every sequence decodes over the
pool can run at static shapes instead, captured in a CUDA graph on a GPU (`static_decode`,
`graphs`).

A KV block is a tensor `[n_layer, 2, n_head, capacity, head_dim]` (see `kv.KVArena`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from core.generation.engine.graphs import DecodeGraphs, GraphMode, graph_capture
from core.generation.engine.kernels.attention import (
    INT8_ROW_EXTRA,
    AttentionKernel,
    load_attention,
)
from core.generation.engine.kernels.loading import KernelMode
from core.generation.engine.kernels.top_k import (
    FusedSample,
    TopK,
    load_fused_sample,
    load_top_k,
    torch_top_k,
)
from core.generation.engine.linear import (
    TANH_GELU,
    Linear,
    LinearKind,
    Norm,
    PanelKernel,
    Residual,
    choose_kind,
    load_panel_kernel,
    prepare_head,
    prepare_linear,
    prepare_residual,
    resolve_quant,
)
from core.generation.engine.slots import BlockKey, DecodePlan, DecodeSlots

logger = logging.getLogger(__name__)

__all__ = ["GPT2Dims", "GPT2Forward", "LayerWeights", "SeqChunk", "UnsupportedModelError"]

CompileMode = str  # "off" | "compile"
Dense = Callable[..., torch.Tensor]


class UnsupportedModelError(ValueError):
    """The model is not a plain GPT-2 this forward pass reproduces exactly."""


@dataclass(frozen=True, slots=True)
class GPT2Dims:
    n_layer: int
    n_head: int
    head_dim: int
    n_embd: int
    n_positions: int
    vocab_size: int
    eps: float

    @property
    def kv_elements_per_token(self) -> int:
        """K and V of one token in every layer."""
        return self.n_layer * 2 * self.n_embd


KVDtype = Literal["auto", "model", "int8"]
KV_DTYPES: tuple[KVDtype, ...] = ("auto", "model", "int8")


@dataclass(frozen=True, slots=True)
class KVStorage:
    """How the engine's arena keeps one head's key or value of one token: `row` elements of
    `dtype`: the model's dtype (`row` = head_dim), or int8 rows (uint8, `row` = head_dim + 4:
    the int8 values, then their float32 scale)."""

    dtype: torch.dtype
    row: int


@dataclass(frozen=True, slots=True)
class LayerWeights:
    ln1_w: torch.Tensor
    ln1_b: torch.Tensor
    qkv_w: torch.Tensor
    qkv_b: torch.Tensor
    proj_w: torch.Tensor
    proj_b: torch.Tensor
    ln2_w: torch.Tensor
    ln2_b: torch.Tensor
    fc_w: torch.Tensor
    fc_b: torch.Tensor
    out_w: torch.Tensor
    out_b: torch.Tensor


@dataclass(frozen=True, slots=True)
class SeqChunk:
    """Feed `ids` to one sequence at positions `start…`; its KV before `start` is in `kv`."""

    kv: torch.Tensor
    start: int
    ids: Sequence[int]


def check_supported(config: Any) -> None:
    """Refuse GPT-2 variants whose attention differs from the plain one reproduced here."""
    if getattr(config, "model_type", None) != "gpt2":
        raise UnsupportedModelError(f"model_type {getattr(config, 'model_type', None)!r}")
    odd = {
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
    }
    for name, expected in odd.items():
        if bool(getattr(config, name, expected)) != expected:
            raise UnsupportedModelError(f"{name}={getattr(config, name)!r}")


def dims_of(config: Any) -> GPT2Dims:
    return GPT2Dims(
        n_layer=int(config.n_layer),
        n_head=int(config.n_head),
        head_dim=int(config.n_embd) // int(config.n_head),
        n_embd=int(config.n_embd),
        n_positions=int(config.n_positions),
        vocab_size=int(config.vocab_size),
        eps=float(config.layer_norm_epsilon),
    )


def layer_weights(block: Any) -> LayerWeights:
    """One `GPT2Block`'s parameters (Conv1D weights are `[in, out]`, used with `addmm`)."""
    attn, mlp = block.attn, block.mlp
    in_field_order = (block.ln_1, attn.c_attn, attn.c_proj, block.ln_2, mlp.c_fc, mlp.c_proj)
    return LayerWeights(*(t for module in in_field_order for t in (module.weight, module.bias)))


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model's activation; GPT-2's `gelu_new` as one fused op (`F.gelu` with the same tanh
    formula, within 3e-7 of Hugging Face's eight-op version, and many times faster on a CPU)."""
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return partial(F.gelu, approximate="tanh")
    return ACT2FN[name]


@dataclass(frozen=True, slots=True)
class LayerLinears:
    """One layer's four projections, weights prepared for their kernel (`linear`): `qkv` and
    `fc` normalize their input first (the int8 panel kernel inside the call), `proj` and `out`
    add the residual, `fc` applies the activation."""

    qkv: Linear
    proj: Residual
    fc: Linear
    out: Residual


def layer_linears(
    kind: LinearKind,
    w: LayerWeights,
    act: Linear,
    act_name: str = "",
    panels: PanelKernel | None = None,
    eps: float = 1e-5,
) -> LayerLinears:
    """`qkv` and `fc` apply the layer norm in front of them (ln_1, ln_2) themselves."""
    return LayerLinears(
        qkv=prepare_linear(kind, w.qkv_w, w.qkv_b, panels=panels, norm=Norm(w.ln1_w, w.ln1_b, eps)),
        proj=prepare_residual(kind, w.proj_w, w.proj_b, panels),
        fc=prepare_linear(kind, w.fc_w, w.fc_b, act, act_name, panels, Norm(w.ln2_w, w.ln2_b, eps)),
        out=prepare_residual(kind, w.out_w, w.out_b, panels),
    )


def activation_name(name: str) -> str:
    """`gelu_tanh` for the activations `activation` runs as tanh-GELU (a fusable post-op)."""
    return TANH_GELU if name in ("gelu_new", "gelu_pytorch_tanh") else ""


class GPT2Forward:
    """The forward pass of a `GPT2LMHeadModel`, over ragged sequences with external KV.

    `quant="int8"` runs every projection and the LM head on int8 weights (CPU); otherwise the
    dense kernels are the model dtype's fastest here (`linear.choose_kind`). `graphs`: decode
    steps over the pool at static shapes, captured in CUDA graphs on a GPU (`graphs`).
    """

    def __init__(
        self,
        model: Any,
        compile_mode: CompileMode = "off",
        quant: str = "off",
        kernels: KernelMode = "auto",
        kernel_dir: Path | None = None,
        graphs: GraphMode = "auto",
        kv_dtype: KVDtype = "model",
    ) -> None:
        config = model.config
        check_supported(config)
        self.dims = dims_of(config)
        transformer = model.transformer
        self.wte: torch.Tensor = transformer.wte.weight
        self.wpe: torch.Tensor = transformer.wpe.weight
        self.lnf_w: torch.Tensor = transformer.ln_f.weight
        self.lnf_b: torch.Tensor = transformer.ln_f.bias
        self.layers = [layer_weights(block) for block in transformer.h]
        self.act = activation(config.activation_function)
        self.device = self.wte.device
        self.dtype = self.wte.dtype
        self.scale = self.dims.head_dim**-0.5
        asked = quant
        quant = resolve_quant(self.device, self.dtype, quant, kernels, kernel_dir)
        if asked == "auto":
            logger.info("KOBOT_ENGINE_QUANT=auto: %s", "int8 weights" if quant == "int8" else "off")
        self.linear_kind: LinearKind = choose_kind(self.device, self.dtype, quant)
        panels = None
        if self.device.type == "cpu":
            panels = load_panel_kernel(self.linear_kind, self.dtype, kernels, kernel_dir)
        self.panel_kernel = panels.name if panels is not None else None
        """`bf16` or `int8` where kobot's panel kernel runs the dense layers."""
        if panels is not None:
            self.linear_kind = "panels"
        self.quant = quant
        self.activation_dtype = torch.float32 if self.linear_kind == "int8" else self.dtype
        """int8 linears take and give fp32: the hidden states stay fp32 between them, the K/V
        are stored in the model's dtype (two conversions fewer a linear; 14% of a bf16 int8
        burst's engine time was the conversion of their outputs back to bf16)."""
        if self.activation_dtype != self.dtype:
            self._norms_in(self.activation_dtype)
        act_name = activation_name(config.activation_function)
        self.linears = [
            layer_linears(self.linear_kind, w, self.act, act_name, panels, self.dims.eps)
            for w in self.layers
        ]
        final_norm = Norm(self.lnf_w, self.lnf_b, self.dims.eps)
        self._head = prepare_head(self.linear_kind, self.wte, panels, final_norm)
        d = self.dims
        self.attention_kernel: AttentionKernel | None = None
        """The C++ attention over the arena (CPU, fp32/bf16, where it builds)."""
        self.top_k: TopK = torch_top_k
        """The sampler's candidate selection: the C++ kernel on a CPU (where it builds)."""
        self.fused_sample: FusedSample | None = None
        """The sampler's whole choice in one C++ call (CPU, where it builds)."""
        if self.device.type == "cpu":
            self.top_k = load_top_k(kernels, kernel_dir) or torch_top_k
            self.fused_sample = load_fused_sample(kernels, kernel_dir)
            if self.dtype in (torch.float32, torch.bfloat16):
                self.attention_kernel = load_attention(kernels, kernel_dir)
        self.decode_slots = DecodeSlots(d.n_layer, d.n_head, d.head_dim, self.dtype)
        """Batched decode attention's KV pool without the kernel; off (0 bytes) until the engine
        sizes it."""
        self.kv_storage = self._kv_storage(kv_dtype)
        capture = graph_capture(graphs, self.device)
        self.decode_graphs: DecodeGraphs | None = None
        """Decode-only steps over the pool at static shapes (CUDA graphs on a GPU)."""
        if capture is not None and self.attention_kernel is None:
            self.decode_graphs = DecodeGraphs(self.static_decode, self.device, capture)
        self._pre: Dense = self._pre_attention
        self._post: Dense = self._post_attention
        if compile_mode == "compile":
            self._pre = torch.compile(self._pre_attention, dynamic=True)
            self._post = torch.compile(self._post_attention, dynamic=True)

    def _kv_storage(self, kv_dtype: KVDtype) -> KVStorage:
        """The arena's rows: int8 (`kv_dtype` int8, or auto) where the kernel reads them, else
        the model's."""
        if kv_dtype not in KV_DTYPES:
            raise ValueError(
                f"KOBOT_ENGINE_KV_DTYPE: must be auto, model or int8 (got {kv_dtype!r})"
            )
        head_dim = self.dims.head_dim
        if kv_dtype == "auto" and self.attention_kernel is not None:
            return KVStorage(torch.uint8, head_dim + INT8_ROW_EXTRA)
        if kv_dtype == "int8":
            if self.attention_kernel is not None:
                return KVStorage(torch.uint8, head_dim + INT8_ROW_EXTRA)
            logger.warning(
                "KOBOT_ENGINE_KV_DTYPE=int8 needs the C++ attention (a CPU where it builds); "
                "the KV cache stays in %s",
                str(self.dtype).removeprefix("torch."),
            )
        return KVStorage(self.dtype, head_dim)

    def _norms_in(self, dtype: torch.dtype) -> None:
        """The layer norms' weights in `dtype`, for hidden states of that dtype."""
        self.lnf_w, self.lnf_b = self.lnf_w.to(dtype), self.lnf_b.to(dtype)
        self.layers = [
            replace(w, ln1_w=w.ln1_w.to(dtype), ln1_b=w.ln1_b.to(dtype),
                    ln2_w=w.ln2_w.to(dtype), ln2_b=w.ln2_b.to(dtype))
            for w in self.layers
        ]  # fmt: skip

    # --- public -----------------------------------------------------------------------------

    @torch.inference_mode()
    def logits(
        self, chunks: Sequence[SeqChunk], kv_buffer: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Float32 logits `[len(chunks), vocab]` after each chunk's last token."""
        return self.lm_head(self.last_hidden(chunks, kv_buffer))

    @torch.inference_mode()
    def last_hidden(
        self, chunks: Sequence[SeqChunk], kv_buffer: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Write every chunk's K/V into its block and return the final hidden state (before
        `ln_f`) of each chunk's last token, `[len(chunks), n_embd]`.

        When every block is a view of the flat tensor `kv_buffer` (the engine's arena), each
        layer writes all new K/V with one indexed copy instead of one copy per chunk, but for
        the one-token chunks of a batched decode: the kernel writes theirs into the arena, the
        decode pool into the pool only (`slots`: the engine calls `retire` before it caches or
        frees such a block)."""
        static = self._graph_step(chunks, kv_buffer)
        if static is not None:
            return static
        ids, positions, bounds = self._packed_inputs(chunks)
        decode = self._decode_plan(chunks, kv_buffer)
        writer = None
        if kv_buffer is not None:
            written = decode.written if decode is not None else frozenset()
            writer = KVWriter(chunks, bounds, written, kv_buffer, self.dims)
        if isinstance(decode, DecodeRows):
            decode.locate(bounds, self.device)

        def attend(index: int, split: torch.Tensor) -> torch.Tensor:
            if writer is not None:
                writer.write(index, split)
            return self._attention(index, split, chunks, bounds, writer is None, decode)

        x = self._layers(self._embed(ids, positions), attend)
        if len(bounds) == x.shape[0]:
            return x
        last = torch.tensor([end - 1 for _, end in bounds], device=self.device)
        return x.index_select(0, last)

    def static_decode(self, inputs: torch.Tensor, span: int) -> torch.Tensor:
        """A decode step over the pool at static shapes, with no host data (what a CUDA graph
        captures): `inputs` `[3, batch]` holds each row's token, position and pool slot; every
        slot of the pool is attended over `span` positions. Hidden states `[batch, n_embd]`."""
        tokens, positions, slots = inputs.unbind(0)
        pool = self.decode_slots.pool
        assert pool is not None
        plan = DecodePlan(pool, slots, positions, used=pool.shape[2], span=span)
        return self._layers(
            self._embed(tokens, positions),
            lambda index, split: plan.attend(index, split, self.scale),
        )

    def _graph_step(
        self, chunks: Sequence[SeqChunk], kv_buffer: torch.Tensor | None
    ) -> torch.Tensor | None:
        """A decode-only step over the pool by `decode_graphs`; None when it does not apply."""
        graphs, slots = self.decode_graphs, self.decode_slots
        if graphs is None or graphs.failed or kv_buffer is None or slots.max_bytes <= 0:
            return None
        if any(len(chunk.ids) != 1 for chunk in chunks):
            return None
        starts = [chunk.start for chunk in chunks]
        assigned = slots.assign(self._pool_keys(chunks, kv_buffer), [c.kv for c in chunks], starts)
        if assigned is None or slots.pool is None:
            return None
        tokens = [chunk.ids[0] for chunk in chunks]
        return graphs.run(
            slots.pool, tokens, starts, assigned, slots.spare_slot, slots.span(starts)
        )

    def discard_decode(self) -> None:
        """Forget every decoding sequence (their blocks are being freed: a failed step, a
        shutdown): pool slots freed without copying back, graphs dropped."""
        self.decode_slots.discard()
        if self.decode_graphs is not None:
            self.decode_graphs.clear()

    def _pool_keys(self, chunks: Sequence[SeqChunk], kv_buffer: torch.Tensor) -> list[BlockKey]:
        origin = kv_buffer.storage_offset()
        return [(int(c.kv.storage_offset() - origin), int(c.kv.shape[3])) for c in chunks]

    def _decode_plan(
        self, chunks: Sequence[SeqChunk], kv_buffer: torch.Tensor | None
    ) -> ArenaAttention | DecodeRows | None:
        """Batched attention, when the blocks are in the arena: every token's by the kernel,
        reading them there; without it, the one-token chunks' over the pool when it may hold
        them (`decode_slots.max_bytes`)."""
        if kv_buffer is None:
            return None
        if self.attention_kernel is not None:
            return ArenaAttention(self.attention_kernel, chunks, kv_buffer)
        rows = [i for i, chunk in enumerate(chunks) if len(chunk.ids) == 1]
        if self.decode_slots.max_bytes <= 0:
            return None
        if not rows:
            self.decode_slots.release_others(set())
            return None
        picked = [chunks[i] for i in rows]
        keys = self._pool_keys(picked, kv_buffer)
        plan = self.decode_slots.prepare(keys, [c.kv for c in picked], [c.start for c in picked])
        return None if plan is None else DecodeRows(plan, rows, len(chunks), self.device)

    def retire(self, kv: torch.Tensor, kv_buffer: torch.Tensor) -> None:
        """The sequence of block `kv` (a view of `kv_buffer`) stops decoding: its KV in the
        decode pool is copied back into the block, and its slot freed."""
        key = (int(kv.storage_offset() - kv_buffer.storage_offset()), int(kv.shape[3]))
        with torch.inference_mode():
            self.decode_slots.retire(key)

    @torch.inference_mode()
    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits of final hidden states (the tied embedding, as Hugging Face does)."""
        return self._head(hidden).float()

    # --- pieces -----------------------------------------------------------------------------

    def _packed_inputs(
        self, chunks: Sequence[SeqChunk]
    ) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
        """All chunks' ids and positions in one row each, and each chunk's `(begin, end)` rows."""
        ids: list[int] = []
        positions: list[int] = []
        bounds: list[tuple[int, int]] = []
        for chunk in chunks:
            begin = len(ids)
            ids.extend(chunk.ids)
            positions.extend(range(chunk.start, chunk.start + len(chunk.ids)))
            bounds.append((begin, len(ids)))
        as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=self.device)  # noqa: E731
        return as_tensor(ids), as_tensor(positions), bounds

    def _embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return (self.wte[ids] + self.wpe[positions]).to(self.activation_dtype)

    def _layers(
        self, x: torch.Tensor, attend: Callable[[int, torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """Every block over the packed rows `x`; `attend(layer, qkv [rows, 3, heads, head_dim])`
        gives each layer's attention output `[rows, n_embd]`."""
        for index, linears in enumerate(self.linears):
            qkv = self._pre(x, linears)
            split = qkv.view(qkv.shape[0], 3, self.dims.n_head, self.dims.head_dim)
            x = self._post(x, attend(index, split), linears)
        return x

    def _pre_attention(self, x: torch.Tensor, linears: LayerLinears) -> torch.Tensor:
        return linears.qkv(x)

    def _post_attention(
        self, x: torch.Tensor, attended: torch.Tensor, linears: LayerLinears
    ) -> torch.Tensor:
        x = linears.proj(attended, x)
        return linears.out(linears.fc(x), x)

    def _attention(
        self,
        layer: int,
        split: torch.Tensor,
        chunks: Sequence[SeqChunk],
        bounds: Sequence[tuple[int, int]],
        write: bool,
        decode: ArenaAttention | DecodeRows | None = None,
    ) -> torch.Tensor:
        """Each chunk attends over its own block (its past plus its new tokens, causally);
        `split` is `[tokens, 3, heads, head_dim]`. With the kernel every token attends in one
        call; over the pool, the one-token chunks in `decode` do (they come first in the
        engine's steps: then no row is copied) and each other chunk in its own SDPA call."""
        if isinstance(decode, ArenaAttention):
            return decode.attend(layer, split, self.scale)
        if decode is None:
            outputs = [
                self._attend_one(layer, chunk, split[begin:end], write)
                for chunk, (begin, end) in zip(chunks, bounds, strict=True)
            ]
            attended = torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]
            return attended.transpose(0, 1).reshape(split.shape[0], self.dims.n_embd)
        batch = len(decode.rows)
        rows = split[:batch] if decode.leading else split.index_select(0, decode.token_rows)
        batched = decode.plan.attend(layer, rows, self.scale)
        if decode.everything:
            return batched
        attended = split.new_empty(split.shape[0], self.dims.n_embd)
        for index, (chunk, (begin, end)) in enumerate(zip(chunks, bounds, strict=True)):
            if index not in decode.row_set:
                output = self._attend_one(layer, chunk, split[begin:end], write)
                attended[begin:end] = output.transpose(0, 1).reshape(end - begin, -1)
        if decode.leading:
            attended[:batch] = batched
        else:
            attended.index_copy_(0, decode.token_rows, batched)
        return attended

    def _attend_one(
        self, layer: int, chunk: SeqChunk, rows: torch.Tensor, write: bool
    ) -> torch.Tensor:
        """`rows` is `[n, 3, heads, head_dim]`; returns `[heads, n, head_dim]`."""
        n, start = rows.shape[0], chunk.start
        end = start + n
        kv = chunk.kv[layer]
        if write:
            kv[:, :, start:end].copy_(rows[:, 1:].permute(1, 2, 0, 3))
        query = rows[:, 0].transpose(0, 1).unsqueeze(0).to(kv.dtype)
        keys, values = kv[0, :, :end].unsqueeze(0), kv[1, :, :end].unsqueeze(0)
        mask = causal_mask(n, start, rows.device)
        attended = F.scaled_dot_product_attention(
            query, keys, values, attn_mask=mask, is_causal=n > 1 and start == 0, scale=self.scale
        )
        return attended[0].to(rows.dtype)


class ArenaAttention:
    """One step's attention by the kernel, one call per layer for every token, over each
    sequence's arena block in place (the model's dtype or int8 rows): every token's new K/V is
    written there first, then each token attends up to its own position."""

    def __init__(
        self,
        kernel: AttentionKernel,
        chunks: Sequence[SeqChunk],
        kv_buffer: torch.Tensor,
    ) -> None:
        self.kernel = kernel
        self.flat = kv_buffer.view(-1)
        self.query_dtype = None if kv_buffer.dtype == torch.uint8 else kv_buffer.dtype
        """What the queries are converted to: the arena's dtype (int8 rows take any)."""
        self.written = frozenset(range(len(chunks)))
        """The kernel writes every chunk's K/V."""
        origin = kv_buffer.storage_offset()
        offsets: list[int] = []
        strides: list[tuple[int, int, int]] = []
        lengths: list[int] = []
        for chunk in chunks:  # a block [n_layer, 2, n_head, capacity, row], contiguous
            n = len(chunk.ids)
            offsets += [int(chunk.kv.storage_offset() - origin)] * n
            layer, part, head = chunk.kv.stride()[:3]
            strides += [(int(layer), int(part), int(head))] * n
            lengths += range(chunk.start + 1, chunk.start + n + 1)
        as_tensor = partial(torch.tensor, dtype=torch.long, device=kv_buffer.device)
        layer_step, kv_shift, head_strides = as_tensor(strides).reshape(-1, 3).unbind(1)
        self.layer_step, self.head_strides = layer_step.contiguous(), head_strides.contiguous()
        self.keys = as_tensor(offsets)
        """Layer 0's key offsets, one per token; layer l's add `l * layer_step`, its values
        `kv_shift` more."""
        self.values = self.keys + kv_shift
        self.lengths = as_tensor(lengths)

    def attend(self, layer: int, split: torch.Tensor, scale: float) -> torch.Tensor:
        """`split` `[tokens, 3, heads, head_dim]` (the step's packed rows) -> `[tokens, n_embd]`."""
        tokens, _, heads, head_dim = split.shape
        shift = self.layer_step * layer
        queries = split if self.query_dtype is None else split.to(self.query_dtype)
        attended = self.kernel(
            queries, self.flat, self.keys + shift, self.values + shift,
            self.head_strides, self.lengths, scale,
        )  # fmt: skip
        return attended.reshape(tokens, heads * head_dim).to(split.dtype)


class DecodeRows:
    """A step's one-token chunks (`rows`, chunk indices) and their batched attention over the
    decode pool (`DecodePlan`), which also writes their new K/V (into the pool only)."""

    def __init__(
        self, plan: DecodePlan, rows: list[int], n_chunks: int, device: torch.device
    ) -> None:
        self.plan = plan
        self.rows = rows
        self.row_set = frozenset(rows)
        self.written = self.row_set
        self.leading = rows == list(range(len(rows)))
        self.everything = self.leading and len(rows) == n_chunks
        self.token_rows = torch.empty(0, dtype=torch.long, device=device)

    def locate(self, bounds: Sequence[tuple[int, int]], device: torch.device) -> None:
        """The packed rows of the one-token chunks (needed when they do not come first)."""
        if not self.leading:
            self.token_rows = torch.tensor([bounds[i][0] for i in self.rows], device=device)


class KVWriter:
    """Writes one layer's new K/V of every chunk (but those in `skip`) with a single
    `index_copy_` into the flat buffer that all the chunks' blocks are views of."""

    def __init__(
        self,
        chunks: Sequence[SeqChunk],
        bounds: Sequence[tuple[int, int]],
        skip: frozenset[int],
        buffer: torch.Tensor,
        dims: GPT2Dims,
    ) -> None:
        self.rows2d = buffer.view(-1, dims.head_dim)
        heads, head_dim = dims.n_head, dims.head_dim
        base: list[int] = []
        capacity: list[int] = []
        position: list[int] = []
        token_rows: list[int] = []
        for index, (chunk, (begin, end)) in enumerate(zip(chunks, bounds, strict=True)):
            if index in skip:
                continue
            offset = chunk.kv.storage_offset() - buffer.storage_offset()
            n = len(chunk.ids)
            base += [offset // head_dim] * n
            capacity += [chunk.kv.shape[3]] * n
            position += range(chunk.start, chunk.start + n)
            token_rows += range(begin, end)
        self.empty = not token_rows
        self.span: tuple[int, int] | None = None
        """The written rows of the packed tokens, when they are one range (no gather)."""
        self.token_rows: torch.Tensor | None = None
        if self.empty:
            return
        if token_rows[-1] - token_rows[0] + 1 == len(token_rows):
            self.span = (token_rows[0], token_rows[-1] + 1)
        else:
            self.token_rows = torch.tensor(token_rows, dtype=torch.long, device=buffer.device)
        as_tensor = lambda values: torch.tensor(values, device=buffer.device)[:, None, None]  # noqa: E731
        cap = as_tensor(capacity)
        kind = torch.arange(2, device=buffer.device)[None, :, None]
        head = torch.arange(heads, device=buffer.device)[None, None, :]
        # row of (token, k/v, head) in layer 0; layer l adds l * 2 * heads * capacity
        self.first = (as_tensor(base) + (kind * heads + head) * cap + as_tensor(position)).flatten()
        self.layer_step = (2 * heads * cap).expand(-1, 2, heads).flatten()

    def write(self, layer: int, split: torch.Tensor) -> None:
        if self.empty:
            return
        if self.token_rows is not None:
            split = split.index_select(0, self.token_rows)
        elif self.span is not None and self.span != (0, split.shape[0]):
            split = split[self.span[0] : self.span[1]]
        rows = self.first + layer * self.layer_step
        new_kv = split[:, 1:].reshape(-1, split.shape[-1]).to(self.rows2d.dtype)
        self.rows2d.index_copy_(0, rows, new_kv)


def causal_mask(n: int, start: int, device: torch.device) -> torch.Tensor | None:
    """Bottom-right causal mask for `n` new queries after `start` cached positions (None when
    no mask is needed: one query sees everything, and `start == 0` uses `is_causal`)."""
    if n == 1 or start == 0:
        return None
    return torch.ones(n, start + n, dtype=torch.bool, device=device).tril(start)
