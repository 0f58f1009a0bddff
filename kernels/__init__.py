"""Triton kernels of datalora, installed as ``datalora.kernels`` (their math, as plain torch:
``datalora.reference``).

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

Importing this package imports Triton (a kernel compiles at its first launch); ``datalora``
imports it only when the triton backend first runs.
"""

if __name__ == "kernels":
    # Imported as a top-level ``kernels``: Python runs from a checkout's root, where this
    # folder shadows PyPI's ``kernels`` (Hugging Face hub kernels, which transformers >= 5.25
    # depends on and imports with its activations). Hand the name to the installed package,
    # or look like a folder that is not one.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    if _spec is None or _spec.loader is None:
        # No installed ``kernels``. Raising would break transformers, which finds this folder
        # (``find_spec``), finds no distribution of it and imports it to read a version:
        # look like the bare namespace folder it then counts as not installed (no
        # ``__file__``, no ``__version__``), every name an AttributeError (so
        # ``from kernels import get_kernel`` is the ImportError its callers expect).
        __file__ = None

        def __getattr__(name: str):
            raise AttributeError(f"module 'kernels' has no attribute {name!r}: the Hugging "
                                 f"Face 'kernels' package is not installed (this is "
                                 f"datalora's kernels folder; import it as datalora.kernels)")
    else:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _module  # the import statement returns what is here
        _spec.loader.exec_module(_module)
    del _root, _path, _spec
