"""Build script: pure Python by default, plus ``datalora._C`` when nvcc is available.

The CUDA extension is built with nvcc + pybind11 only; it never links libtorch, so
one wheel serves every torch version (tensors cross the boundary as raw pointers
and the current CUDA stream, like bitsandbytes' native library).

Environment flags:
    DATALORA_BUILD_CUDA       0 (or false/off/no) skips the extension; 1 (true/on/yes)
                              requires it: a missing nvcc or a failed compile is an error.
                              Unset (or auto): built when nvcc is found, and a failed
                              build warns and installs without it (the runtime falls back)
    DATALORA_CUDA_ARCHS       e.g. "75;80;90" (default) or "8.0;9.0+PTX": a cubin per arch,
                              PTX for the entries marked +PTX (default: the last one)
    NVCC                      path to nvcc (default: found on PATH, in CUDA_HOME or
                              /usr/local/cuda/bin)
    DATALORA_LOCAL_VERSION    a PEP 440 local version label, e.g. "cu128": the wheel is
                              datalora-<version>+cu128 (one build per CUDA major can then
                              share an index without clashing file names)
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import warnings
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError

ROOT = Path(__file__).parent.resolve()
CSRC = ROOT / "csrc"
SKIP_HINT = "set DATALORA_BUILD_CUDA=0 to install datalora without its CUDA extension"
_FLAGS = {"0": "0", "false": "0", "off": "0", "no": "0",
          "1": "1", "true": "1", "on": "1", "yes": "1", "": "auto", "auto": "auto"}


def _cuda_archs():
    """``datalora/_cuda_archs.py`` loaded by path (importing ``datalora`` needs torch)."""
    spec = importlib.util.spec_from_file_location("_datalora_cuda_archs",
                                                  ROOT / "datalora" / "_cuda_archs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build_flag() -> str:
    """``DATALORA_BUILD_CUDA`` as "0", "1" or "auto"; exits naming it on anything else."""
    raw = os.environ.get("DATALORA_BUILD_CUDA", "auto")
    flag = _FLAGS.get(raw.strip().lower())
    if flag is None:
        sys.exit(f"DATALORA_BUILD_CUDA: expected 0/1 (or false/true, off/on, no/yes, auto), "
                 f"got {raw!r}")
    return flag


def _arch_list() -> tuple[list[str], list[str]]:
    """``(sass, ptx)`` of ``DATALORA_CUDA_ARCHS``; exits with the parser's message."""
    archs = _cuda_archs()
    try:
        return archs.parse_archs(os.environ.get("DATALORA_CUDA_ARCHS", archs.DEFAULT_ARCHS))
    except ValueError as exc:
        sys.exit(str(exc))


def _find_nvcc() -> str | None:
    if os.environ.get("NVCC"):
        return os.environ["NVCC"]
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return None


def _cuda_sources() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cu")) + sorted(
        str(p.relative_to(ROOT)) for p in CSRC.glob("*.cpp")
    )


def _build_info_header(directory: Path, sass: list[str], ptx: list[str]) -> None:
    """``datalora_build_info.h``: the archs compiled in, which ``_C.compiled_archs()``
    reports so the loader can tell a GPU the build has no kernel image for."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "datalora_build_info.h").write_text(
        f'#define DATALORA_SASS_ARCHS "{";".join(sass)}"\n'
        f'#define DATALORA_PTX_ARCHS "{";".join(ptx)}"\n')


def _run(cmd: list[str]) -> None:
    """Runs one nvcc command; a failure raises CompileError with nvcc's own output."""
    print(" ".join(cmd))
    try:
        out = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as exc:  # a bad NVCC= path, nvcc not executable
        raise CompileError(f"could not run {cmd[0]}: {exc}") from None
    sys.stdout.write(out.stdout)
    sys.stderr.write(out.stderr)
    if out.returncode != 0:
        tail = "\n".join((out.stderr or out.stdout).strip().splitlines()[-20:])
        raise CompileError(f"{' '.join(cmd[:3])} ... failed (exit {out.returncode}):\n{tail}")


class NvccBuildExt(build_ext):
    """Compiles every source of the extension with nvcc and links with nvcc. A failure is a
    CompileError saying how to install without the extension; with ``DATALORA_BUILD_CUDA``
    unset the extension is optional, so setuptools warns and installs the rest."""

    def build_extension(self, ext: Extension) -> None:
        try:
            self._build(ext)
        except CompileError as exc:
            if ext.optional:
                message = (f"datalora: building the CUDA extension failed, installing without "
                           f"it (NF4 ops use the torch fallback; DATALORA_BUILD_CUDA=1 makes "
                           f"this an error): {exc}")
            else:
                message = f"datalora: building the CUDA extension failed; {SKIP_HINT}: {exc}"
            raise CompileError(message) from None

    def _build(self, ext: Extension) -> None:
        try:
            import pybind11
        except ImportError:
            raise CompileError("pybind11 is not installed (a build with --no-build-isolation "
                               "uses this environment's packages): pip install "
                               "'pybind11>=2.12'") from None
        nvcc = _find_nvcc()
        sass, ptx = _arch_list()
        gencode = _cuda_archs().gencode_flags(sass, ptx)
        build_temp = Path(self.build_temp)
        _build_info_header(build_temp, sass, ptx)
        includes = [pybind11.get_include(), sysconfig.get_paths()["include"], str(CSRC),
                    str(build_temp)]
        objects = []
        for src in ext.sources:
            obj = build_temp / (Path(src).name + ".o")
            cmd = [nvcc, "-c", src, "-o", str(obj), "-O3", "-std=c++17", "-Xcompiler", "-fPIC",
                   "--expt-relaxed-constexpr", *gencode, *[f"-I{i}" for i in includes]]
            if os.environ.get("DATALORA_PTXAS_VERBOSE") == "1":
                cmd += ["-Xptxas", "-v"]
            _run(cmd)
            objects.append(str(obj))
        out = Path(self.get_ext_fullpath(ext.name))
        out.parent.mkdir(parents=True, exist_ok=True)
        # static cudart: no libcudart.so needed at import, and no driver until a kernel runs
        _run([nvcc, "-shared", "-o", str(out), *objects, "--cudart", "static", *gencode])


def _extensions() -> list[Extension]:
    flag = _build_flag()
    if flag == "0":
        return []
    sources = _cuda_sources()
    if not sources:
        return []
    _arch_list()  # a bad arch list stops the build here, before any compile
    if _find_nvcc() is None:
        if flag == "1":
            sys.exit("DATALORA_BUILD_CUDA=1 but nvcc was not found (set NVCC or CUDA_HOME)")
        warnings.warn("nvcc not found: building datalora without the CUDA extension "
                      "(NF4 ops fall back to Triton/torch)", stacklevel=1)
        return []
    return [Extension("datalora._C", sources=sources, optional=flag == "auto")]


def _version() -> str:
    """``datalora.__version__`` (+ ``DATALORA_LOCAL_VERSION`` as the local label)."""
    text = (ROOT / "datalora" / "__init__.py").read_text()
    version = re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)
    local = os.environ.get("DATALORA_LOCAL_VERSION", "")
    if local and not re.fullmatch(r"[A-Za-z0-9]+(\.[A-Za-z0-9]+)*", local):
        sys.exit(f"DATALORA_LOCAL_VERSION: expected a local version label such as 'cu128', "
                 f"got {local!r}")
    return f"{version}+{local}" if local else version


setup(version=_version(), ext_modules=_extensions(), cmdclass={"build_ext": NvccBuildExt})
