"""The Unified Saliency Network (USN) and Gumbel-softmax top-k routing.

One small network looks at every token's hidden state once per forward (before the
first adapted / pruned decoder layer) and emits three signals:

* ``token_scores [B, L]``: keep (high) / prune (low) logits for token pruning;
* ``router_logits [B, L, E]``: expert logits, turned into a :class:`~datalora.routing.Routing`
  by :func:`gumbel_topk` (top-k of Gumbel-softmax(logits / tau));
* ``rank_scale [B, L, r]`` in (0, 1): a soft per-token mask over the LoRA rank dims.

The routing is shared by every :class:`~datalora.layers.MoLoRALinear`, so the backends'
per-routing tables (expert sort, gate matrix) are built once per forward.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
import torch.nn as nn

from datalora.checks import check_int, check_number
from datalora.init_linear import NormalInitLinear, XavierInitLinear
from datalora.ops.validation import INDEX_DTYPES, check_tensor
from datalora.routing import Routing, at_least_fp32

_EPS = 1e-10


def uniform_noise(shape: torch.Size | tuple[int, ...], device: torch.device | str,
                  dtype: torch.dtype = torch.float32,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """``torch.rand`` that passes ``generator`` only when given: ``torch.rand(...,
    generator=None)`` fails on symbolic sizes (``torch.compile`` with dynamic shapes)."""
    extra = {} if generator is None else {"generator": generator}
    return torch.rand(shape, device=device, dtype=dtype, **extra)


def sample_gumbel(shape: torch.Size | tuple[int, ...], device: torch.device | str,
                  dtype: torch.dtype = torch.float32,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard Gumbel(0, 1) noise ``-log(-log U)`` of ``shape`` (finite: U is clamped)."""
    u = uniform_noise(shape, device, dtype, generator)
    # bounds representable in ``dtype`` (in fp16, 1e-10 rounds to 0: -inf noise)
    info = torch.finfo(dtype)
    u = u.clamp(max(_EPS, info.tiny), min(1.0 - 1e-7, 1.0 - info.eps / 2))
    return -torch.log(-torch.log(u))


def gumbel_topk(logits: torch.Tensor, k: int, tau: float, *, hard: bool = False,
                noise: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of Gumbel-softmax: ``y = softmax((logits + g) / tau)``, keep the k largest.

    Args:
        logits: ``[T, E]`` router logits (any float dtype; computed in fp32, fp64 ones in
            fp64).
        k: routes per token, ``1 <= k <= E``.
        tau: temperature ``> 0``; high = soft / exploratory, low = near-discrete.
        hard: straight-through: the forward weights are exactly ``1/k`` on the top-k
            experts (one-hot for k = 1), the backward uses the soft ``y``.
        noise: add Gumbel noise ``g`` (training); off: deterministic top-k of
            ``softmax(logits / tau)``.
        generator: RNG for the noise.

    Returns:
        ``(weights [T, E], expert_ids [T, k])``: weights are zero outside the top-k and sum
        to 1 per token (soft: the top-k of ``y`` renormalised); ``expert_ids`` int64.
    """
    if check_tensor("logits", logits).dim() != 2:
        raise ValueError(f"logits: expected shape [T, E], got {tuple(logits.shape)}")
    num_experts = logits.shape[-1]
    k = check_int("k", k, low=1, high=num_experts)
    try:
        ok = isinstance(tau, numbers.Real | torch.Tensor) and float(tau) > 0
    except (TypeError, ValueError, RuntimeError):  # a tensor of several values
        ok = False
    if not ok:
        raise ValueError(f"tau: expected a temperature > 0, got {tau!r}")
    z = at_least_fp32(logits)
    if noise:
        z = z + sample_gumbel(z.shape, z.device, generator=generator)
    # shifted by the row max before the division: a tiny tau sends every other entry to
    # -inf (softmax one-hot) instead of the max to +inf (softmax NaN)
    z = z - z.amax(-1, keepdim=True).detach()
    y = torch.softmax(z / max(float(tau), torch.finfo(torch.float32).tiny), dim=-1)
    # selected on z, the same order as y's: at a low tau y underflows to ties at 0, among
    # which y.topk would pick the lowest expert ids, not the next-best experts
    expert_ids = z.topk(k, dim=-1).indices
    top = y.gather(-1, expert_ids)
    if hard:
        mask = torch.zeros_like(y).scatter_(-1, expert_ids, 1.0 / k)
        weights = mask + (y - y.detach())  # forward == mask exactly, backward = dy
    else:
        if k == 1:  # top / top.sum() is the constant 1: keep the forward, pass d log y
            gates = top / top.detach().clamp_min(_EPS)
        else:
            gates = top / top.sum(-1, keepdim=True).clamp_min(_EPS)
        weights = torch.zeros_like(y).scatter(-1, expert_ids, gates)
    return weights, expert_ids


@dataclass
class SaliencyOutput:
    """Everything the USN decides in one forward.

    Attributes:
        token_scores: ``[B, L]`` fp32 keep logits (fp64 from an fp64 network, as are the
            next two and the state's feature sum).
        router_logits: ``[B, L, E]`` fp32.
        rank_scale: ``[B, L, r]`` fp32 in (0, 1).
        routing: :class:`Routing` over the ``T = B*L`` tokens (``expert_ids [T, k]``,
            ``gates [T, k]``, ``rank_scale [T, r]``, ``router_probs [T, E]`` noise-free).
        state: ``(feature_sum [B, h], count [B])`` fp32, the causal context after this chunk.
        context: ``(feature_sum [B, L, h], count [B, L])``, the causal context after each
            position of this chunk (detached): the ``state`` a KV cache cropped to that
            position resumes from (assisted decoding). A DATALORA model's runtime keeps it
            on the cache and drops it from its forward records (None there).
    """

    token_scores: torch.Tensor
    router_logits: torch.Tensor
    rank_scale: torch.Tensor
    routing: Routing
    state: tuple[torch.Tensor, torch.Tensor] | None = None
    context: tuple[torch.Tensor, torch.Tensor] | None = None


class UnifiedSaliencyNetwork(nn.Module):
    """Shared backbone + three heads (token score, router logits, rank scale).

    ``hidden [B, L, d] -> LayerNorm -> Linear(d, h) -> GELU -> Linear(h, h) -> GELU = f``,
    ``z = [f_t, mean_{s <= t} f_s]`` (causal context over real tokens), then
    ``score: Linear(2h, 1)``, ``router: Linear(2h, E)``, ``rank: sigmoid(Linear(2h, r))``.
    Parameters and ``keep_threshold`` are fp32 whatever the base dtype (the input is cast;
    a module-wide ``.to(dtype)`` / ``.half()`` / ``.bfloat16()`` to a 16-bit dtype moves
    them and leaves them fp32; ``.double()`` still gives fp64). The rank head starts near
    0.88 (bias 2) so a new adapter uses most of its rank; the router starts near uniform,
    and the score head at 0.

    Args:
        hidden_size: d, the base model's hidden size.
        num_experts: E. rank: r. top_k: experts per token.
        saliency_hidden_size: h, the backbone width.
        temperature: initial Gumbel temperature ``tau`` (the curriculum changes it).

    Attributes set by the curriculum: ``tau`` (float), ``hard`` (bool: straight-through
    one-hot routing). Gumbel noise is added in training mode only.
    """

    keep_threshold: torch.Tensor  # a buffer (registered in __init__)

    def __init__(self, hidden_size: int, num_experts: int, rank: int, top_k: int,
                 saliency_hidden_size: int = 64, temperature: float = 1.0):
        super().__init__()
        hidden_size = check_int("hidden_size", hidden_size, low=1)
        num_experts = check_int("num_experts", num_experts, low=1)
        rank = check_int("rank", rank, low=1)
        top_k = check_int("top_k", top_k, low=1)
        h = check_int("saliency_hidden_size", saliency_hidden_size, low=1)
        if top_k > num_experts:
            raise ValueError(f"top_k: expected <= num_experts={num_experts}, got {top_k}")
        temperature = check_number("temperature", temperature, low=0, low_inclusive=False)
        self.hidden_size, self.num_experts, self.rank, self.top_k = (
            hidden_size, num_experts, rank, top_k)
        self.saliency_hidden_size = h
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False)
        self.backbone = nn.Sequential(XavierInitLinear(hidden_size, h), nn.GELU(),
                                      XavierInitLinear(h, h), nn.GELU())
        # heads see [token features, causal mean of the sequence's features so far]; a rank
        # bias of 2 starts rank_scale = sigmoid(2) ~ 0.88: every rank dimension in use
        self.score_head = NormalInitLinear(2 * h, 1, std=0.02)
        self.router_head = NormalInitLinear(2 * h, num_experts, std=0.02)
        self.rank_head = NormalInitLinear(2 * h, rank, std=0.02, bias_value=2.0)
        self.tau = temperature
        self.hard = False
        # score above which a token is kept at generation time (NaN: not calibrated)
        self.register_buffer("keep_threshold", torch.tensor(float("nan")))

    def _apply(self, fn, recurse=True):
        """Module-wide casts (``model.to(torch.bfloat16)``, ``.half()``) move the network and
        leave its floating tensors fp32: a rounded ``keep_threshold`` keeps other tokens, and
        bf16 scores flip keep decisions between cached and uncached generation."""
        def fp32(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            if out.is_floating_point() and out.dtype in (torch.float16, torch.bfloat16):
                return t.to(out.device, torch.float32)  # from t: not through the rounding
            return out

        return super()._apply(fp32, recurse)

    def reset_parameters(self) -> None:
        """Re-initialises every linear layer (each also does on its own under a module walk:
        Xavier backbone, N(0, 0.02) heads, rank-head bias 2) and marks the keep threshold
        uncalibrated (NaN)."""
        for layer in (*self.backbone, self.score_head, self.router_head, self.rank_head):
            if isinstance(layer, nn.Linear):
                layer.reset_parameters()
        with torch.no_grad():  # not calibrated (after to_empty() it holds leftover memory)
            self.keep_threshold.fill_(float("nan"))

    def forward(self, hidden: torch.Tensor, valid: torch.Tensor | None = None,
                state: tuple[torch.Tensor, torch.Tensor] | None = None,
                generator: torch.Generator | None = None) -> SaliencyOutput:
        """hidden ``[B, L, d]`` -> :class:`SaliencyOutput` (routing over ``B*L`` tokens).

        Every head sees the token's backbone features and the causal mean of the features
        of the sequence's real tokens up to it (the task / context signal), so decisions
        never depend on later tokens.

        Args:
            hidden: ``[B, L, d]``; L = 0 gives empty outputs and passes ``state`` through.
            valid: ``[B, L]`` real tokens, any dtype read as bool (nonzero = real: a float
                mask's 0.5 or 2 weighted the context mean); padding is left out of it.
            state: ``(feature_sum [B, h], count [B])`` of earlier chunks (KV-cached
                generation), as returned in ``SaliencyOutput.state`` (fp32; an fp64
                network's feature sum fp64).
            generator: RNG for the Gumbel noise.
        """
        check_tensor("hidden", hidden)
        if not hidden.is_floating_point():  # int / bool were cast, complex lost its imaginary
            raise TypeError(f"hidden: expected a float tensor, got {hidden.dtype}")
        if hidden.dim() != 3 or hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden: expected shape [B, L, {self.hidden_size}], "
                             f"got {tuple(hidden.shape)}")
        bsz, seq_len, _ = hidden.shape
        if valid is not None and tuple(check_tensor("valid", valid).shape) != (bsz, seq_len):
            raise ValueError(f"valid: expected shape {(bsz, seq_len)}, got {tuple(valid.shape)}")
        if state is not None:
            self._check_state(state, bsz)
        weight = self.score_head.weight
        if hidden.device != weight.device:
            raise ValueError(f"hidden: expected device {weight.device} (that of the saliency "
                             f"network), got {hidden.device}")
        # the running context is summed in fp32 whatever the compute dtype (autocast): in
        # bf16, 256 + 1 == 256, and the cached count would stop growing
        w = (torch.ones(bsz, seq_len, device=hidden.device) if valid is None
             else valid.to(device=hidden.device).bool().float())
        if valid is not None:  # padded rows read as zeros: a NaN / inf there (fully masked
            # attention rows) would reach the real tokens' context, and every weight gradient
            hidden = torch.where(w[..., None] > 0, hidden, 0.0)
        feats = self.backbone(self.norm(hidden.to(weight.dtype)))
        total = (at_least_fp32(feats) * w[..., None]).cumsum(1)
        count = w.cumsum(1)
        if state is not None:
            total = total + state[0].to(total.dtype)[:, None]
            count = count + state[1][:, None]
        context = total / count.clamp_min(1.0)[..., None]
        z = torch.cat([feats, context.to(feats.dtype)], dim=-1)
        scores = at_least_fp32(self.score_head(z).squeeze(-1))
        logits = at_least_fp32(self.router_head(z))
        rank_scale = torch.sigmoid(at_least_fp32(self.rank_head(z)))
        flat_logits = logits.reshape(-1, self.num_experts)
        weights, expert_ids = gumbel_topk(flat_logits, self.top_k, self.tau, hard=self.hard,
                                          noise=self.training, generator=generator)
        routing = Routing(expert_ids=expert_ids, gates=weights.gather(-1, expert_ids),
                          rank_scale=rank_scale.reshape(-1, self.rank),
                          router_probs=torch.softmax(flat_logits, dim=-1), _trusted=True,
                          _valid_experts=self.num_experts)
        return SaliencyOutput(token_scores=scores, router_logits=logits,
                              rank_scale=rank_scale, routing=routing,
                              state=_end_state(total, count, state),
                              context=(total.detach(), count.detach()))

    def _check_state(self, state: object, bsz: int) -> None:
        """``state`` is ``(feature_sum [B, h], count [B])`` for a batch of ``bsz``."""
        h = self.saliency_hidden_size
        if not isinstance(state, (tuple, list)) or len(state) != 2 \
                or not all(isinstance(t, torch.Tensor) for t in state):
            got = (f"({', '.join(type(t).__name__ for t in state)})"
                   if isinstance(state, (tuple, list)) else type(state).__name__)
            raise TypeError("state: expected a (feature_sum [B, h], count [B]) pair of "
                            f"tensors, got {got}")
        if tuple(state[0].shape) != (bsz, h) or tuple(state[1].shape) != (bsz,):
            raise ValueError(f"state: expected shapes ({(bsz, h)}, {(bsz,)}) (feature_sum, "
                             f"count), got ({tuple(state[0].shape)}, {tuple(state[1].shape)})")

    def keep_probability(self, token_scores: torch.Tensor) -> torch.Tensor:
        """``sigmoid(token_scores)``: the soft keep decision (tau scales selection noise only)."""
        return torch.sigmoid(token_scores)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_experts={self.num_experts}, "
                f"rank={self.rank}, top_k={self.top_k}, tau={self.tau:g}, hard={self.hard}")


def _end_state(total: torch.Tensor, count: torch.Tensor,
               state: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, ...]:
    """The causal context after a chunk, ``(feature_sum [B, h], count [B])`` fp32 (an fp64
    network's feature sum fp64) and detached: that at its last position (``total [B, L, h]``,
    ``count [B, L]``), or for an empty chunk (L = 0) the incoming ``state`` (zeros without
    one)."""
    if total.shape[1] > 0:
        return total[:, -1].detach(), count[:, -1].detach()
    if state is not None:
        return state[0].detach(), state[1].detach()
    return total.new_zeros(total.shape[0], total.shape[2]), count.new_zeros(count.shape[0])


def gather_routing(routing: Routing, keep_idx: torch.Tensor, seq_len: int) -> Routing:
    """The routing of the packed tokens: rows ``keep_idx [B, K]`` of a ``[B*L]`` routing.

    Gradients flow from the packed ``gates`` / ``rank_scale`` back to the full ones.
    """
    check_tensor("keep_idx", keep_idx, 2)
    if keep_idx.dtype not in INDEX_DTYPES:
        raise ValueError(f"keep_idx: expected dtype int32 or int64, got {keep_idx.dtype}")
    bsz, kept = keep_idx.shape
    if routing.num_tokens != bsz * seq_len:
        raise ValueError(f"routing: expected {bsz}*{seq_len} tokens, got {routing.num_tokens}")

    def take(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        t3 = t.reshape(bsz, seq_len, -1)
        idx = keep_idx[..., None].expand(-1, -1, t3.shape[-1])
        return t3.gather(1, idx).reshape(bsz * kept, -1)

    packed = Routing(expert_ids=take(routing.expert_ids), gates=take(routing.gates),
                     rank_scale=take(routing.rank_scale),
                     router_probs=take(routing.router_probs), _trusted=routing._trusted,
                     _valid_experts=routing._valid_experts)
    packed.inherit_value_checks(routing)  # rows of checked values
    return packed


__all__ = ["SaliencyOutput", "UnifiedSaliencyNetwork", "gather_routing", "gumbel_topk",
           "sample_gumbel"]
