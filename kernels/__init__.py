"""Triton kernels of datalora, installed as ``datalora.kernels`` (DESIGN.md section 1).

Modules, each a set of ``@triton.jit`` kernels plus thin host launchers:

- ``shrink``: ``H = X @ W_e^T`` per routed expert, dense (all experts) or grouped
  (expert-sorted segments); also used for ``B^T dy`` in the backward.
- ``expand``: ``Y (+)= alpha * Z @ W_e`` from a dense ``[T, E*r]`` buffer or per route.
- ``backward``: per-expert ``dA`` / ``dB`` over sorted segments (deterministic, no
  atomics) and the per-route ``dgates`` / ``drank_scale`` reduction.
- ``tokens``: gather kept tokens; scatter them back with the weighted residual bypass.
- ``fused_linear``: ``Y = X @ W^T + bias + Zd @ B_all^T`` in one GEMM (LoRA expand as
  extra K-iterations over the dense shrink's buffer).
- ``nf4_fused_linear``: the same with W in NF4 (bitsandbytes layout), its 4-bit tiles
  decoded in registers.

Importing this package imports Triton; ``datalora`` itself never does so eagerly.
"""
