"""``setup.py``'s build flags and build failures, run as ``python setup.py build_ext`` into a
temporary directory with a fake nvcc that logs its arguments and fails (nothing compiles,
each run takes about a second): a failed build says how to install without the extension,
an unset ``DATALORA_BUILD_CUDA`` installs without it, bad flag values stop the build before
any compile with a message naming the variable."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NVCC_ERROR = "nvcc fatal : Host compiler version unsupported"


@pytest.fixture
def fake_nvcc(tmp_path) -> Path:
    """An nvcc that appends its arguments to ``nvcc.log`` beside it and fails like a
    toolkit whose host compiler is too new."""
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.parent.mkdir()
    nvcc.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "nvcc.log"}\necho "{NVCC_ERROR}" >&2\n'
                    f"exit 1\n")
    nvcc.chmod(0o755)
    return nvcc


def _build_ext(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """``setup.py build_ext`` with only the given build variables set."""
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("DATALORA_") and k not in ("NVCC", "CUDA_HOME", "CUDA_PATH")}
    cmd = [sys.executable, "setup.py", "build_ext", "-b", str(tmp_path / "lib"), "-t",
           str(tmp_path / "tmp")]
    return subprocess.run(cmd, cwd=ROOT, env={**clean, **env}, capture_output=True, text=True,
                          timeout=120)


def _built(tmp_path: Path) -> list[Path]:
    return list((tmp_path / "lib").rglob("_C*"))


def _nvcc_ran(tmp_path: Path) -> bool:
    return (tmp_path / "nvcc.log").exists()


# ----------------------------------------------------------------------------- failures
def test_forced_build_that_fails_names_the_switch_to_skip_it(tmp_path, fake_nvcc):
    out = _build_ext(tmp_path, NVCC=str(fake_nvcc), DATALORA_BUILD_CUDA="1")
    assert out.returncode != 0
    assert "set DATALORA_BUILD_CUDA=0 to install datalora without its CUDA extension" in out.stderr
    assert NVCC_ERROR in out.stderr  # nvcc's own reason
    assert "Traceback" not in out.stderr


def test_failed_build_in_auto_mode_installs_without_the_extension(tmp_path, fake_nvcc):
    out = _build_ext(tmp_path, NVCC=str(fake_nvcc))
    assert out.returncode == 0, out.stderr
    assert _nvcc_ran(tmp_path) and not _built(tmp_path)
    assert "installing without it" in out.stderr and NVCC_ERROR in out.stderr
    assert "DATALORA_BUILD_CUDA=1 makes this an error" in out.stderr


def test_nvcc_path_that_does_not_run_is_a_build_failure(tmp_path):
    out = _build_ext(tmp_path, NVCC=str(tmp_path / "missing" / "nvcc"), DATALORA_BUILD_CUDA="1")
    assert out.returncode != 0
    assert f"could not run {tmp_path / 'missing' / 'nvcc'}" in out.stderr
    assert "DATALORA_BUILD_CUDA=0" in out.stderr and "Traceback" not in out.stderr


def test_build_without_pybind11_says_to_install_it(tmp_path, fake_nvcc):
    """``pip install --no-build-isolation`` builds with this environment's packages."""
    shadow = tmp_path / "shadow" / "pybind11"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named "
                                        "'pybind11'\", name='pybind11')\n")
    out = _build_ext(tmp_path, NVCC=str(fake_nvcc), DATALORA_BUILD_CUDA="1",
                     PYTHONPATH=str(shadow.parent))
    assert out.returncode != 0
    assert "pip install 'pybind11>=2.12'" in out.stderr and "--no-build-isolation" in out.stderr
    assert not _nvcc_ran(tmp_path)


@pytest.mark.skipif(not Path("/usr/local/cuda/bin/nvcc").exists(),
                    reason="no CUDA toolkit in /usr/local/cuda")
def test_nvcc_found_in_the_stock_toolkit_directory(tmp_path):
    """Off PATH and without CUDA_HOME, ``/usr/local/cuda/bin/nvcc`` is used (the stub
    pybind11 stops the build before anything compiles)."""
    shadow = tmp_path / "shadow" / "pybind11"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('stub')\n")
    out = _build_ext(tmp_path, PATH="/usr/bin:/bin", DATALORA_BUILD_CUDA="1",
                     PYTHONPATH=str(shadow.parent))
    assert "nvcc was not found" not in out.stderr
    assert "pybind11 is not installed" in out.stderr


# ----------------------------------------------------------------------------- flags
@pytest.mark.parametrize("value", ["true", "ON", "yes", "1"])
def test_build_flag_spellings_that_force_the_build(tmp_path, fake_nvcc, value):
    out = _build_ext(tmp_path, NVCC=str(fake_nvcc), DATALORA_BUILD_CUDA=value)
    assert out.returncode != 0 and "DATALORA_BUILD_CUDA=0" in out.stderr  # forced: fails


@pytest.mark.parametrize("value", ["false", "Off", "no", "0"])
def test_build_flag_spellings_that_skip_the_build(tmp_path, fake_nvcc, value):
    out = _build_ext(tmp_path, NVCC=str(fake_nvcc), DATALORA_BUILD_CUDA=value)
    assert out.returncode == 0, out.stderr
    assert not _nvcc_ran(tmp_path)


@pytest.mark.parametrize("value", ["2", "maybe", "force"])
def test_unknown_build_flag_is_an_error(tmp_path, fake_nvcc, value):
    out = _build_ext(tmp_path, NVCC=str(fake_nvcc), DATALORA_BUILD_CUDA=value)
    assert out.returncode != 0
    assert f"DATALORA_BUILD_CUDA: expected 0/1 (or false/true, off/on, no/yes, auto), got " \
           f"{value!r}" in out.stderr
    assert not _nvcc_ran(tmp_path)


@pytest.mark.parametrize("value", ["compute_80", "80;sm_90", ""])
def test_bad_arch_list_stops_the_build_before_nvcc(tmp_path, fake_nvcc, value):
    out = _build_ext(tmp_path, NVCC=str(fake_nvcc), DATALORA_CUDA_ARCHS=value)
    assert out.returncode != 0
    assert "DATALORA_CUDA_ARCHS: expected" in out.stderr and "Traceback" not in out.stderr
    assert not _nvcc_ran(tmp_path)


def test_arch_list_reaches_nvcc_and_the_build_info(tmp_path, fake_nvcc):
    """``8.0 9.0+PTX`` (torch's spelling) gives the same nvcc flags as ``80;90``, and the
    archs land in the header ``_C.compiled_archs()`` reports."""
    _build_ext(tmp_path, NVCC=str(fake_nvcc), DATALORA_CUDA_ARCHS="8.0 9.0+PTX")
    args = (tmp_path / "nvcc.log").read_text()
    assert ("-gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 "
            "-gencode arch=compute_90,code=compute_90 ") in args
    header = (tmp_path / "tmp" / "datalora_build_info.h").read_text()
    assert '#define DATALORA_SASS_ARCHS "80;90"' in header
    assert '#define DATALORA_PTX_ARCHS "90"' in header


# ----------------------------------------------------------------------------- packaging
def test_every_subpackage_is_listed_for_the_wheel():
    """pyproject lists its packages (kernels/ installs as datalora.kernels), so a new
    subpackage left off the list would be missing from the wheel: every folder of datalora/
    with an ``__init__.py`` must be listed."""
    tomllib = pytest.importorskip("tomllib")
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"])
    found = {".".join(init.parent.relative_to(ROOT).parts)
             for init in (ROOT / "datalora").rglob("__init__.py")}
    assert found and found <= listed, sorted(found - listed)
    assert "datalora.kernels" in listed and (ROOT / "kernels" / "__init__.py").exists()


# ----------------------------------------------------------------------------- install docs
def test_readme_install_table_lists_every_extra_with_its_packages():
    """The README's extras table names each extra of pyproject.toml with what it installs."""
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    readme = (ROOT / "README.md").read_text()
    install = readme[readme.index("## Install"):readme.index("## Quick start")]
    rows = {line.split("|")[1].strip().strip("`"): line.split("|")[2]
            for line in install.splitlines() if line.startswith("| `")}
    assert set(rows) == set(extras)
    for extra, packages in extras.items():
        if extra != "dev":
            assert all(f"`{p}`" in rows[extra] for p in packages), (extra, rows[extra])


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_installs_torch_from_the_index_given():
    """``make TORCH_INDEX=...`` takes the CPU torch from PyTorch's index (plain PyPI serves
    the CUDA build on Linux x86_64); without it pip's own configuration decides."""
    url = "https://download.pytorch.org/whl/cpu"

    def recipe(*args):
        out = subprocess.run(["make", "-n", "-B", ".venv/.datalora-installed", *args], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return next(line for line in out.stdout.splitlines() if "pip install torch" in line)

    assert recipe(f"TORCH_INDEX={url}").split("pip install ")[1].split(";")[0].split() == [
        "torch==2.13.0", "--index-url", url]
    assert "--index-url" not in recipe()


def test_sdist_carries_the_whole_test_suite_and_what_it_imports(tmp_path):
    """An unpacked sdist can run the tests: conftest files, the Triton cases, and the
    ``benchmarks`` package the benchmark tests import are all in it."""
    import tarfile

    # a copy without build products: setuptools adds the files an earlier egg-info's
    # SOURCES.txt lists, which would hide a MANIFEST.in that misses them
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "*.so"))
    out = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)],
                         cwd=src, env={**os.environ, "DATALORA_BUILD_CUDA": "0"},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    (archive,) = tmp_path.glob("datalora-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    wanted = {p.relative_to(ROOT).as_posix()
              for folder in ("tests", "benchmarks") for p in (ROOT / folder).rglob("*.py")
              if "__pycache__" not in p.parts}
    assert {"tests/conftest.py", "tests/triton/conftest.py", "benchmarks/__init__.py"} <= wanted
    assert sorted(wanted - names) == []
    assert {"Makefile", ".ci/run", "LICENSE", "csrc/nf4_kernels.cu"} <= names
