"""Atomic file writes: a crash mid-save never leaves a truncated checkpoint behind."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file


def _umask() -> int:
    """The process umask: from ``/proc/self/status`` where Linux has it, as setting it to
    read it back would, for that moment, give files that other threads create (a data
    loader's, a checkpoint upload's) the umask 0."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0)  # no other API reads it without setting it
    os.umask(umask)
    return umask


def _new_file_mode(path: Path) -> int:
    """The permissions ``path`` keeps if it exists, else those an ``open()`` would give a new
    file (``0o666`` minus the umask); ``mkstemp``'s own ``0o600`` would make saved
    checkpoints unreadable to other users."""
    try:
        return path.stat().st_mode & 0o777
    except FileNotFoundError:
        return 0o666 & ~_umask()


def atomic_write(path: str | Path, write: Callable[[str], object]) -> None:
    """Calls ``write(tmp_path)`` on a temp file beside ``path``, fsyncs it, then renames
    (keeping ``path``'s permissions, or the umask's for a new file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _new_file_mode(path))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def cache_root() -> Path:
    """datalora's cache folder: ``$DATALORA_CACHE``, else ``$XDG_CACHE_HOME/datalora``, else
    ``~/.cache/datalora``."""
    root = os.environ.get("DATALORA_CACHE")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "datalora"


def save_figure(fig: Any, out: str | Path, dpi: int) -> Path:
    """The matplotlib figure ``fig`` at the file path ``out``, in the format its suffix
    names (PNG without one), written atomically (a write cut short leaves the previous
    file, not a truncated image)."""
    kind = Path(out).suffix.lstrip(".").lower() or "png"
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=dpi, format=kind))
    return Path(out)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path,
                 metadata: dict[str, str] | None = None) -> None:
    """Writes a safetensors file atomically (tensors are made contiguous CPU copies); the
    same tensors and metadata give the same bytes (:func:`_sort_header_metadata`)."""
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}

    def write(tmp: str) -> None:
        try:
            save_file(cpu, tmp, metadata=metadata)
        except SafetensorError as exc:  # a full disk: an OSError, as other writes give
            raise OSError(f"could not write {path}: {exc}") from exc
        _sort_header_metadata(tmp)

    atomic_write(path, write)


def _sort_header_metadata(path: str) -> None:
    """Rewrites a safetensors header's ``__metadata__`` with sorted keys, in place.

    safetensors writes the metadata from a hash map in a random order, so two saves of the
    same checkpoint differed in their bytes (checksums, caches). The header is compact
    JSON padded with spaces to its stored length; only the key order changes, so it keeps
    its length (left as written should an escape make it longer)."""
    with open(path, "rb+") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        if len(header.get("__metadata__") or {}) < 2:
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= size:
            f.seek(8)
            f.write(text.ljust(size, b" "))


def check_saved_weight(argument: str, name: str, tensor: torch.Tensor,
                       file: str | Path) -> None:
    """A ValueError naming ``argument`` unless the weight ``name`` read from ``file`` is a
    float tensor of finite values (a diverged or hand-edited file would load silently and
    give NaN, or finite but wrong, outputs)."""
    if not tensor.is_floating_point():
        raise ValueError(f"{argument}: {name} in {file} is {tensor.dtype}, expected a float "
                         f"tensor")
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{argument}: {name} in {file} holds NaN or inf (saved from a "
                         f"diverged run?)")


def _unreadable(path: str | Path, argument: str, exc: SafetensorError) -> ValueError:
    return ValueError(f"{argument}: {path} is not a readable safetensors file ({exc}); it "
                      f"may be truncated or corrupt: save it again")


def load_tensors(path: str | Path, device: str | torch.device = "cpu", *,
                 argument: str = "path") -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; a ValueError naming ``argument`` and the file
    when it is truncated or corrupt (safetensors' own error is neither a ValueError nor
    an OSError)."""
    try:
        return load_file(str(path), device=str(device))
    except SafetensorError as exc:
        raise _unreadable(path, argument, exc) from None


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16}


def load_header(path: str | Path, *, argument: str = "path"
                ) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
    """``name -> (shape, dtype)`` of the tensors in a safetensors file, from its header
    only (dtype None for a non-float dtype); errors as :func:`load_tensors`."""
    try:
        with safe_open(str(path), framework="pt") as f:
            slices = {name: f.get_slice(name) for name in f.keys()}
            return {name: (tuple(t.get_shape()), _DTYPES.get(t.get_dtype()))
                    for name, t in slices.items()}
    except SafetensorError as exc:
        raise _unreadable(path, argument, exc) from None


def load_metadata(path: str | Path, *, argument: str = "path") -> dict[str, str]:
    """The string metadata in a safetensors file's header (no tensor is read); errors as
    :func:`load_tensors`."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except SafetensorError as exc:
        raise _unreadable(path, argument, exc) from None
