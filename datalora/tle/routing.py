"""LoRA-TLE routing math, independent of the mixer: the routing modes, the anchor
position whose context sets each position's weights, and ``softmax(cos / tau)``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from datalora.checks import check_int, check_number
from datalora.ops.validation import check_tensor

MODES: tuple[str, ...] = ("token", "every_n", "prompt")


def routing_weights(embeddings: torch.Tensor, centroids: torch.Tensor,
                    tau: float) -> torch.Tensor:
    """``softmax(cos(embeddings, centroids) / tau)``.

    Args:
        embeddings: ``[..., D]`` context embeddings.
        centroids: ``[N, D]`` one centroid per adapter.
        tau: softmax temperature (> 0).

    Returns:
        ``[..., N]`` float32 weights summing to 1 over the last dim.
    """
    tau = check_number("tau", tau, low=0, low_inclusive=False)
    check_tensor("embeddings", embeddings)
    check_tensor("centroids", centroids)
    if centroids.dim() != 2 or embeddings.shape[-1] != centroids.shape[-1]:
        raise ValueError(f"centroids: expected shape [N, D={embeddings.shape[-1]}], got "
                         f"{tuple(centroids.shape)}")
    sim = F.normalize(embeddings.float(), dim=-1) @ F.normalize(centroids.float(), dim=-1).T
    # a tau below fp32's smallest normal would overflow sim / tau to inf (inf - inf = NaN
    # in the softmax) or round to 0 in the division (0 / 0 = NaN); at that normal
    # |sim / tau| <= 8.5e37 stays finite (|sim| <= 1), and the argmax limit is the same
    tau = max(tau, torch.finfo(torch.float32).tiny)
    return torch.softmax(sim / tau, dim=-1)


def _check_mode(mode: str, every_n: int) -> int:
    """Validates a routing mode; returns ``every_n`` as an int."""
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    return check_int("every_n", every_n, low=1)


def anchor_positions(prompt_lengths: torch.Tensor, seq_len: int, mode: str,
                     every_n: int = 2) -> torch.Tensor:
    """Position whose context sets the routing of each position.

    With prompt length ``P`` (positions ``0..P-1``) and ``p0 = P - 1``:
    prompt positions use ``p0``; a later position ``t`` uses ``t`` (``"token"``),
    ``p0 + n * floor((t - p0) / n)`` (``"every_n"``) or ``p0`` (``"prompt"``).
    The routing is therefore recomputed at positions ``p0, p0 + n, p0 + 2n, ...``.

    Args:
        prompt_lengths: ``[B]`` int, each in ``1..seq_len``.
        seq_len: L.

    Returns:
        ``[B, L]`` int64 anchors, ``anchor <= max(t, P - 1)``.
    """
    every_n = _check_mode(mode, every_n)
    check_tensor("prompt_lengths", prompt_lengths)
    if prompt_lengths.is_floating_point() or prompt_lengths.is_complex() \
            or prompt_lengths.dtype == torch.bool:  # .long() would truncate 3.5 to 3
        raise TypeError(f"prompt_lengths: expected an integer tensor, got "
                        f"{prompt_lengths.dtype}")
    P = prompt_lengths.long().reshape(-1, 1)
    if P.numel() and (int(P.min()) < 1 or int(P.max()) > seq_len):
        raise ValueError(f"prompt_lengths: expected values in [1, {seq_len}], got "
                         f"{P.flatten().tolist()}")
    t = torch.arange(seq_len, device=P.device).reshape(1, -1)
    p0 = P - 1
    if mode == "token":
        anchor = torch.maximum(t, p0)
    elif mode == "every_n":
        anchor = p0 + torch.div((t - p0).clamp_min(0), every_n, rounding_mode="floor") * every_n
    else:
        anchor = p0.expand(-1, seq_len)
    return anchor.expand(P.shape[0], seq_len).contiguous()


def recompute_positions(prompt_length: int, seq_len: int, mode: str,
                        every_n: int = 2) -> list[int]:
    """Positions at which the routing is (re)computed for one sequence (sorted)."""
    prompt_length = check_int("prompt_length", prompt_length, error=TypeError)
    anchors = anchor_positions(torch.tensor([prompt_length]), seq_len, mode, every_n)[0]
    return sorted(set(anchors.tolist()))
