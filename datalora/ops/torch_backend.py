"""The ``torch`` backend: MoLoRA forward/backward in torch ops, two strategies.

``grouped`` (CPU, fp32 / fp64, where :func:`choose_strategy` expects it to be faster: large
calls with many experts per route, single-token forwards): the routes sorted
by expert (once per routing where its tables are cached), each expert's two GEMMs run on
its routed tokens only (rows gathered, outputs added back with ``index_add_``), so ``k/E``
of the dense arithmetic; the backward likewise, dA and dB per expert. It loops over the
experts that have routes, whose counts it reads on the host.

``dense`` (everywhere else; always on a GPU, where reading the counts would be a sync),
"shrink all, then mask": one GEMM ``H = x @ A_all^T`` with N = E*r computes
every expert's projection while reading x once; multiplying by a dense gate matrix
``G [T, E*r]`` (``G[t, e*r+i] = scaling * sum_j [e_tj == e] gates[t,j] * rank_scale[t,i]``,
zero for unrouted experts, so a token routed twice to one expert adds both gates) gives
the gated buffer ``Zd = H * G``, expanded with one GEMM against ``B_all^T`` (``B_all
[d_out, E*r]``, ``B_all[o, e*r+i] = B[e, o, i]``: a view of an expert-minor B, see
:mod:`datalora.ops.layout`) into the base GEMM's output for ``molora_linear``. The backward
is dense too: ``dH = (dy @ B_all) * G`` feeds ``dx`` and ``dA``; ``dB_all = dy^T @ Zd``; only
the gate and rank-scale gradients gather the ``k*r`` routed columns.
Scaling is folded into ``G``. At d = 4096 the six LoRA GEMMs (two forward, four backward)
cost a few percent of the base linear; on small layers (E*r close to d) they cost about as
much as it, and the fixed cost of each extra op matters: a forward is 3 GEMMs and 2 other
ops (gather ``h``, ``H *= G``), a full backward 4 GEMMs and 9; a B not stored expert-minor
adds a copy of B to each and one of dB to the backward.

The dense ``dA`` GEMM sums over every token for every expert: a token whose x holds
NaN / inf makes every expert's ``dA`` non-finite (``0 * inf``), as the Triton backend's
dense strategy does, where the grouped strategies and a per-expert loop spoil only its
routed experts' (outputs, dx and the other tokens' gradients stay clean on every backend).
Likewise an expert whose A or B holds NaN / inf (a diverged expert) makes every token's
output non-finite in the dense strategies, not only its routed tokens' as in the grouped
ones and a per-expert loop.

``G``, the route column index and the expert sort depend only on the routing
(``expert_ids``, ``gates``, ``rank_scale``), which every layer sharing one ``Routing``
passes as the same tensor objects: :func:`routing_tables` builds them once and reuses
them while those tensors are unmodified (identity + version counters, as
``triton_backend.permutation`` caches its sort; two routings, a pruned model's full-length
and packed ones, only for calls from eager Python: see :mod:`datalora.ops.eager`).

This module doubles as the reference implementation of the backend protocol
(see ``datalora.ops.backends``): ``delta_forward`` returns the un-scaled per-route
projections ``h [T, k, r]`` that ``delta_backward`` needs.
"""

from __future__ import annotations

import functools

import torch

from datalora.ops.backends import forced_strategy
from datalora.ops.cpu_costs import grouped_is_cheaper
from datalora.ops.eager import RoutingCache, cache_sources, may_cache_routing
from datalora.ops.layout import expert_columns, expert_columns_grad, expert_rows
from datalora.reference import gather_tokens_reference, scatter_tokens_reference

GROUPED_DTYPES = (torch.float32, torch.float64)


def choose_strategy(x: torch.Tensor, d_out: int, tables: RoutingTables,
                    backward: bool = False) -> str:
    """``"dense"`` or ``"grouped"`` for a call on x ``[T, d_in]``.

    ``dense`` computes every expert in one GEMM over all ``E*r`` columns (no sort, few
    ops; ``E/k`` times the routed arithmetic), ``grouped`` runs each expert's two GEMMs on
    its routed tokens only (a sort of the routes, once per routing where the routing's
    tables are cached, see :func:`routing_tables`, else per call; a loop over the experts
    with routes, their counts read on the host). Grouped runs on the CPU only, for fp32 /
    fp64 (in 16-bit it would round each route's output before adding it), where
    :func:`grouped_is_cheaper` expects it to be faster with this CPU vendor's constants (in
    the measured grids: many experts per route or a large rank on large calls, most
    single-token calls);
    ``DATALORA_SHRINK_STRATEGY`` (``dense`` / ``grouped``) overrides the choice there.
    Elsewhere (CUDA, where the counts would cost a host sync) it is always dense. The
    counts are read only when the pick depends on them (how many experts have routes).
    """
    forced = forced_strategy()  # a bad value is an error everywhere
    if x.device.type != "cpu" or x.dtype not in GROUPED_DTYPES:
        return "dense"
    if forced:
        return forced
    key = (x.shape[1], d_out, backward)  # T, E, r, k: the routing's, fixed per tables
    pick = tables.picks.get(key)
    if pick is None:
        pick = tables.picks[key] = _cheaper_strategy(x.shape[0], x.shape[1], d_out, tables,
                                                     backward)
    return pick


def _cheaper_strategy(T: int, d_in: int, d_out: int, tables: RoutingTables,
                      backward: bool) -> str:
    """:func:`grouped_is_cheaper`'s pick for this routing (its counts read only when the
    pick depends on them)."""
    E, r, k = tables.E, tables.r, tables.ids.shape[1]
    # the costs are linear in the experts hit: compare at its bounds before counting
    bounds = {min(1, T * k), min(E, T * k)}
    picks = {grouped_is_cheaper(T, d_in, d_out, E, r, k, hit, backward) for hit in bounds}
    if len(picks) == 2:
        hit = sum(1 for c in tables.counts if c)
        picks = {grouped_is_cheaper(T, d_in, d_out, E, r, k, hit, backward)}
    return "grouped" if picks.pop() else "dense"


def _route_index(ids: torch.Tensor, r: int) -> torch.Tensor:
    """Column indices ``[T, k*r]`` of each routed expert's rank slice in ``[T, E*r]``
    (``ids [T, k]`` int64)."""
    T, k = ids.shape
    offsets = torch.arange(r, device=ids.device)
    # reshape, not view: elementwise ops keep the strides of a transposed ``ids``
    return (ids[..., None] * r + offsets).reshape(T, k * r)


def _gate_matrix(ids, gate_scale, rank_scale, E, r, dtype):
    """Dense ``G [T, E*r]`` (``ids [T, k]`` int64; ``gate_scale [T, k]`` = gates * scaling
    and ``rank_scale [T, r]`` in at least fp32) in ``dtype``, fp32 for fp16 (a gate times
    ``scaling`` may pass 65504 where ``H * G`` does not; the in-place ``H *= G`` computes in
    fp32 and rounds once), accumulated in at least fp32: repeated experts of one token add
    their gates."""
    T = ids.shape[0]
    per_expert = torch.zeros(T, E, dtype=gate_scale.dtype, device=gate_scale.device)
    per_expert.scatter_add_(1, ids, gate_scale)
    if rank_scale is None:
        G = per_expert[:, :, None].expand(T, E, r)
    else:
        G = per_expert[:, :, None] * rank_scale[:, None, :]
    return G.reshape(T, E * r).to(gate_scale.dtype if dtype == torch.float16 else dtype)


class ExpertGroups:
    """The routes of one routing sorted by expert, for the grouped strategy.

    ``order [T*k]`` int64: the flat route indices ``t*k + j`` sorted by expert (stable);
    ``tokens [T*k]``: the token of each sorted route; ``scale [T*k, 1]`` (``[T*k, r]`` with
    a rank scale): ``scaling * gate`` (``* rank_scale[t]``) of each sorted route, in the
    layers' dtype; ``segments``: ``(e, start, stop)`` of every expert with routes, its
    slice of the sorted routes.
    """

    def __init__(self, ids, gate_scale, rank_scale, counts, dtype):
        self.k = k = ids.shape[1]
        self.order = torch.argsort(ids.reshape(-1), stable=True)
        self.tokens = self.order.div(k, rounding_mode="floor")
        scale = gate_scale.reshape(-1)[self.order][:, None]
        if rank_scale is not None:
            scale = scale * rank_scale[self.tokens]
        self.scale = scale.to(dtype)
        self.segments = []
        start = 0
        for e, count in enumerate(counts):
            if count:
                self.segments.append((e, start, start + count))
            start += count


class RoutingTables:
    """Per-routing tables shared by every layer, each built on first use; ``gate_matrix``
    and ``groups.scale`` in the dtype of the layers' x (``gate_matrix`` in fp32 for fp16 x:
    see :func:`_gate_matrix`).

    The dense strategy's (forward): ``index [T, k*r]`` int64, the column ``e_tj*r + i`` of
    route j's rank slice in ``[T, E*r]``, and ``gate_matrix [T, E*r]``, the dense ``G`` of
    the module docstring (``scaling`` included); ``routed_gates`` (backward). The grouped
    strategy's: ``counts`` (routes per expert, a host list) and ``groups``
    (:class:`ExpertGroups`). ``picks``: :func:`choose_strategy`'s cost-model picks so far,
    by ``(d_in, d_out, backward)``. Expert ids are clamped to ``[0, E)`` as the kernels do, so
    unchecked ids (``check_values=False``) never index out of bounds. The routing's values
    are copied in (``ids``, ``gate_scale [T, k]`` = gates * scaling in at least fp32, the
    rank scale), so the tables keep no caller tensor alive.
    """

    def __init__(self, expert_ids, gates, rank_scale, E, r, scaling, dtype):
        self.E, self.r, self.dtype = E, r, dtype
        self.picks: dict[tuple[int, int, bool], str] = {}  # choose_strategy's, per layer shape
        self.ids = expert_ids.long().clamp(0, E - 1)
        acc = torch.promote_types(dtype, torch.float32)
        self.gate_scale = gates.to(acc) * scaling
        self.rank_scale = None if rank_scale is None else rank_scale.to(acc, copy=True)

    @functools.cached_property
    def index(self) -> torch.Tensor:
        return _route_index(self.ids, self.r)

    @functools.cached_property
    def gate_matrix(self) -> torch.Tensor:
        return _gate_matrix(self.ids, self.gate_scale, self.rank_scale, self.E, self.r,
                            self.dtype)

    @functools.cached_property
    def unrouted(self) -> torch.Tensor:
        """``[T, E*r]`` bool, the columns ``G`` zeroes (fp16 only: see :func:`_gate`)."""
        return self.gate_matrix == 0

    @functools.cached_property
    def routed_gates(self) -> torch.Tensor:
        """``[T, k*r]`` the routed columns of ``G`` (``G`` gathered at ``index``)."""
        return self.gate_matrix.gather(1, self.index)

    @functools.cached_property
    def counts(self) -> list[int]:
        """Routes per expert (read back to the host: CPU tensors only)."""
        return torch.bincount(self.ids.reshape(-1), minlength=self.E).tolist()

    @functools.cached_property
    def groups(self) -> ExpertGroups:
        return ExpertGroups(self.ids, self.gate_scale, self.rank_scale, self.counts,
                            self.dtype)


_tables_cache = RoutingCache()


def routing_tables(expert_ids, gates, rank_scale, E, r, scaling, dtype) -> RoutingTables:
    """:class:`RoutingTables` of a routing, reused while the same unmodified tensors come back.

    Two entries (:class:`~datalora.ops.eager.RoutingCache`: identity and version of the three
    tensors, or of the routing a layer cast them from, plus ``(E, r, scaling, dtype)`` and
    their dtypes), only where
    :func:`~datalora.ops.eager.may_cache_routing` allows: layers sharing a ``Routing`` hit
    it in the forward and again in the backward.
    """
    routing = (expert_ids, gates, rank_scale)
    if not may_cache_routing(*routing):
        return RoutingTables(*routing, E, r, scaling, dtype)
    # keyed by the casts' sources: the layers casting one shared routing to their dtype
    sources = cache_sources(*routing)
    key = (E, r, scaling, dtype, gates.dtype, None if rank_scale is None else rank_scale.dtype)
    tables = _tables_cache.get(sources, key)
    if tables is None:
        tables = RoutingTables(*routing, E, r, scaling, dtype)
        _tables_cache.put(sources, key, tables)
    return tables


def _gate(H: torch.Tensor, tables: RoutingTables) -> torch.Tensor:
    """``H * G`` in place. In fp16 an unrouted expert's column may overflow to inf (its
    weights are never trained down on those tokens) and ``inf * 0`` is NaN, which the
    expand would spread to every output column: those columns are zeroed by mask."""
    H.mul_(tables.gate_matrix)
    return H.masked_fill_(tables.unrouted, 0) if H.dtype == torch.float16 else H


def _shrink(x, A, expert_ids, tables, need_h):
    """``(h, Zd)``: per-route ``h = A[e] @ x`` ``[T, k, r]`` (None unless ``need_h``) and the
    gated ``Zd = H * G`` ``[T, E*r]``."""
    H = torch.mm(x, expert_rows(A).T)  # [T, E*r]: every expert at once, reading x once
    h = (H.gather(1, tables.index).view(expert_ids.shape[0], expert_ids.shape[1], A.shape[1])
         if need_h else None)
    return h, _gate(H, tables)


def delta_composite(x, A, B, expert_ids, gates, rank_scale, scaling):
    """``delta [T, d_out]`` with the forward's math in out-of-place torch ops and no
    custom autograd: torch.func transforms (``grad``, ``vmap``, ``jacrev``, ``jvp``) and
    forward-mode AD differentiate it like any torch code. ``G`` as :func:`_gate_matrix`
    (a one-hot comparison instead of an in-place scatter), no routing cache."""
    E, r, _ = A.shape
    acc = torch.promote_types(x.dtype, torch.float32)
    ids = expert_ids.long().clamp(0, E - 1)
    onehot = (ids[..., None] == torch.arange(E, device=ids.device)).to(acc)  # [T, k, E]
    per_expert = (onehot * gates.to(acc)[..., None]).sum(-2) * scaling      # [T, E]
    G = (per_expert[..., None].expand(*per_expert.shape, r) if rank_scale is None
         else per_expert[..., None] * rank_scale.to(acc)[..., None, :])
    H = x @ expert_rows(A).T                                                    # [T, E*r]
    if x.dtype != torch.float16:
        Zd = H * G.reshape(*G.shape[:-2], E * r).to(x.dtype)
    else:  # G in fp32 (see _gate_matrix), unrouted columns masked (see _gate)
        G = G.reshape(*G.shape[:-2], E * r)
        Zd = torch.where(G == 0, 0, H * G).to(x.dtype)
    return Zd @ expert_columns(B).T


def _grouped_lora_into(y, x, A, B, groups, need_h):
    """``y += delta`` per expert over its routed tokens (the grouped strategy); returns
    ``h [T, k, r]`` (None unless ``need_h``)."""
    T, k, r = x.shape[0], groups.k, A.shape[1]
    h = x.new_empty(T * k, r) if need_h else None
    for e, start, stop in groups.segments:
        tokens = groups.tokens[start:stop]
        z = torch.mm(x.index_select(0, tokens), A[e].T)  # [n_e, r]
        if need_h:
            h.index_copy_(0, groups.order[start:stop], z)
        y.index_add_(0, tokens, torch.mm(z.mul_(groups.scale[start:stop]), B[e].T))
    return None if h is None else h.view(T, k, r)


def delta_forward(x, A, B, expert_ids, gates, rank_scale, scaling, need_h=True,
                  strategy=None):
    """Returns ``(delta [T, d_out], h [T, k, r])`` with ``h = A[e] @ x`` per route
    (``h`` is None when not ``need_h``: a forward without autograd). ``strategy`` forces
    ``"dense"`` or ``"grouped"`` (default: :func:`choose_strategy`)."""
    E, r, _ = A.shape
    tables = routing_tables(expert_ids, gates, rank_scale, E, r, scaling, x.dtype)
    if (strategy or choose_strategy(x, B.shape[1], tables)) == "grouped":
        delta = x.new_zeros(x.shape[0], B.shape[1])
        return delta, _grouped_lora_into(delta, x, A, B, tables.groups, need_h)
    h, Zd = _shrink(x, A, expert_ids, tables, need_h)
    return torch.mm(Zd, expert_columns(B).T), h


def linear_forward(x, weight, bias, A, B, expert_ids, gates, rank_scale, scaling, need_h=True,
                   strategy=None):
    """``(y, h)``: ``y = x W^T + b + delta`` accumulated in one ``[T, d_out]`` buffer."""
    E, r, _ = A.shape
    tables = routing_tables(expert_ids, gates, rank_scale, E, r, scaling, x.dtype)
    y = torch.mm(x, weight.T) if bias is None else torch.addmm(bias, x, weight.T)
    if (strategy or choose_strategy(x, B.shape[1], tables)) == "grouped":
        return y, _grouped_lora_into(y, x, A, B, tables.groups, need_h)
    h, Zd = _shrink(x, A, expert_ids, tables, need_h)
    return y.addmm_(Zd, expert_columns(B).T), h


def _gate_grads(q, gates, rank_scale, need_g, need_rs):
    """``(dgates [T, k], drank_scale [T, r])`` (None where not needed) from
    ``q = scaling * dz * h`` per route ``[T, k, r]`` in at least fp32."""
    T, k, r = q.shape
    dgates = drs = None
    if need_g:
        dgates = (q.sum(-1) if rank_scale is None
                  else torch.bmm(q, rank_scale.to(q.dtype)[:, :, None]).view(T, k))
        dgates = dgates.to(gates.dtype)
    if need_rs:
        drs = torch.bmm(gates.to(q.dtype)[:, None, :], q).view(T, r).to(rank_scale.dtype)
    return dgates, drs


def _routing_grads(dZ, h, tables, gates, rank_scale, scaling, need_g, need_rs):
    """:func:`_gate_grads` from the un-gated ``dZ = dy @ B_all^T`` ``[T, E*r]`` and
    ``h [T, k, r]``."""
    T, k, r = h.shape
    # dz * h per route, in at least fp32: each product may overflow fp16 where the sum
    # into the (fp32) gate gradient does not
    acc = torch.promote_types(h.dtype, torch.float32)
    q = dZ.gather(1, tables.index).view(T, k, r).to(acc).mul_(h).mul_(scaling)
    return _gate_grads(q, gates, rank_scale, need_g, need_rs)


def _dense_h(h, tables, E):
    """``Zd = H * G`` ``[T, E*r]`` rebuilt from the routed ``h [T, k, r]`` (unrouted columns
    are zero; a repeated expert writes the same value twice)."""
    T, k, r = h.shape
    z = (h.view(T, k * r) * tables.routed_gates).to(h.dtype)
    return h.new_zeros(T, E * r).scatter_(1, tables.index, z)


def _grouped_backward(grad, x, A, B, gates, rank_scale, h, scaling, needs, dx_out, tables):
    """:func:`delta_backward` per expert over its routed tokens (the grouped strategy):
    each expert's rows of ``dy`` (and of x for dA) are gathered once; dA and dB of an
    expert without routes are zero."""
    need_x, need_A, need_B, need_g, need_rs = needs
    T, k, r = h.shape
    groups = tables.groups
    hs = h.reshape(T * k, r).index_select(0, groups.order)  # un-gated, sorted by expert
    dx = (dx_out if dx_out is not None or not need_x else x.new_zeros(x.shape))
    dA = A.new_empty(A.shape) if need_A else None
    dB = torch.empty_like(B) if need_B else None  # B's strides, as expert_columns_grad's
    idle = [e for e, count in enumerate(tables.counts) if not count]
    for grad_of_weight in (dA, dB):
        if grad_of_weight is not None and idle:
            grad_of_weight[idle] = 0
    q = hs.new_empty(T * k, r) if need_g or need_rs else None
    for e, start, stop in groups.segments:
        tokens, scale = groups.tokens[start:stop], groups.scale[start:stop]
        dy = grad.index_select(0, tokens)  # [n_e, d_out]
        if need_B:  # [r, n_e] @ [n_e, d_out]: the fast operand order, transposed into dB
            dB[e].copy_(torch.mm((hs[start:stop] * scale).T, dy).T)
        if not (need_x or need_A or q is not None):
            continue
        dz = torch.mm(dy, B[e])  # [n_e, r], un-gated
        if q is not None:
            torch.mul(dz, hs[start:stop], out=q[start:stop])
        dh = dz.mul_(scale)
        if need_A:
            torch.mm(dh.T, x.index_select(0, tokens), out=dA[e])
        if need_x:
            dx.index_add_(0, tokens, torch.mm(dh, A[e]))
    dgates = drs = None
    if q is not None:
        acc = torch.promote_types(h.dtype, torch.float32)
        q = q.new_empty(q.shape).index_copy_(0, groups.order, q).view(T, k, r)
        dgates, drs = _gate_grads(q.to(acc).mul_(scaling), gates, rank_scale, need_g,
                                  need_rs)
    return dx, dA, dB, dgates, drs


def delta_backward(grad, x, A, B, expert_ids, gates, rank_scale, h, scaling, needs,
                   dx_out=None, strategy=None):
    """Gradients ``(dx, dA, dB, dgates, drank_scale)``; entries not in ``needs`` are None.

    ``needs`` is a 5-tuple of bools in that order. ``dx_out`` ``[T, d_in]``: dx is added
    into it in place (one strided GEMM instead of a new buffer plus an add).
    """
    E, r, d_in = A.shape
    need_x, need_A, need_B, need_g, need_rs = needs
    tables = routing_tables(expert_ids, gates, rank_scale, E, r, scaling, x.dtype)
    grad = grad.to(x.dtype)
    if (strategy or choose_strategy(x, B.shape[1], tables, backward=True)) == "grouped":
        dx, dA, dB, dgates, drs = _grouped_backward(grad, x, A, B, gates, rank_scale, h,
                                                    scaling, needs, dx_out, tables)
        return (dx if need_x else None), dA, dB, dgates, drs
    dx = dA = dB = dgates = drs = None
    if need_B:
        dB = expert_columns_grad(grad, _dense_h(h, tables, E), B)
    if not (need_x or need_A or need_g or need_rs):
        return dx, dA, dB, dgates, drs
    dZ = torch.mm(grad, expert_columns(B))  # [T, E*r], un-gated
    if need_g or need_rs:
        dgates, drs = _routing_grads(dZ, h, tables, gates, rank_scale, scaling, need_g, need_rs)
    if need_x or need_A:
        dH = _gate(dZ, tables)
        if need_x:
            dx = (torch.mm(dH, expert_rows(A)) if dx_out is None
                  else dx_out.addmm_(dH, expert_rows(A)))
        if need_A:
            dA = torch.mm(dH.T, x).view(E, r, d_in)
    return dx, dA, dB, dgates, drs


def _clamped(keep_idx: torch.Tensor, seq_len: int) -> torch.Tensor:
    """keep_idx ``[B, K]`` clamped to ``[0, seq_len)`` as the Triton kernels clamp it:
    unchecked positions (``check_values=False``) never index out of bounds."""
    return keep_idx.clamp(0, seq_len - 1)


def gather_tokens(hidden, keep_idx):
    return gather_tokens_reference(hidden, _clamped(keep_idx, hidden.shape[1]))


def scatter_tokens(hidden, packed, keep_idx, weight):
    # contiguous like the fake kernel's output (the reference's clone keeps hidden's strides)
    return scatter_tokens_reference(hidden, packed, _clamped(keep_idx, hidden.shape[1]),
                                    weight).contiguous()
