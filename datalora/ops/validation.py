"""Input checks shared by every backend: clear ``ValueError``/``TypeError`` naming the argument.

Metadata checks (shape, dtype, device) are free and always run. Value checks (expert ids
and token positions in range, finite gates and weights) read the tensors back to the host,
so they run eagerly only: they are skipped while ``torch.compile``, ``make_fx`` or
``torch.export`` traces, under ``FakeTensorMode`` (fake tensors have no values), inside
``torch.func.vmap`` (batched tensors' values cannot be read), while a CUDA graph is
captured (no host sync there), on ``meta`` tensors, or when ``DATALORA_CHECK_VALUES`` is
``0`` / ``false`` / ``no`` / ``off``. Other ``torch.func`` transforms (``grad``,
``jacrev``, ``jvp``) and forward-mode AD check as eager calls do.
Every backend clamps expert ids and token positions, so even unchecked input cannot read
out of bounds.
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake

from datalora.checks import env_flag

CHECK_VALUES_ENV = "DATALORA_CHECK_VALUES"
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)
PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)  # not fake / functional subclasses
# make_fx / torch.export trace under a proxy mode; FakeTensorMode's tensors have no values
_TRACING_MODES = (torch._C._TorchDispatchModeKey.PROXY, torch._C._TorchDispatchModeKey.FAKE)


def _fail(name: str, expected: str, got: object) -> None:
    raise ValueError(f"{name}: expected {expected}, got {got}")


def check_tensor(name: str, t: object, ndim: int | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        _fail(name, f"a {ndim}-D tensor", f"shape {tuple(t.shape)}")
    return t


def check_float(name: str, t: torch.Tensor, dtype: torch.dtype | None = None,
                like: str = "x") -> None:
    """A floating tensor, of ``dtype`` (that of the argument ``like``) when given."""
    if t.dtype not in FLOAT_DTYPES:
        _fail(name, f"a floating dtype {FLOAT_DTYPES}", t.dtype)
    if dtype is not None and t.dtype != dtype:
        _fail(name, f"dtype {dtype} (same as {like})", t.dtype)


def check_device(name: str, t: torch.Tensor, device: torch.device, like: str = "x") -> None:
    if t.device != device:
        _fail(name, f"device {device} (same as {like})", t.device)


def check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(shape):
        _fail(name, f"shape {tuple(shape)}", f"{tuple(t.shape)}")


def _traced(tensors: tuple[torch.Tensor | None, ...]) -> bool:
    """True under ``make_fx`` / ``torch.export`` / ``FakeTensorMode`` (a proxy or fake
    dispatch mode is active) or for fake tensors, possibly wrapped (functional tensors):
    there values are unknown, or a check would read the example inputs only, once."""
    if any(torch._C._get_dispatch_mode(key) is not None for key in _TRACING_MODES):
        return True
    return any(t is not None and type(t) not in PLAIN_TENSORS and is_fake(t)
               for t in tensors)


def under_vmap() -> bool:
    """True inside ``torch.func.vmap``, at any depth of nested ``torch.func`` transforms:
    there a batched tensor's values cannot be read back to the host."""
    stack = torch._C._functorch.get_interpreter_stack()
    return stack is not None and any(
        level.key() == torch._C._functorch.TransformType.Vmap for level in stack)


def value_checks_enabled(*tensors: torch.Tensor | None) -> bool:
    """True when reading the values of ``tensors`` back to the host is allowed (eager, not
    tracing, not under ``vmap``, not capturing, not ``meta`` tensors, which have no
    values)."""
    if not env_flag(CHECK_VALUES_ENV, True):
        return False
    if any(t is not None and t.is_meta for t in tensors):
        return False
    if torch.compiler.is_compiling() or _traced(tensors) or under_vmap():
        return False
    if tensors[0].is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return True


def check_molora_inputs(x, A, B, expert_ids, gates, rank_scale=None,
                        check_values: bool = True) -> None:
    """Validates the operands of ``molora_delta`` with x already flattened to ``[T, d_in]``.

    ``check_values=False`` skips the host-side value checks (for routing already checked).
    """
    check_tensor("x", x, 2)
    check_tensor("A", A, 3)
    check_tensor("B", B, 3)
    check_tensor("expert_ids", expert_ids, 2)
    check_tensor("gates", gates, 2)
    check_float("x", x)
    check_float("A", A, x.dtype)
    check_float("B", B, x.dtype)
    T, d_in = x.shape
    E, r, a_in = A.shape
    if a_in != d_in:
        _fail("A", f"shape [E, r, d_in={d_in}] (d_in of x)", tuple(A.shape))
    if B.shape[0] != E or B.shape[2] != r:
        _fail("B", f"shape [E={E}, d_out, r={r}] (E and r of A)", tuple(B.shape))
    if expert_ids.dtype not in INDEX_DTYPES:
        _fail("expert_ids", "dtype int32 or int64", expert_ids.dtype)
    if expert_ids.shape[0] != T:
        _fail("expert_ids", f"shape [T={T}, k]", tuple(expert_ids.shape))
    k = expert_ids.shape[1]
    if k < 1 or k > E:
        _fail("expert_ids", f"1 <= k <= num_experts={E} routed experts per token", f"k={k}")
    check_shape("gates", gates, (T, k))
    check_float("gates", gates)
    for name, t in (("A", A), ("B", B), ("expert_ids", expert_ids), ("gates", gates)):
        check_device(name, t, x.device)
    if rank_scale is not None:
        check_tensor("rank_scale", rank_scale, 2)
        check_shape("rank_scale", rank_scale, (T, r))
        check_float("rank_scale", rank_scale)
        check_device("rank_scale", rank_scale, x.device)
    if check_values and value_checks_enabled(x, expert_ids, gates, rank_scale) and T > 0:
        check_routing_values(expert_ids, gates, rank_scale, E)


@torch.no_grad()
def check_routing_values(expert_ids, gates, rank_scale, num_experts: int) -> None:
    """Host-side value checks: ids in ``[0, num_experts)``, finite gates and rank scales
    (the four facts computed on the device and read back in one transfer: one sync).
    Recorded by no autograd graph: ``isfinite`` of gates that require grad would save
    them, so a first (checked) forward saved one tensor more than a later one, which
    ``torch.utils.checkpoint``'s recomputation refuses."""
    finite = [torch.isfinite(gates).all()]
    if rank_scale is not None:
        finite.append(torch.isfinite(rank_scale).all())
    facts = torch.stack([expert_ids.min().double(), expert_ids.max().double(),
                         *(f.double() for f in finite)]).tolist()
    lo, hi = int(facts[0]), int(facts[1])
    if lo < 0 or hi >= num_experts:
        _fail("expert_ids", f"values in [0, {num_experts})", f"values in [{lo}, {hi}]")
    if not facts[2]:
        _fail("gates", "finite values", "NaN or inf")
    if rank_scale is not None and not facts[3]:
        _fail("rank_scale", "finite values", "NaN or inf")


def check_linear_inputs(x, weight, bias) -> None:
    """Validates the base-linear operands of ``molora_linear`` (x is ``[T, d_in]``)."""
    check_tensor("weight", weight, 2)
    check_float("weight", weight, x.dtype)
    check_device("weight", weight, x.device)
    if weight.shape[1] != x.shape[1]:
        _fail("weight", f"shape [d_out, d_in={x.shape[1]}]", tuple(weight.shape))
    if bias is not None:
        check_tensor("bias", bias, 1)
        check_float("bias", bias, x.dtype)
        check_device("bias", bias, x.device)
        check_shape("bias", bias, (weight.shape[0],))


def check_token_inputs(hidden, keep_idx, packed=None, weight=None,
                       check_values: bool = True) -> None:
    """Validates ``gather_tokens`` / ``scatter_tokens`` operands (``check_values=False``
    skips the host-side checks of keep_idx's and weight's values)."""
    check_tensor("hidden", hidden, 3)
    check_float("hidden", hidden)
    check_tensor("keep_idx", keep_idx, 2)
    if keep_idx.dtype not in INDEX_DTYPES:
        _fail("keep_idx", "dtype int32 or int64", keep_idx.dtype)
    Bsz, L, d = hidden.shape
    if keep_idx.shape[0] != Bsz or keep_idx.shape[1] > L:
        _fail("keep_idx", f"shape [B={Bsz}, K<={L}]", tuple(keep_idx.shape))
    check_device("keep_idx", keep_idx, hidden.device, "hidden")
    K = keep_idx.shape[1]
    if packed is not None:
        check_tensor("packed", packed, 3)
        check_shape("packed", packed, (Bsz, K, d))
        check_float("packed", packed, hidden.dtype, "hidden")
        check_device("packed", packed, hidden.device, "hidden")
    if weight is not None:
        check_tensor("weight", weight, 2)
        check_shape("weight", weight, (Bsz, K))
        check_float("weight", weight)
        check_device("weight", weight, hidden.device, "hidden")
    if check_values and value_checks_enabled(hidden, keep_idx, packed, weight) \
            and keep_idx.numel():
        check_token_values(keep_idx, L, packed is not None, weight)


def check_token_values(keep_idx, seq_len: int, distinct: bool, weight=None) -> None:
    """Host-side value checks of the token ops: keep_idx ``[B, K]`` (K > 0) in
    ``[0, seq_len)``, distinct within each row when ``distinct`` (scatter), a finite weight
    (the facts computed on the device and read back in one transfer: one sync)."""
    facts = [keep_idx.min().double(), keep_idx.max().double()]
    if distinct:
        s = keep_idx.sort(dim=1).values
        facts.append((s[:, 1:] == s[:, :-1]).any().double())
    if weight is not None:
        facts.append(torch.isfinite(weight).all().double())
    values = torch.stack(facts).tolist()
    lo, hi = int(values[0]), int(values[1])
    if lo < 0 or hi >= seq_len:
        _fail("keep_idx", f"values in [0, {seq_len})", f"values in [{lo}, {hi}]")
    if distinct and values[2]:
        _fail("keep_idx", "distinct positions within each row", "a repeated position")
    if weight is not None and not values[-1]:
        _fail("weight", "finite values", "NaN or inf")
