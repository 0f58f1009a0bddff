"""Shared inputs and tolerance rule for the Triton tests (imported by the test modules)."""

from __future__ import annotations

import torch

# (dtype, eps): the kernel's max error vs an fp64 reference may be at most twice the
# torch backend's error in the same dtype plus eps * max|reference|.
DTYPES = [(torch.float32, 1e-5), (torch.float16, 2e-3)]


def make_routing(T, E, k, routing, device, gen):
    """``expert_ids [T, k]`` int64 for a routing pattern and positive gates ``[T, k]``."""
    if routing == "random":  # k distinct experts per token
        ids = torch.rand(T, E, generator=gen).argsort(1)[:, :k]
    elif routing == "one_expert":  # every token's first route goes to the last expert
        ids = (torch.arange(k)[None, :] + E - 1) % E
        ids = ids.expand(T, k).clone()
    elif routing == "dup":  # the same expert twice in one token
        ids = torch.randint(0, E, (T, 1), generator=gen).expand(T, k).clone()
    else:
        raise ValueError(routing)
    gates = torch.rand(T, k, generator=gen) + 0.1
    return ids.to(device), gates.to(device)


def make_inputs(T, d_in, d_out, E, r, k, dtype, device, routing="random", rank_scale=True,
                seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d_in, generator=gen)
    A = torch.randn(E, r, d_in, generator=gen) / d_in ** 0.5
    B = torch.randn(E, d_out, r, generator=gen) / r ** 0.5
    ids, gates = make_routing(T, E, k, routing, device, gen)
    rs = torch.rand(T, r, generator=gen) + 0.1 if rank_scale else None
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)
    return cast(x), cast(A), cast(B), ids, cast(gates), cast(rs)


def max_err(a, b):
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def assert_close_calibrated(name, got, base, ref, eps):
    """``|got - ref| <= 2 |base - ref| + eps * max|ref|`` (ref in fp64, base = torch backend)."""
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert got.dtype == base.dtype, f"{name}: dtype {got.dtype} != {base.dtype}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    scale = ref.abs().max().item() if ref.numel() else 0.0
    err, base_err = max_err(got, ref), max_err(base, ref)
    bound = 2 * base_err + eps * max(scale, 1e-3)
    assert err <= bound, f"{name}: error {err:.3g} > {bound:.3g} (torch backend {base_err:.3g})"


LINEAR_GRAD_NAMES = ("dx", "dW", "db", "dA", "dB", "dgates", "drank_scale")


def assert_linear_grads_close(grads, base_grads, ref_grads, eps):
    """Every ``molora_linear`` gradient (None where the reference has none) calibrated."""
    for name, got, base, ref in zip(LINEAR_GRAD_NAMES, grads, base_grads, ref_grads,
                                    strict=True):
        if ref is None:
            assert got is None, f"{name}: expected no gradient"
        else:
            assert_close_calibrated(name, got, base, ref, eps)


def spy_launches(monkeypatch, module, name):
    """Wraps launcher ``module.name`` so each call's first argument's shape is recorded (the
    real launcher still runs); returns the list of recorded shapes."""
    calls = []
    real = getattr(module, name)

    def wrapped(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, wrapped)
    return calls


def bucket_picks(config, matrix, launch_keys=("HAS_BIAS", "DOUBLE_QUANT", "dtypes")):
    """For both dtype classes, the launch configs ``config(T, fp32)`` picks over a spread of
    T, checked to depend on buckets of T only (1 and 16 alike, 4096 and 70000 alike) and to
    be listed in the compile ``matrix`` (``launch_configs()`` rows; ``launch_keys`` are the
    per-launch keys beside the tile) for the dtypes that launch them.

    Returns:
        ``{fp32: {T: pick}}`` for further per-kernel checks.
    """
    listed = [(frozenset((k, v) for k, v in c.items() if k not in launch_keys), c["dtypes"])
              for c in matrix]
    out = {}
    for fp32 in (False, True):
        picks = {T: config(T, fp32) for T in (1, 16, 17, 100, 128, 129, 4096, 70000)}
        assert picks[1] == picks[16] and picks[4096] == picks[70000]
        for p in picks.values():
            dts = [d for c, d in listed if c == frozenset(p.items())]
            assert dts and all(("fp32" in d) == fp32 for d in dts)
        out[fp32] = picks
    return out
