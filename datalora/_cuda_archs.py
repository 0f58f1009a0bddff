"""GPU architectures of the ``datalora._C`` build: parsing ``DATALORA_CUDA_ARCHS`` (setup.py)
and deciding whether a device's compute capability has a kernel image in the build
(``datalora._C_loader``).

Pure Python with no imports outside the standard library: ``setup.py`` loads this file by
path, so the build never needs torch (or ``datalora/__init__``).
"""

from __future__ import annotations

import re

__all__ = ["DEFAULT_ARCHS", "gencode_flags", "image_for", "parse_archs"]

DEFAULT_ARCHS = "75;80;90"
"""What ``DATALORA_CUDA_ARCHS`` defaults to: sm_75 (T4), sm_80 (A100), sm_90 (H100); PTX
of the last one JIT-compiles for newer GPUs."""

# "80", "8.0", "90a", "100f", each optionally "+PTX"
_ARCH = re.compile(r"(?P<major>\d{1,2})\.?(?P<minor>\d)(?P<suffix>[af]?)(?P<ptx>\+PTX)?",
                   re.IGNORECASE)


def parse_archs(text: str) -> tuple[list[str], list[str]]:
    """``(sass, ptx)`` arch names (``"80"``, ``"90a"``) of an arch list such as ``"80;90"``,
    ``"8.0 9.0+PTX"`` or ``"75,80,90"`` (``;``, ``,`` or spaces between entries). PTX is
    built for the entries marked ``+PTX``, else for the last one. Raises ValueError naming
    ``DATALORA_CUDA_ARCHS`` for anything else (an empty list, ``compute_80``, ``sm80``)."""
    if not isinstance(text, str):
        raise TypeError(f"DATALORA_CUDA_ARCHS: expected a string, got {type(text).__name__}")
    entries = [e for e in re.split(r"[;,\s]+", text.strip()) if e]
    if not entries:
        raise ValueError(f"DATALORA_CUDA_ARCHS: expected a list of compute capabilities such "
                         f"as '80;90' or '8.0;9.0+PTX', got {text!r}")
    sass: list[str] = []
    ptx: list[str] = []
    for entry in entries:
        m = _ARCH.fullmatch(entry)
        if m is None:
            raise ValueError(f"DATALORA_CUDA_ARCHS: expected entries such as '80', '8.0', "
                             f"'90a' or '9.0+PTX', got {entry!r} in {text!r}")
        name = f"{int(m['major'])}{m['minor']}{m['suffix'].lower()}"
        if name not in sass:
            sass.append(name)
        if m["ptx"] and name not in ptx:
            ptx.append(name)
    return sass, ptx or [sass[-1]]


def gencode_flags(sass: list[str], ptx: list[str]) -> list[str]:
    """nvcc ``-gencode`` arguments: a cubin per ``sass`` arch, PTX per ``ptx`` arch."""
    flags: list[str] = []
    for arch in sass:
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    for arch in ptx:
        flags += ["-gencode", f"arch=compute_{arch},code=compute_{arch}"]
    return flags


def _split(arch: str) -> tuple[int, int, str]:
    m = _ARCH.fullmatch(arch)
    if m is None or m["ptx"]:
        raise ValueError(f"arch: expected a name such as '80' or '90a', got {arch!r}")
    return int(m["major"]), int(m["minor"]), m["suffix"].lower()


def _cubin_runs(arch: str, capability: tuple[int, int]) -> bool:
    """A cubin runs on its own major with an equal or higher minor (an ``a`` cubin only on
    its exact capability)."""
    major, minor, suffix = _split(arch)
    if suffix == "a":
        return capability == (major, minor)
    return capability[0] == major and capability[1] >= minor


def _ptx_runs(arch: str, capability: tuple[int, int]) -> bool:
    """Plain PTX JIT-compiles for any equal or newer capability (``a``/``f`` PTX only where
    its cubin would run)."""
    major, minor, suffix = _split(arch)
    if suffix:
        return _cubin_runs(arch, capability)
    return capability >= (major, minor)


def image_for(sass: list[str], ptx: list[str], capability: tuple[int, int]) -> str | None:
    """The build's image that runs on a GPU of ``capability`` (``"sm_80"``, ``"compute_90"``
    PTX), or None when there is none (the CUDA launch would fail with "no kernel image")."""
    for arch in sass:
        if _cubin_runs(arch, capability):
            return f"sm_{arch}"
    for arch in ptx:
        if _ptx_runs(arch, capability):
            return f"compute_{arch}"
    return None
