"""The ``triton`` backend: MoLoRA forward/backward and token gather/scatter as Triton kernels.

Implements the protocol of ``datalora.ops.torch_backend`` (see ``datalora.ops.backends``)
with the kernels of ``datalora.kernels``:

forward   ``h = shrink(x, A)`` per route, then ``delta = expand(z, B) * scaling``
backward  ``dz = shrink(dy, B^T)`` (+ ``dH`` for ``dx = expand(dH, A^T)``),
          ``dA``/``dB`` per expert over the expert-sorted routes (deterministic),
          ``dgates``/``drank_scale`` in one per-token pass.

Two strategies, picked per call by :func:`choose_strategy` from shapes only (no host
sync, so CUDA graphs and ``torch.compile`` work): ``dense`` and ``grouped``.
fp64 inputs are delegated to the torch backend (Triton has no fast fp64 path).
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import torch.nn.functional as F

from datalora.kernels import backward as _bw
from datalora.kernels import expand as _ex
from datalora.kernels import fused_linear as _fl
from datalora.kernels import shrink as _sh
from datalora.kernels import tokens as _tok
from datalora.kernels._common import as_f32
from datalora.ops import torch_backend
from datalora.ops.backends import forced_strategy, warn_once
from datalora.ops.eager import RoutingCache, may_cache_routing
from datalora.ops.layout import expert_columns, expert_columns_grad, expert_rows
from datalora.routing import ExpertPermutation, sort_routes

# Dense computes every expert: worth it while E*r is this small or the waste E/k <= 2.
# Measured on an H200 (bf16, T = 4096, d = 4096, benchmarks/results/gpu_h200): at E*r =
# 512 and 1024 (E = 8 with r = 64 / 128, E = 32 / 64 with r = 16, k = 2) the dense cuBLAS
# GEMMs (the torch backend there) took 1.5-2x less than the grouped Triton kernels, forward
# and forward + backward; larger E*r is unmeasured and stays grouped.
DENSE_MAX_COLUMNS = 1024


def launch_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Makes ``t``'s CUDA device current for the block: Triton launches on the current
    device and its stream, whatever the tensors' device (layers on ``cuda:1`` under
    ``device_map="auto"`` would otherwise launch on ``cuda:0``)."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def _on_tensor_device(fn):
    """Runs a backend entry point on the device of its first tensor argument."""
    @functools.wraps(fn)
    def on_device(first, *args, **kwargs):
        with launch_device(first):
            return fn(first, *args, **kwargs)
    return on_device


def choose_strategy(E: int, r: int, k: int) -> str:
    """Shrink/expand strategy for E experts of rank r with k routes per token.

    ``dense`` runs one GEMM over all ``E*r`` columns (x is read once, no sort, two
    launches) and wastes ``E/k`` of its FLOPs on unrouted experts; ``grouped`` sorts
    routes by expert and runs segment GEMMs over the routed experts only (a sort and
    per-expert tile padding, but ``k*r`` instead of ``E*r`` FLOPs per token, and only
    the routed experts' weights are read, which matters for small T). The dense
    GEMMs (cuBLAS) stay cheaper up to ``E*r <= DENSE_MAX_COLUMNS`` (1024, measured: the
    grouped Triton kernels run far below cuBLAS's efficiency) and while at most half
    their work is wasted (``E <= 2k``, dense mixtures included); beyond that grouped.
    ``DATALORA_SHRINK_STRATEGY`` (``dense`` / ``grouped``) overrides the choice.
    """
    forced = forced_strategy()
    if forced:
        return forced
    return "dense" if E * r <= DENSE_MAX_COLUMNS or E <= 2 * k else "grouped"


_perm_cache = RoutingCache()


def permutation(expert_ids: torch.Tensor, num_experts: int, *,
                cache: bool = True) -> ExpertPermutation:
    """``sort_routes`` of ``expert_ids``, reused while the same unmodified tensor comes back.

    Layers sharing one ``Routing`` pass the same ``expert_ids`` tensor, so the sort runs
    once per routing and step, forward and backward (two routings kept: a pruned model's
    full-length and packed ones, :class:`~datalora.ops.eager.RoutingCache`). The backend
    caches only
    where :func:`datalora.ops.eager.may_cache_routing` allows (calls from eager Python):
    tensors inside a compiled graph may be buffers Inductor reuses for new values without
    bumping their version.
    """
    if not cache:
        return sort_routes(expert_ids, num_experts, check_values=False)
    perm = _perm_cache.get((expert_ids,), (num_experts,))
    if perm is None:
        perm = sort_routes(expert_ids, num_experts, check_values=False)
        _perm_cache.put((expert_ids,), (num_experts,), perm)
    return perm


def _sorted_routes(expert_ids, gates, rank_scale, E) -> ExpertPermutation:
    """:func:`permutation`, cached where the routing allows it."""
    return permutation(expert_ids, E, cache=may_cache_routing(expert_ids, gates, rank_scale))


_ONES: dict[tuple[torch.device, int], torch.Tensor] = {}


def _ones(r: int, device: torch.device) -> torch.Tensor:
    """fp32 ones ``[r]``, kept per device (the kernels only read them): no fill launch per
    call. While a CUDA graph is captured a fresh one is made and not kept: its fill runs
    only when the graph replays."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.ones(r, dtype=torch.float32, device=device)
    key = (device, r)
    if key not in _ONES:
        with torch.inference_mode(False), torch.no_grad():
            _ONES[key] = torch.ones(r, dtype=torch.float32, device=device)
    return _ONES[key]


def _kernel_gates(gates: torch.Tensor, dtype: torch.dtype, strategy: str) -> torch.Tensor:
    """Gates as the kernels read them, contiguous: the dense strategy's routing passes take
    them as they are in x's ``dtype`` (a bf16 model's router gives bf16 gates: no cast
    launch per call; the kernels sum them in fp32), the grouped kernels in fp32."""
    if strategy == "dense" and gates.dtype == dtype:
        return gates.contiguous()
    return as_f32(gates)


def _rank_scale(rank_scale, r, device):
    """fp32 rank scale and its row stride; ones with stride 0 when there is none."""
    if rank_scale is None:
        return _ones(r, device), 0
    rs = as_f32(rank_scale)
    return rs, rs.stride(0)


def _as_eor(w: torch.Tensor, transpose: bool) -> tuple[int, int, int]:
    """Strides ``(expert, dim1, dim2)`` of a 3-D weight, with the last two swapped on request."""
    s0, s1, s2 = w.stride()
    return (s0, s2, s1) if transpose else (s0, s1, s2)


# bytes of the fp32 per-route buffer the grouped expand sums over k; wider outputs are
# expanded in column chunks (T = 16384, k = 2, d_out = 14336 would need 1.9 GB at once),
# and more routes than 128 columns fit in token chunks (T = 65536, k = 16: 512 MB)
PARTIAL_BUDGET_BYTES = 256 * 2**20
MIN_PARTIAL_COLUMNS = 128


def _expand_routes(z, w, w_strides, out_dim, perm, y, E, R, alpha, accumulate, k, expert_ids):
    """``y [T, O] (+)= alpha * sum_j z[t*k+j] @ W[e]^T`` with the grouped expand; W's output
    dimension is ``w``'s dimension ``out_dim``; ``perm`` sorts ``expert_ids [T, k]``. For
    k > 1 each route's product goes to an fp32 buffer summed over k, at most
    :data:`PARTIAL_BUDGET_BYTES` at a time (column chunks, and token chunks with their own
    expert sort when even :data:`MIN_PARTIAL_COLUMNS` columns of every route exceed it)."""
    if k == 1:
        _ex.expand_grouped(z, w, w_strides, perm, y, E, R, alpha, accumulate)
        return
    T, O = y.shape
    tokens = max(1, PARTIAL_BUDGET_BYTES // (4 * k * MIN_PARTIAL_COLUMNS))
    if T > tokens:
        for t0 in range(0, T, tokens):
            n = min(tokens, T - t0)
            ids = expert_ids[t0:t0 + n]
            part = sort_routes(ids, E, check_values=False)
            _expand_routes(z[t0 * k:(t0 + n) * k], w, w_strides, out_dim, part,
                           y[t0:t0 + n], E, R, alpha, accumulate, k, ids)
        return
    cols = max(MIN_PARTIAL_COLUMNS,
               PARTIAL_BUDGET_BYTES // (4 * T * k) // MIN_PARTIAL_COLUMNS * MIN_PARTIAL_COLUMNS)
    for start in range(0, O, cols):
        n = min(cols, O - start)
        partial = torch.empty(T * k, n, dtype=torch.float32, device=y.device)
        _ex.expand_grouped(z, w.narrow(out_dim, start, n), w_strides, perm, partial, E, R,
                           alpha, False)
        total = partial.view(T, k, n).sum(1)
        chunk = y[:, start:start + n]
        if accumulate:
            chunk.add_(total)  # fp32 sum added with one rounding to y.dtype
        else:
            chunk.copy_(total)


def _route_ids(expert_ids: torch.Tensor) -> torch.Tensor:
    """Expert ids as ``route_dense`` reads them: int64, contiguous (no copy for the ids a
    router's top-k returns); the kernel clamps them to ``[0, E)``."""
    return expert_ids.to(torch.int64).contiguous()


def _dense_shrink(x, w_rows, ids, g, rs, rs_stride, raw, E, r, mult):
    """Dense strategy's shrink: ``hd = x @ w_rows^T`` over every expert (one cuBLAS GEMM,
    ``w_rows [E*r, K]``), then ``route_dense`` fills ``raw [T, k, r]`` with the routed
    slices and returns ``Zd [T, E*r] = mult * gsum * rank_scale * hd``; ``ids`` is
    :func:`_route_ids` of the expert ids."""
    hd = torch.mm(x, w_rows.t())
    zd = torch.empty_like(hd)
    _sh.route_dense(hd, ids, g, rs, rs_stride, raw, zd, E, r, mult)
    return zd


def _lora_into(y, x, A, B, expert_ids, gates, rank_scale, scaling, h, accumulate, strategy):
    """``y (+)= delta`` for T > 0; fills ``h [T, k, r]`` with the per-route ``A[e] @ x``."""
    T = x.shape[0]
    E, r, _ = A.shape
    k = expert_ids.shape[1]
    strategy = strategy or choose_strategy(E, r, k)
    g = _kernel_gates(gates, x.dtype, strategy)
    rs, rs_stride = _rank_scale(rank_scale, r, x.device)
    if strategy == "dense":
        zd = _dense_shrink(x, expert_rows(A), _route_ids(expert_ids), g, rs, rs_stride, h, E, r,
                           1.0)
        # beta = 0 ignores y's old values (NaN in a fresh buffer included)
        y.addmm_(zd, expert_columns(B).t(), beta=1 if accumulate else 0, alpha=scaling)
    else:
        perm = _sorted_routes(expert_ids, gates, rank_scale, E)
        z = x.new_empty(T * k, r)
        _sh.shrink_grouped(x, A, A.stride(), perm, k, g, rs, rs_stride, h, z, E, r, 1.0)
        _expand_routes(z, B, B.stride(), 1, perm, y, E, r, scaling, accumulate, k, expert_ids)


def _float64(x: torch.Tensor) -> bool:
    """float64 x: the kernels have none; the torch backend computes it (warned once)."""
    if x.dtype != torch.float64:
        return False
    warn_once("datalora: backend 'triton' has no float64 kernels; float64 inputs run the "
              "torch backend's")
    return True


@_on_tensor_device
def delta_forward(x, A, B, expert_ids, gates, rank_scale, scaling, need_h=True, strategy=None):
    """Returns ``(delta [T, d_out], h [T, k, r])`` with ``h = A[e] @ x`` per route.

    x ``[T, d_in]`` (any strides), A ``[E, r, d_in]``, B ``[E, d_out, r]``, expert_ids and
    gates ``[T, k]``, rank_scale ``[T, r]`` or None. ``strategy`` forces ``"dense"`` or
    ``"grouped"`` (default: :func:`choose_strategy`). The kernels write ``h`` as they go,
    so ``need_h`` (the protocol's "h may be skipped") changes nothing here.
    """
    if _float64(x):
        return torch_backend.delta_forward(x, A, B, expert_ids, gates, rank_scale, scaling,
                                           need_h)
    T = x.shape[0]
    h = x.new_empty(T, expert_ids.shape[1], A.shape[1])
    delta = x.new_empty(T, B.shape[1])
    if T > 0:
        _lora_into(delta, x, A, B, expert_ids, gates, rank_scale, scaling, h, False, strategy)
    return delta, h


@_on_tensor_device
def delta_backward(grad, x, A, B, expert_ids, gates, rank_scale, h, scaling, needs,
                   dx_out=None, strategy=None):
    """Gradients ``(dx, dA, dB, dgates, drank_scale)``; entries not in ``needs`` are None.

    ``needs`` is a 5-tuple of bools in that order; shapes as in :func:`delta_forward`,
    grad ``[T, d_out]``, h ``[T, k, r]`` from the forward. ``dx_out`` ``[T, d_in]``: the
    expand accumulates dx into it instead of a new buffer.
    """
    if _float64(x):
        return torch_backend.delta_backward(grad, x, A, B, expert_ids, gates, rank_scale, h,
                                            scaling, needs, dx_out)
    need_x, need_A, need_B, need_g, need_rs = needs
    T, d_in = x.shape
    E, r, _ = A.shape
    k = expert_ids.shape[1]
    dx = dA = dB = dgates = drs = None
    if T == 0:
        zeros = torch.zeros_like
        empty_dx = x.new_empty(0, d_in) if dx_out is None else dx_out
        return (empty_dx if need_x else None, zeros(A) if need_A else None,
                zeros(B) if need_B else None, torch.empty_like(gates) if need_g else None,
                torch.empty_like(rank_scale) if need_rs else None)
    strategy = strategy or choose_strategy(E, r, k)
    dy = grad.to(x.dtype)
    g = _kernel_gates(gates, x.dtype, strategy)
    rs, rs_stride = _rank_scale(rank_scale, r, x.device)
    h2 = h.reshape(T * k, r).contiguous()
    dz = x.new_empty(T * k, r)  # raw B[e]^T dy per route
    perm = None  # the expert sort, once per backward (a routing that cannot be cached)
    ids = _route_ids(expert_ids) if strategy == "dense" else None
    if need_x or need_A or need_g or need_rs:
        if need_x:
            dx = x.new_empty(T, d_in) if dx_out is None else dx_out
        accumulate = dx_out is not None
        if strategy == "dense":
            # dz = B[e]^T dy for every expert in one GEMM; dhd = its routed, scaled form
            b_cols = expert_columns(B)
            dhd = _dense_shrink(dy, b_cols.t(), ids, g, rs, rs_stride, dz, E, r, scaling)
            if need_x:
                dx.addmm_(dhd, expert_rows(A), beta=1 if accumulate else 0)
            if need_A:  # dA[e, i, :] = sum_t dhd[t, e*r + i] x[t]: zero where e is not routed
                dA = torch.mm(dhd.t(), x).view(E, r, d_in)
        else:
            perm = _sorted_routes(expert_ids, gates, rank_scale, E)
            dh = x.new_empty(T * k, r)
            _sh.shrink_grouped(dy, B, _as_eor(B, transpose=True), perm, k, g, rs, rs_stride,
                               dz, dh, E, r, scaling)
            if need_x:
                _expand_routes(dh, A, _as_eor(A, transpose=True), 2, perm, dx, E, r, 1.0,
                               accumulate, k, expert_ids)
    if strategy == "dense" and need_B:
        # dB[e, o, i] = sum_t dy[t, o] Zs[t, e*r + i], Zs the forward's scaled dense shrink,
        # rebuilt from the routed slices h (no second GEMM over x)
        zs = x.new_empty(T, E * r)
        _sh.dense_from_routes(h2, ids, g, rs, rs_stride, zs, E, r, scaling)
        dB = expert_columns_grad(dy, zs, B)
    elif strategy != "dense" and (need_A or need_B):
        if perm is None:
            perm = _sorted_routes(expert_ids, gates, rank_scale, E)
        if need_A:
            dA = torch.empty(E, r, d_in, dtype=A.dtype, device=A.device)
            _bw.segment_outer(x, dz, perm, k, g, rs, rs_stride, dA, _as_eor(dA, True), r,
                              scaling)
        if need_B:
            dB = torch.empty_like(B)  # B's strides (see datalora.ops.layout)
            _bw.segment_outer(dy, h2, perm, k, g, rs, rs_stride, dB, dB.stride(), r, scaling)
    if need_g or need_rs:
        # in the gates' dtype when that is x's (the kernel rounds its fp32 sum once)
        dg = torch.empty(T, k, dtype=gates.dtype if gates.dtype == x.dtype else torch.float32,
                         device=x.device)
        drs32 = torch.empty(T, r, dtype=torch.float32, device=x.device)
        _bw.route_grads(dz, h2, g, rs, rs_stride, dg, drs32, T, r, k, scaling)
        dgates = dg.to(gates.dtype) if need_g else None
        drs = drs32.to(rank_scale.dtype) if need_rs else None
    return dx, dA, dB, dgates, drs


@_on_tensor_device
def gather_tokens(hidden, keep_idx):
    """hidden ``[B, L, d]``, keep_idx ``[B, K]`` -> packed ``[B, K, d]``."""
    return _tok.gather(hidden, keep_idx)


@_on_tensor_device
def scatter_tokens(hidden, packed, keep_idx, weight):
    """Kept rows ``hidden + weight * (packed - hidden)``, others ``hidden``: ``[B, L, d]``
    (fp64 on the torch backend: the kernel computes in fp32)."""
    if torch.float64 in (hidden.dtype, packed.dtype):
        return torch_backend.scatter_tokens(hidden, packed, keep_idx, weight)
    return _tok.scatter(hidden, packed, keep_idx, weight)


FUSED_LINEAR_ENV = "DATALORA_FUSED_LINEAR"


def fused_linear_enabled() -> bool:
    """Whether ``DATALORA_FUSED_LINEAR`` asks for the one-kernel linear (``1``; ``0`` or
    unset: cuBLAS + expand)."""
    value = os.environ.get(FUSED_LINEAR_ENV, "0")
    if value not in ("0", "1", ""):
        raise ValueError(f"{FUSED_LINEAR_ENV}: expected '0' or '1', got {value!r}")
    return value == "1"


@_on_tensor_device
def linear_forward(x, weight, bias, A, B, expert_ids, gates, rank_scale, scaling, need_h=True):
    """Fused ``y = x @ weight.T + bias + delta``: returns ``(y [T, d_out], h [T, k, r])``.

    Default: the base GEMM is cuBLAS (``F.linear``); the LoRA expand then adds into that
    fresh y in place, so y is read and written once more instead of materialising delta
    and adding it. With ``DATALORA_FUSED_LINEAR=1`` and the dense strategy
    (:func:`choose_strategy`), the dense shrink writes ``scaling``-multiplied ``Zd [T,
    E*r]`` and one Triton GEMM (``kernels/fused_linear.py``) computes ``x @ weight.T +
    Zd @ B_all^T + bias`` with y written once; with the grouped strategy (large ``E*r``,
    where ``Zd`` would cost ``E/k`` times the routed work) it keeps cuBLAS + expand. The
    fused path is opt-in until ``benchmarks.molora`` (``molora_linear[triton-fused]``)
    shows it beating cuBLAS on a GPU. Autograd is the ``datalora::molora_linear`` op's
    (``datalora.ops.molora``): the backward is the same for both paths.
    """
    if _float64(x):
        delta, h = torch_backend.delta_forward(x, A, B, expert_ids, gates, rank_scale, scaling,
                                               need_h)
        return F.linear(x, weight, bias) + delta, h
    T = x.shape[0]
    E, r, _ = A.shape
    k = expert_ids.shape[1]
    h = x.new_empty(T, k, r)
    fused = fused_linear_enabled() and choose_strategy(E, r, k) == "dense"
    if fused_linear_enabled() and not fused:
        warn_once(f"datalora: {FUSED_LINEAR_ENV}=1 has no effect on layers of the grouped "
                  f"strategy (large E*r): they run cuBLAS + the expand")
    if fused:
        y = x.new_empty(T, weight.shape[0])
        if T > 0:
            rs, rs_stride = _rank_scale(rank_scale, r, x.device)
            zd = _dense_shrink(x, expert_rows(A), _route_ids(expert_ids),
                               _kernel_gates(gates, x.dtype, "dense"), rs, rs_stride, h, E, r,
                               scaling)
            _fl.fused_linear(x, weight, bias, zd, B, E, r, y)
        return y, h
    y = F.linear(x, weight, bias).contiguous()
    if T > 0:
        _lora_into(y, x, A, B, expert_ids, gates, rank_scale, scaling, h, True, None)
    return y, h
