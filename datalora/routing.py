"""Routing decisions shared by MoLoRA layers.

A :class:`Routing` carries one decision per token (``expert_ids``, ``gates``, optional
``rank_scale``). The saliency network computes it once per forward and every adapted
layer reuses it; the backends build their per-routing tables (the torch backend's gate
matrix, the Triton backend's expert sort for its grouped kernels) once per routing and
reuse them in the other layers and the backward (:mod:`datalora.ops.eager`).
:meth:`Routing.permutation` gives that expert sort (lazily, once, without a host sync)
to code of your own.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import torch

from datalora.checks import check_bool, check_int
from datalora.ops.backends import warn_once
from datalora.ops.eager import TensorsState, trust_routing
from datalora.ops.validation import INDEX_DTYPES, check_float, check_tensor


@dataclass(frozen=True)
class ExpertPermutation:
    """Routes sorted by expert.

    Attributes:
        order: ``[T*k]`` flat route indices (``t*k + j``) sorted by expert, stable.
        expert_offsets: ``[E+1]`` int64 start of each expert's segment in ``order``.
    """

    order: torch.Tensor
    expert_offsets: torch.Tensor


def _check_ids(expert_ids: object) -> torch.Tensor:
    """Errors worded as the ops word them."""
    check_tensor("expert_ids", expert_ids)
    if expert_ids.dtype not in INDEX_DTYPES:  # .long() would truncate 1.7 to expert 1
        raise ValueError(f"expert_ids: expected dtype int32 or int64, got {expert_ids.dtype}")
    return expert_ids


def sort_routes(expert_ids: torch.Tensor, num_experts: int, *,
                check_values: bool = True) -> ExpertPermutation:
    """Groups the ``T*k`` routes of ``expert_ids [T, k]`` by expert (no host sync).

    ``check_values``: ids outside ``[0, num_experts)`` fail an assertion on the device (no
    host sync; the ops, which validate their ids, pass False). Unchecked, such ids count in
    the first or last expert's segment.
    """
    # 0 failed with "index -1 is out of bounds", 2.0 / None inside torch.zeros
    num_experts = check_int("num_experts", num_experts, low=1)
    flat = _check_ids(expert_ids).reshape(-1).long()
    if check_bool("check_values", check_values) and flat.numel():
        torch._assert_async(((flat >= 0) & (flat < num_experts)).all(),
                            f"sort_routes: expert ids outside [0, {num_experts})")
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device)
    counts.scatter_add_(0, flat.clamp(0, num_experts - 1), torch.ones_like(flat))
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    return ExpertPermutation(order=order, expert_offsets=offsets)


@dataclass(eq=False)
class Routing:
    """One routing decision per token.

    Attributes:
        expert_ids: ``[T, k]`` (or ``[..., k]``) integer routed experts.
        gates: ``[T, k]`` float gate of each route.
        rank_scale: ``[T, r]`` float in (0, 1] or None.
        router_probs: ``[T, E]`` full router distribution (for load-balance losses), or None.

    The expert sort and the host-side value check are done once per routing and reused by
    every layer while its tensors stay the same objects with unchanged version counters (a
    field reassigned, or changed in place by a torch op, is sorted / checked again; a
    write through ``.data`` or a numpy view keeps the version and is not checked again:
    build a new Routing or write with torch ops instead).
    ``_trusted`` (datalora's own routers) also lets backends cache per-routing tables; a
    routing you build yourself may be changed without a version bump (through a numpy view
    or ``.data``), so its tables are rebuilt on every call unless you call
    :meth:`cache_tables` (a second layer taking it without warns once). ``_valid_experts``
    (the saliency network's routing): the ids are a top-k over that many experts, in range by
    construction, so layers with that many experts skip the value check and its host sync;
    non-finite gates then come from non-finite router inputs or weights and spoil the
    outputs of their tokens, as a layer's own router's do.
    """

    expert_ids: torch.Tensor
    gates: torch.Tensor
    rank_scale: torch.Tensor | None = None
    router_probs: torch.Tensor | None = None
    _trusted: bool = field(default=False, repr=False)
    _valid_experts: int | None = field(default=None, repr=False)
    # num_experts -> (state of expert_ids, its sort): the latest state only
    _permutations: dict[int, tuple[TensorsState, ExpertPermutation]] = field(
        default_factory=dict, repr=False)
    # num_experts -> state of (expert_ids, gates, rank_scale) whose values passed the check
    _values_checked: dict[int, TensorsState] = field(default_factory=dict, repr=False)
    _first_layer: int | None = field(default=None, repr=False)  # id() of the first layer

    def __post_init__(self) -> None:
        for name in ("expert_ids", "gates", "rank_scale", "router_probs"):
            value = getattr(self, name)
            if not (isinstance(value, torch.Tensor) or (value is None and name in (
                    "rank_scale", "router_probs"))):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
        ids = _check_ids(self.expert_ids)
        if ids.dim() < 1:
            raise ValueError(f"expert_ids: expected shape [T, k], got {tuple(ids.shape)}")
        check_float("gates", self.gates)
        if self.gates.shape != ids.shape:
            raise ValueError(f"gates: expected shape {tuple(ids.shape)} (that of expert_ids), "
                             f"got {tuple(self.gates.shape)}")
        for name in ("rank_scale", "router_probs"):
            value = getattr(self, name)
            if value is None:
                continue
            check_float(name, value)
            if value.shape[:-1] != ids.shape[:-1] or value.dim() != ids.dim():
                raise ValueError(f"{name}: expected shape [{', '.join(map(str, ids.shape[:-1]))}"
                                 f", n] (the tokens of expert_ids), got {tuple(value.shape)}")
        if self._trusted and not torch.compiler.is_compiling():  # compiled graphs: no caches
            trust_routing(self.expert_ids, self.gates, self.rank_scale)

    @property
    def num_tokens(self) -> int:
        """T: routed tokens (leading dims of ``expert_ids`` flattened)."""
        return self.expert_ids[..., 0].numel()

    @property
    def top_k(self) -> int:
        return self.expert_ids.shape[-1]

    def __getstate__(self) -> dict:
        """Copies and pickles leave the sort / value-check caches behind (they hold weak
        references to this object's tensors, not the copy's)."""
        return {**self.__dict__, "_permutations": {}, "_values_checked": {},
                "_first_layer": None}

    def cache_tables(self) -> Routing:
        """Lets the backends cache this routing's tables (the torch backend's gate matrix,
        the Triton expert sort) across the layers that take it, as for datalora's own
        routers; returns self. A promise that its tensors change only through torch ops,
        which bump their version counters: a write through ``.data`` or a numpy view would
        go unseen and leave the tables stale."""
        if not torch.compiler.is_compiling():  # compiled graphs keep no caches
            trust_routing(self.expert_ids, self.gates, self.rank_scale)
        self._trusted = True
        return self

    def note_layer(self, layer: object) -> None:
        """``layer`` took this routing: an untrusted one reaching a second layer warns once
        (its tables are rebuilt in every layer) and names :meth:`cache_tables`."""
        if self._trusted or torch.compiler.is_compiling():
            return
        if self._first_layer is None:
            self._first_layer = id(layer)
        elif self._first_layer != id(layer):
            warn_once("datalora: a Routing you built reached a second MoLoRA layer: its "
                      "tables (gate matrix, expert sort) are built again in every layer; "
                      "call routing.cache_tables() once built (if you change its tensors "
                      "only with torch ops) to build them once")

    def _decision(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return self.expert_ids, self.gates, self.rank_scale

    def permutation(self, num_experts: int) -> ExpertPermutation:
        """Routes sorted by expert, computed on first use and shared by every layer (again
        after ``expert_ids`` changes; every call for a routing you built yourself)."""
        if not self._trusted:
            return sort_routes(self.expert_ids, num_experts)
        cached = self._permutations.get(num_experts)
        if cached is not None and cached[0].same(self.expert_ids):
            return cached[1]
        perm = sort_routes(self.expert_ids, num_experts)
        state = TensorsState.of(self.expert_ids)
        if state is not None:
            self._permutations[num_experts] = (state, perm)
        return perm

    def needs_value_check(self, num_experts: int) -> bool:
        """True until a layer with ``num_experts`` experts validated the ids and gates of
        this routing in its current state (:meth:`mark_values_checked`): that layer checks
        them on the host (a sync), the others skip it."""
        if self._valid_experts == num_experts:
            return False
        checked = self._values_checked.get(num_experts)
        return checked is None or not checked.same(*self._decision())

    def mark_values_checked(self, num_experts: int) -> None:
        """Records that the current ids and gates passed the value check for
        ``num_experts`` experts (call it after the check succeeded)."""
        state = TensorsState.of(*self._decision())
        if state is not None:
            self._values_checked[num_experts] = state

    def inherit_value_checks(self, source: Routing) -> None:
        """Counts the checks ``source`` passed in its current state as done here: this
        routing holds a subset of ``source``'s rows (e.g. the kept tokens)."""
        for num_experts, checked in source._values_checked.items():
            if checked.same(*source._decision()):
                self.mark_values_checked(num_experts)

    def expert_load(self, num_experts: int) -> torch.Tensor:
        """``[E]`` fraction of routes sent to each expert (ids outside ``[0, E)`` fail an
        assertion, on the device: no host sync)."""
        num_experts = check_int("num_experts", num_experts, low=1)
        flat = self.expert_ids.reshape(-1).long()
        if flat.numel():
            torch._assert_async(((flat >= 0) & (flat < num_experts)).all(),
                                f"expert_load: expert ids outside [0, {num_experts})")
        counts = torch.zeros(num_experts, device=flat.device).scatter_add_(
            0, flat.clamp(0, num_experts - 1), torch.ones_like(flat, dtype=torch.float))
        return counts / max(flat.numel(), 1)


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in fp32, or as it is when wider (fp64): the routing math's precision, which an
    fp64 model keeps (its gradients can then be checked by finite differences)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def softmax_topk(logits: torch.Tensor, k: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(probs [T, E], top [T, k], ids [T, k])``: the softmax of ``logits [T, E]`` (fp32,
    or fp64 for fp64 logits), and the ``k`` largest probabilities with their indices,
    selected on the logits (the same order): probabilities that underflow tie at 0, among
    which ``probs.topk`` would take the lowest indices, not the next-best."""
    z = at_least_fp32(logits)
    probs = torch.softmax(z, dim=-1)
    ids = z.topk(k, dim=-1).indices
    return probs, probs.gather(-1, ids), ids


def check_topk(k: int, num_experts: int, name: str = "k") -> None:
    """A ValueError naming ``name`` unless ``k`` is an int in ``[1, num_experts]``."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= num_experts:
        raise ValueError(f"{name}: expected an int 1 <= {name} <= num_experts={num_experts}, "
                         f"got {k!r}")


def topk_routing(logits: torch.Tensor, k: int, renormalize: bool = True, *,
                 _trusted: bool = False) -> Routing:
    """Softmax top-k routing: logits ``[T, E]`` -> :class:`Routing` with ``k`` routes per token.

    Gates are the top-k softmax probabilities (computed in fp32, or fp64 for fp64 logits),
    renormalised to sum to 1 when ``renormalize`` (Mixtral style); gradients reach the
    router through them. ``_trusted``
    (datalora's own layers, which never hand the tensors out for writing before use) lets
    backends cache per-routing tables; the routing you get is checked like one you built.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() < 1:
        raise TypeError(f"logits: expected a [T, E] torch.Tensor, got {type(logits).__name__}"
                        + (f" of shape {tuple(logits.shape)}"
                           if isinstance(logits, torch.Tensor) else ""))
    if not logits.is_floating_point():
        raise TypeError(f"logits: expected a floating tensor, got dtype {logits.dtype}")
    check_topk(k, logits.shape[-1])
    check_bool("renormalize", renormalize)
    probs, gates, expert_ids = softmax_topk(logits, k)
    if renormalize:
        # k = 1: gates / gates.sum() is the constant 1 (no router gradient): keep the forward
        # value 1 exactly, backward d log p
        denom = gates.detach() if k == 1 else gates.sum(-1, keepdim=True)
        gates = gates / denom
    return Routing(expert_ids=expert_ids, gates=gates.to(logits.dtype), router_probs=probs,
                   _trusted=_trusted)
