"""The one-way architecture (docs/architecture.md), read from the source: every ``import`` statement of every module,
at module level or inside a function, resolved to the module it names.

- the contract modules of ``dynaip_trt`` import only the standard library, numpy, PIL, tqdm, tokenizers (and
  cuda-python, lazily) and each other;
- model code never imports ``export``, ``calibration`` or ``runtime``;
- ``calibration`` imports only ``dynaip_trt``; ``export`` imports ``dynaip_trt`` and ``calibration``, never ``runtime``;
- ``runtime`` imports only the contract, except ``runtime.torch_backend`` (model code) and what only it imports;
- no module imports a module that imports it back, directly or through others.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dynaip_trt", "export", "calibration", "runtime")
CONTRACT = {f"dynaip_trt.{m}" for m in ("errors", "configs", "files", "manifest", "images", "request", "sampling",
                                         "text", "metrics", "conditioning", "cli", "tensorrt_api", "dbim",
                                         "demo", "demo.world", "demo.verdicts")} | {"dynaip_trt"}
CONTRACT_THIRD_PARTY = {"numpy", "PIL", "tqdm", "tokenizers", "cuda"}
HEAVY = {"torch", "diffusers", "transformers", "safetensors", "onnx", "onnxscript", "polygraphy", "modelopt"}
# runtime modules that run PyTorch: the torch backend and the CUDA-graph helpers only it uses
RUNTIME_TORCH = {"runtime.torch_backend", "runtime.cuda_graphs"}
# optional real-image metrics of the evaluation (CLIP, DINO through transformers), imported only when asked for
RUNTIME_OPTIONAL = {"runtime.similarity"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute names; ``from x import y`` counts ``x`` and ``x.y`` when that is a
    module of this repository)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            found.add(mod)
            found |= {f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in MODULES}
    return found


MODULES = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
GRAPH = {m: {i for i in imports_of(p) if i in MODULES and i != m} for m, p in MODULES.items()}
EXTERNAL = {m: {i.split(".")[0] for i in imports_of(p)} - set(PACKAGES) for m, p in MODULES.items()}


def top(module: str) -> str:
    return module.split(".")[0]


def test_the_source_tree_is_what_the_rules_describe():
    assert {"dynaip_trt.manifest", "runtime.engine", "export.build", "calibration.collect"} <= set(MODULES)
    assert CONTRACT <= set(MODULES), sorted(CONTRACT - set(MODULES))
    assert "torch" in EXTERNAL["dynaip_trt.models"] and "runtime.sampler" in GRAPH["runtime.engine"]


@pytest.mark.parametrize("module", sorted(CONTRACT))
def test_contract_modules_are_lean(module):
    stdlib = set(sys.stdlib_module_names)
    third_party = EXTERNAL[module] - stdlib
    assert third_party <= CONTRACT_THIRD_PARTY, f"{module} imports {sorted(third_party - CONTRACT_THIRD_PARTY)}"
    inner = {i for i in GRAPH[module] if top(i) in PACKAGES}
    assert inner <= CONTRACT, f"{module} imports {sorted(inner - CONTRACT)} (not contract modules)"


def test_model_code_imports_no_layer_above_it():
    bad = {m: sorted(i for i in GRAPH[m] if top(i) in ("export", "calibration", "runtime"))
           for m in MODULES if top(m) == "dynaip_trt"}
    assert not {m: v for m, v in bad.items() if v}


def test_calibration_and_export_depend_one_way():
    for m in MODULES:
        targets = {top(i) for i in GRAPH[m]}
        if top(m) == "calibration":
            assert targets <= {"dynaip_trt", "calibration"}, (m, targets)
        if top(m) == "export":
            assert "runtime" not in targets, f"{m} imports the runtime (the writer must not import the reader)"


def test_runtime_needs_only_the_contract():
    for m in MODULES:
        if top(m) != "runtime":
            continue
        inner = {i for i in GRAPH[m] if top(i) == "dynaip_trt"}
        if m == "runtime.torch_backend":
            continue  # the torch backend runs the model code
        assert inner <= CONTRACT, f"{m} imports model code {sorted(inner - CONTRACT)}"
        assert not {top(i) for i in GRAPH[m]} & {"export", "calibration"}, m
        if m in RUNTIME_OPTIONAL:
            assert EXTERNAL[m] & HEAVY <= {"torch", "transformers"}, f"{m} imports {sorted(EXTERNAL[m] & HEAVY)}"
            continue
        if m not in RUNTIME_TORCH:
            assert not EXTERNAL[m] & (HEAVY - {"torch"}), f"{m} imports {sorted(EXTERNAL[m] & HEAVY)}"
        if m not in RUNTIME_TORCH | {"runtime.benchmark"}:  # the benchmark times torch rows on request
            assert "torch" not in EXTERNAL[m], f"{m} is on the lean path and imports torch"
    users = {m for m in MODULES if "runtime.cuda_graphs" in GRAPH[m]}
    assert users <= RUNTIME_TORCH, f"only the torch backend uses the torch CUDA-graph helpers, not {users}"


def test_no_module_imports_a_module_that_imports_it_back():
    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in GRAPH[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    cycles = sorted(m for m in MODULES if m in reachable(m))
    assert not cycles, f"import cycles through {cycles}"


def test_importing_the_runtime_and_generating_with_onnxruntime_loads_no_torch(tiny_build, tmp_path):
    """The lean path for real: a fresh interpreter imports the runtime, generates from the tiny build with ONNX
    Runtime, and never loads torch, diffusers or transformers; ``--help`` of the CLI neither."""
    code = (
        "import sys\n"
        "from runtime import DynaIPEngine\n"
        f"engine = DynaIPEngine.from_dir({str(tiny_build)!r}, backend='onnxruntime')\n"
        f"engine.generate('a photo', [{str(ROOT / 'examples' / 'subject_a.png')!r}], steps=2)\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules)\n"
        "print('loaded:', ','.join(heavy))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "loaded:", run.stdout
    code = ("import sys, runpy\nsys.argv = ['runtime.generate', '--help']\n"
            "try:\n    runpy.run_module('runtime.generate', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('loaded:', ','.join(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert run.stdout.strip().endswith("loaded:"), run.stdout[-300:]
