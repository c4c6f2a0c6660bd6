"""llama.cpp's worst-case compute graph for dense architectures, replayed through ggml's allocator.

The CPU compute buffer is the high-water mark of ggml's graph allocator (``ggml-alloc.c``) over the
worst-case graph llama.cpp reserves (``n_ubatch`` tokens split over the ``n_seq_max`` sequences, so
rounded up to a multiple of them, and ``n_ubatch`` outputs; in the runtime's unified KV pool every
token's mask row and scores span the whole pool). A formula over
"phases" misses it by 10-50 % on small models, because the allocator's best-fit free list leaves
holes that depend on the order and sizes of the tensors. So the graph is rebuilt here, tensor by
tensor with its sizes, exactly as ``src/models/<arch>.cpp`` and ``src/llama-graph.cpp`` build it
(node order by ggml's depth-first ``ggml_build_forward_expand``), and ggml's allocator is replayed
over it: in-place reuse (``ggml_op_can_inplace``), freeing after the last consumer, views keeping
their source alive, best-fit over a sorted free list. Weights and KV cache views live in other
buffers and only order the graph. Checked node by node against graphs traced out of llama.cpp, and
against its reported buffer (to the printed MiB) on every family in tests/memory/test_dense_vs_llama.py.
This reproduces the CPU backend (32-byte alignment, one device holding every layer).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

from . import CacheLayout, ComputeQuery, Hparams, register_compute
from .dense import main_layer_count

__all__ = ["graph_compute"]

_F32 = 4
_ALIGNMENT = 32  # TENSOR_ALIGNMENT of ggml's CPU buffer type
_INPLACE = frozenset(
    {
        "add",
        "add_id",
        "add1",
        "sub",
        "mul",
        "div",
        "sqr",
        "sqrt",
        "log",
        "scale",
        "unary",
        "rope",
        "rms_norm",
        "clamp",
        "soft_max",
        "fill",
    }
)
"""ggml-alloc.c ``ggml_op_can_inplace`` (``unary`` stands for every GGML_OP_UNARY: tanh, gelu, silu...)."""


class _Graph:
    """A ggml graph reduced to what the allocator sees: sizes, sources, views, inputs and outputs."""

    def __init__(self) -> None:
        self.size: list[int] = []
        self.op: list[str] = []
        self.srcs: list[tuple[int, ...]] = []
        self.view_of: list[int] = []
        self.external: list[bool] = []
        self.output: list[bool] = []
        self._visited: set[int] = set()
        self.nodes: list[int] = []
        self.leafs: list[int] = []

    def _new(
        self, op: str, size: int, srcs: tuple[int, ...], view_of: int = -1, external: bool = False
    ) -> int:
        self.size.append(size)
        self.op.append(op)
        self.srcs.append(tuple(s for s in srcs if s >= 0))
        self.view_of.append(view_of)
        self.external.append(external)
        self.output.append(False)
        return len(self.size) - 1

    def input(self, size: int) -> int:
        """An input (``ggml_set_input``): a leaf, allocated before every node."""
        return self._new("none", size, ())

    def add(self, op: str, size: int, *srcs: int) -> int:
        """A node; weights are left out of ``srcs`` (they live in the model's buffers)."""
        return self._new(op, size, srcs)

    def view(self, x: int, op: str = "view") -> int:
        """A view (reshape, permute, view): no memory of its own, keeps its source alive."""
        root = self.view_of[x] if self.view_of[x] >= 0 else x
        return self._new(op, self.size[root], (x,), root, self.external[root])

    def store(self, *srcs: int) -> int:
        """``ggml_set_rows`` into the KV cache: a view of another buffer."""
        return self._new("set_rows", 0, srcs, external=True)

    def nbytes(self, x: int) -> int:
        return self.size[x] if self.view_of[x] < 0 else self.size[self.view_of[x]]

    def expand(self, tensor: int) -> None:
        """ggml.c ``ggml_visit_parents_graph``: depth first, sources left to right, leafs apart."""
        stack = [(tensor, 0)]
        while stack:
            x, i = stack.pop()
            if i == 0:
                if x in self._visited:
                    continue
                self._visited.add(x)
            if i < len(self.srcs[x]):
                stack.append((x, i + 1))
                stack.append((self.srcs[x][i], 0))
            elif self.op[x] == "none":
                self.leafs.append(x)
            else:
                self.nodes.append(x)

    def high_water(self) -> int:
        """ggml-alloc.c ``ggml_gallocr_alloc_graph_impl`` over one ``ggml_dyn_tallocr`` chunk."""
        blocks: list[list[int]] = [[0, 1 << 62]]  # free blocks, sorted by offset; the last one is the end
        high = 0
        n = len(self.size)
        children, views = [0] * n, [0] * n
        own, addr = [False] * n, [-1] * n

        def aligned(size: int) -> int:
            return (size + _ALIGNMENT - 1) // _ALIGNMENT * _ALIGNMENT

        def alloc(size: int) -> int:
            nonlocal high
            size = aligned(size)
            best, best_size = -1, 0
            for i in range(len(blocks) - 1):  # best fit, the later block on ties
                if blocks[i][1] >= size and (best < 0 or blocks[i][1] <= best_size):
                    best, best_size = i, blocks[i][1]
            if best < 0:
                best = len(blocks) - 1
            offset = blocks[best][0]
            blocks[best][0] += size
            blocks[best][1] -= size
            if blocks[best][1] == 0:
                del blocks[best]
            high = max(high, offset + size)
            return offset

        def free(offset: int, size: int) -> None:
            size = aligned(size)
            for i, block in enumerate(blocks):
                if block[0] + block[1] == offset:
                    block[1] += size
                    if i < len(blocks) - 1 and block[0] + block[1] == blocks[i + 1][0]:
                        block[1] += blocks[i + 1][1]
                        del blocks[i + 1]
                    return
                if offset + size == block[0]:
                    block[0] = offset
                    block[1] += size
                    if i > 0 and blocks[i - 1][0] + blocks[i - 1][1] == block[0]:
                        blocks[i - 1][1] += block[1]
                        del blocks[i]
                    return
            position = 0
            while position < len(blocks) and blocks[position][0] < offset:
                position += 1
            blocks.insert(position, [offset, size])

        def allocate(x: int) -> None:
            if self.external[x] or own[x] or self.view_of[x] >= 0 or addr[x] >= 0:
                return
            own[x] = True
            if self.op[x] in _INPLACE:
                # reuse a source's memory: own (never a view: views are not "own"), not an output, same
                # layout, and this node its only consumer
                for p in self.srcs[x]:
                    reusable = own[p] and not self.output[p] and self.size[p] == self.size[x]
                    if reusable and children[p] == 1 and views[p] == 0:
                        addr[x] = addr[p]
                        own[p] = False
                        return
            addr[x] = alloc(self.size[x])

        def release(x: int) -> None:
            if not self.output[x]:
                free(addr[x], self.size[x])
                own[x] = False

        for x in self.leafs:
            allocate(x)
        for x in self.nodes:
            if self.view_of[x] >= 0:
                views[self.view_of[x]] += 1
            for s in self.srcs[x]:
                children[s] += 1
        for x in self.nodes:
            for s in self.srcs[x]:
                allocate(s)
            allocate(x)
            for p in self.srcs[x]:
                children[p] -= 1
                if children[p] or views[p]:
                    continue
                root = self.view_of[p]
                if root >= 0:
                    views[root] -= 1
                    if views[root] == 0 and children[root] == 0 and own[root]:
                        release(root)
                elif own[p]:
                    release(p)
        return high


@dataclass(frozen=True)
class _Shape:
    """What the graph's tensor sizes depend on, per layer of the trunk (``n_layer()``)."""

    n_embd: int
    n_vocab: int
    n_head: tuple[int, ...]
    n_head_kv: tuple[int, ...]
    head_k: tuple[int, ...]
    head_v: tuple[int, ...]
    swa: tuple[bool, ...]
    n_ff: tuple[int, ...]
    n_embd_v_max: int
    """``n_embd_v_gqa_max`` over every layer: the width of a transposed V row."""
    n_expert: int = 0
    n_expert_used: tuple[int, ...] = ()
    n_ff_exp: int = 0


@dataclass(frozen=True)
class _Batch:
    n_tokens: int
    """Tokens of the reserved micro-batch."""
    n_outputs: int
    """Rows the output ids pick (all of them in the reserved graph)."""
    n_kv: int
    n_kv_swa: int
    flash_attention: bool
    with_output: bool
    k_rot: tuple[int, int] = (0, 0)
    """Hadamard matrix sizes for K (base cache, sliding-window cache); 0: none."""
    v_rot: tuple[int, int] = (0, 0)
    pooling: int = 0
    """``build_pooling`` after the head (embedding contexts): 1 mean, 2 cls, 3 last; 0 none."""
    n_seqs: int = 1
    """Sequences of the reserved micro-batch (``n_seqs_unq``): one pooled row each."""


_Inputs = tuple[int, int, int, int, int]  # k_idxs, v_idxs, kq_mask, k_rot, v_rot (-1: none)


class _Builder:
    """``llm_graph_context``'s helpers (src/llama-graph.cpp) over tensor sizes."""

    def __init__(self, shape: _Shape, batch: _Batch) -> None:
        self.g = _Graph()
        self.s = shape
        self.b = batch
        self.T = batch.n_tokens
        self._rows: dict[int, int] = {}  # tensors past the output rows: n_outputs columns, not T

    def f32(self, *ne: int) -> int:
        size = _F32
        for n in ne:
            size *= n
        return size

    def embeddings(self) -> int:
        """``build_inp_embd``: token rows; the vector-embeddings input stays an (unused) leaf."""
        g = self.g
        tokens = g.input(4 * self.T)
        vectors = g.input(self.f32(self.s.n_embd, self.T))
        rows = g.add("get_rows", self.f32(self.s.n_embd, self.T), tokens)
        g.expand(rows)  # ggml_build_forward_select adds both alternatives
        g.expand(vectors)
        return rows

    def _attention_inputs(self, n_kv: int, cache: int) -> _Inputs:
        g, T, b = self.g, self.T, self.b
        k_idxs = g.input(8 * T)
        v_idxs = g.input(
            8 * T if b.flash_attention else 8 * T * self.s.n_embd_v_max
        )  # V transposed: per value
        mask = g.input(n_kv * T * (2 if b.flash_attention else 4))  # f16 with flash attention
        k_rot = g.input(self.f32(b.k_rot[cache], b.k_rot[cache])) if b.k_rot[cache] else -1
        v_rot = g.input(self.f32(b.v_rot[cache], b.v_rot[cache])) if b.v_rot[cache] else -1
        return k_idxs, v_idxs, mask, k_rot, v_rot

    def inputs(self, iswa: bool) -> tuple[int, _Inputs, _Inputs, int]:
        """Positions, the attention inputs of the base (and sliding-window) cache, output ids."""
        pos = self.g.input(4 * self.T)
        base = self._attention_inputs(self.b.n_kv, 0)
        swa = self._attention_inputs(self.b.n_kv_swa, 1) if iswa else base
        out_ids = self.g.input(4 * self.b.n_outputs)
        return pos, base, swa, out_ids

    def norm(self, x: int, rms: bool = True) -> int:
        """``build_norm``: the norm, times its weight (a bias add would be in place)."""
        return self.op("mul", self.op("rms_norm" if rms else "norm", x))

    def _cols(self, x: int) -> int:
        root = self.g.view_of[x] if self.g.view_of[x] >= 0 else x
        return self._rows.get(root, self.T)

    def matmul(self, rows: int, x: int) -> int:
        out = self.g.add("mul_mat", self.f32(rows, self._cols(x)), x)
        if self._cols(x) != self.T:
            self._rows[out] = self._cols(x)
        return out

    def op(self, op: str, x: int, *srcs: int) -> int:
        """An element-wise op of ``x``'s size."""
        out = self.g.add(op, self.g.nbytes(x), x, *srcs)
        if self._cols(x) != self.T:
            self._rows[out] = self._cols(x)
        return out

    def qkv(self, il: int, x: int) -> tuple[int, int, int]:
        """``build_qkv`` (separate projections; their biases are added in place), reshaped to heads."""
        s, g = self.s, self.g
        q = self.matmul(s.head_k[il] * s.n_head[il], x)
        k = self.matmul(s.head_k[il] * s.n_head_kv[il], x)
        v = self.matmul(s.head_v[il] * s.n_head_kv[il], x)
        return g.view(q, "reshape"), g.view(k, "reshape"), g.view(v, "reshape")

    def _hadamard(self, x: int, rot: int) -> int:
        """``llama_mul_mat_hadamard``: rotate a quantized cache's heads."""
        g = self.g
        return g.view(g.add("mul_mat", g.nbytes(x), rot, g.view(x, "reshape")), "reshape")

    def attention(
        self, il: int, q: int, k: int, v: int, inputs: _Inputs, *, iswa: bool, softcap: bool = False
    ) -> int:
        """``build_attn`` (kv or kv_iswa input) with ``build_attn_mha`` and the output projection."""
        g, s, b, T = self.g, self.s, self.b, self.T
        k_idxs, v_idxs, mask, k_rot, v_rot = inputs
        n_head, head_v = s.n_head[il], s.head_v[il]
        n_kv = b.n_kv_swa if s.swa[il] else b.n_kv
        if k_rot >= 0:
            q, k = self._hadamard(q, k_rot), self._hadamard(k, k_rot)
        if v_rot >= 0:
            v = self._hadamard(v, v_rot)
        for t in (q, k, v) if iswa else (q, v, k):  # the order build_attn expands them in
            g.expand(t)
        g.expand(g.store(g.view(k), k_idxs))  # llama_kv_cache::cpy_k
        if b.flash_attention:
            g.expand(g.store(g.view(v), v_idxs))
        else:  # cpy_v into the transposed cache, rows padded to the widest (TAG_V_CACHE_VARIABLE)
            row = g.view(v, "reshape")
            if head_v * s.n_head_kv[il] < s.n_embd_v_max:
                row = g.add("pad", self.f32(s.n_embd_v_max, T), row)
            g.expand(g.store(g.view(row, "reshape"), v_idxs))
        q = g.view(g.view(q), "permute")
        if b.flash_attention:
            cur = g.view(g.add("flash_attn_ext", self.f32(head_v, n_head, T), q, mask), "reshape")
        else:
            kq = g.add("mul_mat", self.f32(n_kv, T, n_head), q)
            if softcap:  # attn_soft_cap: scale, tanh, scale
                kq = self.op("scale", self.op("unary", self.op("scale", kq)))
            kq = self.op("soft_max", kq, mask)
            kqv = g.add("mul_mat", self.f32(head_v, T, n_head), kq)
            cur = g.add("cont", self.f32(head_v * n_head, T), g.view(kqv, "permute"))
        g.expand(cur)
        if v_rot >= 0:
            cur = self._hadamard(cur, v_rot)
        return self.matmul(s.n_embd, cur)

    def ffn(self, x: int, n_ff: int) -> int:
        """``build_ffn`` with a parallel gate: up, gate, swiglu/geglu split, down."""
        up = self.matmul(n_ff, x)
        gate = self.matmul(n_ff, x)
        return self.matmul(self.s.n_embd, self.op("glu", gate, up))

    def moe(self, il: int, x: int, *, softmax_weight: bool = False, norm_w: bool = False) -> int:
        """``build_moe_ffn``: router, top-k, the selected experts' weights, their FFNs, the sum."""
        g, s, T = self.g, self.s, self._cols(x)
        n_used, n_ff = s.n_expert_used[il], s.n_ff_exp
        probs = g.add("mul_mat", self.f32(s.n_expert, T), x)
        if not softmax_weight:
            probs = g.add("soft_max", g.size[probs], probs)
        selected = g.view(g.add("argsort", 4 * s.n_expert * T, probs))  # ggml_argsort_top_k
        weights = g.add("get_rows", self.f32(n_used, T), g.view(probs, "reshape"), selected)
        if softmax_weight:
            weights = g.view(g.add("soft_max", self.f32(n_used, T), g.view(weights, "reshape")), "reshape")
        if norm_w:
            rows = g.view(weights, "reshape")
            total = g.add("clamp", self.f32(1, T), g.add("sum_rows", self.f32(1, T), rows))
            weights = g.view(g.add("div", self.f32(n_used, T), rows, total), "reshape")
        g.expand(weights)
        cur = g.view(x, "reshape")
        up = g.add("mul_mat_id", self.f32(n_ff, n_used, T), cur, selected)
        gate = g.add("mul_mat_id", self.f32(n_ff, n_used, T), cur, selected)
        act = g.add("glu", g.nbytes(gate), gate, up)
        experts = g.add("mul_mat_id", self.f32(s.n_embd, n_used, T), act, selected)
        experts = g.add("mul", g.size[experts], experts, weights)
        g.expand(experts)
        views = [g.view(experts) for _ in range(n_used)]
        for view in views:
            g.expand(view)
        out = views[0]
        for view in views[1:]:
            out = g.add("add", self.f32(s.n_embd, T), out, view)
            g.expand(out)
        if n_used == 1:
            out = g.add("cont", self.f32(s.n_embd, T), out)
        if T != self.T:
            self._rows[out] = T
        return out

    def rows(self, x: int, out_ids: int) -> int:
        """``ggml_get_rows`` with the output ids: ``n_outputs`` rows of ``x``."""
        n_out = self.b.n_outputs
        out = self.g.add("get_rows", self.g.nbytes(x) // self._cols(x) * n_out, x, out_ids)
        if n_out != self.T:
            self._rows[out] = n_out
        return out

    def head(self, x: int, rms: bool = True) -> int:
        """Output norm and logits (both graph outputs, never freed); then the allocator's replay."""
        g = self.g
        cur = embd = self.norm(x, rms)
        g.output[cur] = True
        if self.b.with_output:
            cur = self.matmul(self.s.n_vocab, cur)  # soft-capping or a logit scale would be in place
            g.output[cur] = True
        g.expand(cur)
        if self.b.pooling and self.b.with_output:
            g.expand(self.pool(embd))
        return g.high_water()

    def pool(self, embd: int) -> int:
        """``llm_graph_context::build_pooling`` over the head's ``t_embd`` (its normed rows; the
        logits stay in the graph): mean multiplies the transposed rows by an ``n_tokens x n_seqs``
        input, cls and last pick one row per sequence. The pooled rows are a graph output."""
        g, n_embd, n_seqs = self.g, self.s.n_embd, self.b.n_seqs
        if self.b.pooling == 1:
            rows = g.add("cont", self.f32(self._cols(embd), n_embd), g.view(embd, "transpose"))
            mean = g.input(self.f32(self.T, n_seqs))
            pooled = g.add("mul_mat", self.f32(n_embd, n_seqs), rows, mean)
        else:
            pooled = g.add("get_rows", self.f32(n_embd, n_seqs), embd, g.input(4 * n_seqs))
        g.output[pooled] = True
        return pooled


def _graph_llama(s: _Shape, batch: _Batch, *, qk_norm: bool = False) -> int:
    """src/models/llama.cpp (mixtral: experts with normalised softmax weights), qwen2.cpp (the Q/K/V
    biases are added in place: same allocation) and qwen3.cpp / qwen3moe.cpp (Q and K norms)."""
    b = _Builder(s, batch)
    inp = b.embeddings()
    pos, cache, _, out_ids = b.inputs(False)
    n_layer = len(s.n_head)
    for il in range(n_layer):
        residual = inp
        q, k, v = b.qkv(il, b.norm(inp))
        if qk_norm:
            q, k = b.norm(q), b.norm(k)
        cur = b.attention(il, b.op("rope", q, pos), b.op("rope", k, pos), v, cache, iswa=False)
        if il == n_layer - 1:
            cur, residual = b.rows(cur, out_ids), b.rows(residual, out_ids)
        ffn_inp = b.op("add", cur, residual)
        cur = b.norm(ffn_inp)
        cur = b.moe(il, cur, norm_w=True) if s.n_expert else b.ffn(cur, s.n_ff[il])
        inp = b.op("add", cur, ffn_inp)
    return b.head(inp)


def _graph_deci(s: _Shape, batch: _Batch) -> int:
    """src/models/deci.cpp: layers without heads skip attention, layers without KV heads project only
    (``wo``), layers without a feed-forward are dropped."""
    b = _Builder(s, batch)
    inp = b.embeddings()
    pos, cache, _, out_ids = b.inputs(False)
    n_layer = len(s.n_head)
    for il in range(n_layer):
        residual = inp
        cur = b.norm(inp) if s.n_head[il] else inp
        if s.n_head[il] and not s.n_head_kv[il]:
            cur = b.matmul(s.n_embd, cur)
        elif s.n_head[il]:
            q, k, v = b.qkv(il, cur)
            cur = b.attention(il, b.op("rope", q, pos), b.op("rope", k, pos), v, cache, iswa=False)
        if il == n_layer - 1:
            cur, residual = b.rows(cur, out_ids), b.rows(residual, out_ids)
        if s.n_ff[il] == 0:
            continue
        ffn_inp = b.op("add", cur, residual) if s.n_head[il] else cur
        inp = b.op("add", b.ffn(b.norm(ffn_inp), s.n_ff[il]), ffn_inp)
    return b.head(inp)


def _graph_gemma(s: _Shape, batch: _Batch, *, gemma2: bool) -> int:
    """src/models/gemma2.cpp, gemma3.cpp: scaled embeddings, Q scaled after RoPE (gemma3: Q/K norms
    before it), post-attention and post-FFN norms, GELU gate; gemma2 soft-caps the scores."""
    b = _Builder(s, batch)
    iswa = any(s.swa)
    inp = b.op("scale", b.embeddings())
    pos, base, swa, out_ids = b.inputs(iswa)
    n_layer = len(s.n_head)
    for il in range(n_layer):
        q, k, v = b.qkv(il, b.norm(inp))
        if not gemma2:
            q, k = b.norm(q), b.norm(k)
        q = b.op("scale", b.op("rope", q, pos))
        cur = b.attention(
            il, q, b.op("rope", k, pos), v, swa if s.swa[il] else base, iswa=iswa, softcap=gemma2
        )
        if il == n_layer - 1:
            cur, inp = b.rows(cur, out_ids), b.rows(inp, out_ids)
        sa_out = b.op("add", b.norm(cur), inp)
        inp = b.op("add", b.norm(b.ffn(b.norm(sa_out), s.n_ff[il])), sa_out)
    return b.head(inp)


def _graph_cohere2(s: _Shape, batch: _Batch) -> int:
    """src/models/cohere2.cpp: layer norm; attention (RoPE on sliding layers only) and FFN side by
    side on the same normed input, both added to the residual."""
    b = _Builder(s, batch)
    inp = b.embeddings()
    pos, base, swa, out_ids = b.inputs(True)
    n_layer = len(s.n_head)
    for il in range(n_layer):
        normed = b.norm(inp, rms=False)
        q, k, v = b.qkv(il, normed)
        if s.swa[il]:
            q, k = b.op("rope", q, pos), b.op("rope", k, pos)
        cur = b.attention(il, q, k, v, swa if s.swa[il] else base, iswa=True)
        if il == n_layer - 1:
            cur, inp, normed = b.rows(cur, out_ids), b.rows(inp, out_ids), b.rows(normed, out_ids)
        inp = b.op("add", b.op("add", b.ffn(normed, s.n_ff[il]), inp), cur)
    return b.head(inp, rms=False)


def _graph_gpt_oss(s: _Shape, batch: _Batch) -> int:
    """src/models/openai-moe.cpp: biased projections (in place), attention sinks (a weight), sliding
    layers, softmax-weighted experts (their biases in place); output rows picked after the layers."""
    b = _Builder(s, batch)
    inp = b.embeddings()
    pos, base, swa, out_ids = b.inputs(True)
    for il in range(len(s.n_head)):
        q, k, v = b.qkv(il, b.norm(inp))
        cur = b.attention(
            il, b.op("rope", q, pos), b.op("rope", k, pos), v, swa if s.swa[il] else base, iswa=True
        )
        ffn_inp = b.op("add", cur, inp)
        inp = b.op("add", b.moe(il, b.norm(ffn_inp), softmax_weight=True), ffn_inp)
    return b.head(b.rows(inp, out_ids))


_GRAPHS: dict[str, Callable[[_Shape, _Batch], int]] = {
    "llama": _graph_llama,
    "qwen2": _graph_llama,
    "qwen3": lambda s, batch: _graph_llama(s, batch, qk_norm=True),
    "qwen3moe": lambda s, batch: _graph_llama(s, batch, qk_norm=True),
    "deci": _graph_deci,
    "gemma2": lambda s, batch: _graph_gemma(s, batch, gemma2=True),
    "gemma3": lambda s, batch: _graph_gemma(s, batch, gemma2=False),
    "cohere2": _graph_cohere2,
    "gpt-oss": _graph_gpt_oss,
}


def _rotation(quantized: bool, heads: list[int], block: int) -> int:
    """Size of the Hadamard matrix a quantized cache rotates its heads with, 0 for none.

    llama_kv_cache's constructor: ``attn_rot_k`` needs one head size over the cache's layers and a
    multiple of 64 (``build_input_k_rot``: the largest power of two from 64 that divides it);
    ``attn_rot_v`` the same with a fixed 64 (``block`` 0: the largest power of two).
    """
    if not quantized or not heads or len(set(heads)) != 1 or heads[0] % 64:
        return 0
    if block:
        return block
    size = 64
    while heads[0] % (size * 2) == 0:
        size *= 2
    return size


@functools.lru_cache(maxsize=256)
def _replay(arch: str, shape: _Shape, batch: _Batch) -> int:
    return _GRAPHS[arch](shape, batch)


def graph_compute(hp: Hparams, layout: CacheLayout, q: ComputeQuery) -> int:
    """The CPU compute buffer of llama.cpp's worst-case graph for ``hp.arch``, by replaying it.

    The trunk is ``n_layer()`` layers (NextN layers are not in the graph). Quantized K/V caches
    rotate heads with Hadamard matrices (inputs and matmuls of their own): the cache types come from
    ``q.type_k`` / ``q.type_v`` when the query has them.
    """
    n_layer = main_layer_count(hp)
    n_layer_all = hp.n_layer
    n_head = hp.per_layer("attention.head_count", n_layer_all)
    n_head_kv = hp.per_layer("attention.head_count_kv", n_layer_all, n_head)
    trunk = layout.layers[:n_layer]
    n_expert = int(hp.get("expert_count", 0))
    n_ff = hp.per_layer("feed_forward_length", n_layer_all)
    n_ff_exp = int(hp.get("expert_feed_forward_length", 0))
    used = hp.per_layer("expert_used_count", n_layer_all) if n_expert else [0] * n_layer_all
    if n_expert and not n_ff_exp:
        # llama (mixtral) sizes its experts by feed_forward_length; qwen3moe by n_ff / n_expert_used
        n_ff_exp = n_ff[0] if hp.arch in ("llama", "deci") else n_ff[0] // max(1, max(used))
    shape = _Shape(
        n_embd=hp.n_embd,
        n_vocab=q.n_vocab,
        n_head=tuple(n_head[:n_layer]),
        n_head_kv=tuple(n_head_kv[:n_layer]),
        head_k=tuple(layer.head_k for layer in trunk),
        head_v=tuple(layer.head_v for layer in trunk),
        swa=tuple(layer.swa for layer in trunk),
        n_ff=tuple(n_ff[:n_layer]),
        n_embd_v_max=max((layer.v_elements for layer in layout.layers), default=0),
        n_expert=n_expert,
        n_expert_used=tuple(used[:n_layer]),
        n_ff_exp=n_ff_exp,
    )
    quantized_k = str(q.type_k) in ("q8_0", "q4_0")
    quantized_v = str(q.type_v) in ("q8_0", "q4_0")
    caches = (False, True) if layout.has_swa else (False,)
    k_rot = [
        _rotation(quantized_k, [x.head_k for x in trunk if x.in_kv_cache and x.swa == c], 0) for c in caches
    ]
    v_rot = [
        _rotation(quantized_v, [x.head_v for x in trunk if x.in_kv_cache and x.swa == c], 64) for c in caches
    ]
    # graph_reserve splits the micro-batch evenly over the n_seq_max sequence ids, rounding its tokens
    # up (q.n_tokens); the output rows stay n_ubatch (q.n_outputs). With one unified KV stream that
    # is all the sequence count changes: the masks and KQ span n_kv (the whole pool) for all tokens,
    # the same elements as n_kv per stream times the streams without it
    batch = _Batch(
        n_tokens=q.n_tokens,
        n_outputs=q.n_outputs,
        n_kv=q.n_kv,
        n_kv_swa=q.n_kv_swa,
        flash_attention=q.flash_attention,
        with_output=q.with_output,
        k_rot=(k_rot[0], k_rot[-1]),
        v_rot=(v_rot[0], v_rot[-1]),
        pooling=q.pooling,
        n_seqs=max(q.n_seqs, 1) if q.pooling else 1,
    )
    return _replay(hp.arch, shape, batch)


# every architecture whose graph is transcribed above
register_compute("llama", "deci", "qwen2", "qwen3", "qwen3moe", "gemma2", "gemma3", "cohere2", "gpt-oss")(
    graph_compute
)
