"""Cached virtual environments with the real TensorRT Python bindings and cuda-python, for the conformance tests.

The TensorRT bindings wheels (``tensorrt_cu12_bindings``, ``tensorrt_cu13_bindings``: 1.3 MB each) hold the real
``tensorrt_bindings/tensorrt.so``; only the libraries it links (``libnvinfer.so.N``, ``libnvonnxparser.so.N``,
``libnvinfer_plugin.so.N``, hundreds of MB on an index CI cannot count on) are missing. It needs nine symbols from
them, so three tiny C libraries exporting those symbols (returning null or 0), built with the system C compiler
under the right SONAMEs next to ``tensorrt.so`` (its RPATH is ``$ORIGIN``), make ``import tensorrt`` work: every
class, enum, method and docstring can then be inspected, and factories (``trt.Builder(logger)``) raise
``TypeError`` ("factory function returned nullptr"). ``tensorrt`` itself is ``from tensorrt_bindings import *``.

Each venv is created with ``--system-site-packages`` (the project's own dependencies stay visible), built in a
temporary folder and renamed into ``<cache>/<name>-<key>`` when complete, where the key hashes the Python version,
the requirements and the stub sources: a change rebuilds it, an interrupted build leaves nothing behind. The cache
is ``$DYNAIP_TRT_VENV_CACHE`` or ``~/.cache/dynaip-trt/venvs``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

BUILDER_VERSION = 1  # bump to rebuild every cached venv

# library -> C source exporting the symbols tensorrt.so needs from it (nm -D --undefined-only)
STUBS = {
    "libnvinfer": "\n".join([
        "void *createInferBuilder_INTERNAL(void *logger, int version) { return 0; }",
        "void *createInferRefitter_INTERNAL(void *engine, void *logger, int version) { return 0; }",
        "void *createInferRuntime_INTERNAL(void *logger, int version) { return 0; }",
        "void *getBuilderPluginRegistry(int capability) { return 0; }",
        "void *getPluginRegistry(void) { return 0; }"]),
    "libnvonnxparser": "\n".join([
        "void *createNvOnnxParser_INTERNAL(void *network, void *logger, int version) { return 0; }",
        "void *createNvOnnxParserRefitter_INTERNAL(void *refitter, void *logger, int version) { return 0; }",
        "int getNvOnnxParserVersion(void) { return 0; }"]),
    "libnvinfer_plugin": "int initLibNvInferPlugins(void *logger, const char *ns) { return 0; }",
}
SHIM = "from tensorrt_bindings import *  # noqa: F401,F403\nfrom tensorrt_bindings import __version__  # noqa: F401\n"
NETWORK_ERRORS = re.compile(r"NewConnectionError|Temporary failure in name resolution|Network is unreachable|"
                            r"ConnectionError|ProxyError|Could not fetch URL|timed out|Max retries exceeded")


@dataclass(frozen=True)
class VenvSpec:
    """One conformance venv: its name, TensorRT major version (the stub SONAMEs) and what pip installs."""

    name: str
    tensorrt_major: int
    requirements: tuple[str, ...]
    imports: tuple[str, ...]  # modules that must import once it is built


SPECS = {
    "trt10-cu12": VenvSpec("trt10-cu12", 10, ("tensorrt_cu12_bindings==10.8.0.43", "cuda-python==12.9.10"),
                           ("tensorrt", "cuda.bindings.runtime")),
    "trt11-cu13": VenvSpec("trt11-cu13", 11, ("tensorrt_cu13_bindings==11.4.0.106",
                                              "tensorrt-lean-cu13==11.4.0.106", "cuda-python==13.4.4"),
                           ("tensorrt", "tensorrt_lean", "cuda.bindings.runtime")),
}


class VenvUnavailable(Exception):
    """The venv cannot be built here for a reason outside the project (no package index, no C compiler)."""


def cache_root() -> Path:
    return Path(os.environ.get("DYNAIP_TRT_VENV_CACHE") or Path.home() / ".cache" / "dynaip-trt" / "venvs")


def venv_key(spec: VenvSpec) -> str:
    payload = {"python": sys.version, "executable": sys.executable, "spec": [spec.tensorrt_major,
               list(spec.requirements)], "stubs": STUBS, "shim": SHIM, "builder": BUILDER_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _run(cmd: list[str], what: str, timeout: int = 600) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode:
        out = (r.stdout + r.stderr)[-3000:]
        if NETWORK_ERRORS.search(out):
            raise VenvUnavailable(f"{what}: the package index is unreachable ({out.strip().splitlines()[-1]})")
        raise RuntimeError(f"{what} failed ({r.returncode}):\n{out}")
    return r.stdout


def ensure_venv(spec: VenvSpec) -> Path:
    """The python executable of ``spec``'s venv, built first if the cache has no complete one for its key."""
    root = cache_root()
    final = root / f"{spec.name}-{venv_key(spec)}"
    if (final / "READY").is_file():
        return final / "bin" / "python"
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise VenvUnavailable("no C compiler (gcc or cc) to build the TensorRT stub libraries")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=root))
    try:
        _run([sys.executable, "-m", "venv", "--system-site-packages", str(tmp)], "python -m venv")
        python = tmp / "bin" / "python"
        _run([str(python), "-m", "pip", "install", "--no-input", "--disable-pip-version-check", "-q",
              *spec.requirements], f"pip install {' '.join(spec.requirements)}")
        site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         "locating site-packages").strip())
        for lib, source in STUBS.items():
            src = tmp / f"{lib}.c"
            src.write_text(source + "\n")
            soname = f"{lib}.so.{spec.tensorrt_major}"
            _run([compiler, "-shared", "-fPIC", "-o", str(site / "tensorrt_bindings" / soname),
                  f"-Wl,-soname,{soname}", str(src)], f"compiling {soname}")
        (site / "tensorrt").mkdir()
        (site / "tensorrt" / "__init__.py").write_text(SHIM)
        _run([str(python), "-c", "; ".join(f"import {m}" for m in spec.imports)], f"importing {spec.imports}")
        (tmp / "READY").write_text(json.dumps({"requirements": spec.requirements}))
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished the same venv first
            if not (final / "READY").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final / "bin" / "python"
