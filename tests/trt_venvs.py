"""Venvs with the real TensorRT Python bindings and cuda-python, for the conformance tests (built and cached by
:mod:`venv_cache`).

The TensorRT bindings wheels (``tensorrt_cu12_bindings``, ``tensorrt_cu13_bindings``: 1.3 MB each) hold the real
``tensorrt_bindings/tensorrt.so``; only the libraries it links (``libnvinfer.so.N``, ``libnvonnxparser.so.N``,
``libnvinfer_plugin.so.N``, hundreds of MB on an index CI cannot count on) are missing. It needs nine symbols from
them, so three tiny C libraries exporting those symbols (returning null or 0), built with the system C compiler
under the right SONAMEs next to ``tensorrt.so`` (its RPATH is ``$ORIGIN``), make ``import tensorrt`` work: every
class, enum, method and docstring can then be inspected, and factories (``trt.Builder(logger)``) raise
``TypeError`` ("factory function returned nullptr"). ``tensorrt`` itself is ``from tensorrt_bindings import *``.

Each venv sees the main environment's packages (``--system-site-packages``: torch, onnx, onnxruntime for the
fakes), and its cache key covers the requirements, the stub sources and the shim.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from venv_cache import pip, venv_python

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


def _run(cmd: list[str], what: str) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{what} failed ({r.returncode}):\n{(r.stdout + r.stderr)[-3000:]}")
    return r.stdout


def install(spec: VenvSpec, python: Path) -> None:
    """pip-install ``spec``'s requirements into the venv of ``python``, then add the stub libraries and the shim."""
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise RuntimeError("the TensorRT conformance venvs need a C compiler (gcc or cc) for the stub libraries")
    pip(python, *spec.requirements)
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     "locating site-packages").strip())
    for lib, source in STUBS.items():
        src = python.parent.parent / f"{lib}.c"
        src.write_text(source + "\n")
        soname = f"{lib}.so.{spec.tensorrt_major}"
        _run([compiler, "-shared", "-fPIC", "-o", str(site / "tensorrt_bindings" / soname), f"-Wl,-soname,{soname}",
              str(src)], f"compiling {soname}")
    (site / "tensorrt").mkdir()
    (site / "tensorrt" / "__init__.py").write_text(SHIM)
    _run([str(python), "-c", "; ".join(f"import {m}" for m in spec.imports)], f"importing {spec.imports}")


def conformance_python(spec: VenvSpec) -> Path:
    """The python of ``spec``'s venv (built on first use, then reused)."""
    key = [*spec.requirements, str(spec.tensorrt_major), *STUBS.values(), SHIM]
    return venv_python(spec.name, key, lambda python: install(spec, python), system_site_packages=True)
