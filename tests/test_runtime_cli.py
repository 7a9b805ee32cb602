"""``python -m runtime.generate``: images from the torch default and from a build directory, atomic output,
clear errors with exit status 2 and no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from runtime import DynaIPEngine
from runtime.generate import main

ROOT = Path(__file__).resolve().parents[1]
REFS = [str(ROOT / "examples" / "subject_a.png"), str(ROOT / "examples" / "subject_b.png")]


def cli(*args: str) -> list[str]:
    return ["--prompt", "two friends at the beach", "--ref", REFS[0], "--ref", REFS[1], *args]


def test_cli_build_dir_writes_the_engine_image(tiny_build, tmp_path):
    out = tmp_path / "sub" / "out.png"
    out.parent.mkdir()
    assert main(cli("--out", str(out), "--engine-dir", str(tiny_build), "--seed", "3", "--scale", "0.7",
                    "--scale", "1.2", "--granularity", "0.2,0.3,0.5", "--steps", "3")) == 0
    engine = DynaIPEngine.from_dir(tiny_build, backend="onnxruntime")
    expected = engine.generate("two friends at the beach", REFS, seed=3, scales=[0.7, 1.2],
                               granularity=[0.2, 0.3, 0.5], steps=3)[0]
    written = Image.open(out)
    assert written.size == expected.size
    assert np.array_equal(np.asarray(written), np.asarray(expected))
    assert [p.name for p in out.parent.iterdir()] == ["out.png"], "temporary files left behind"
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


def test_cli_torch_default_and_bad_input_keeps_previous_output(tmp_path):
    out = tmp_path / "out.png"
    assert main(cli("--out", str(out), "--steps", "2", "--height", "64", "--width", "48")) == 0
    assert Image.open(out).size == (48, 64)
    before = out.read_bytes()
    assert main(cli("--out", str(out), "--height", "50")) == 2  # not a multiple of 16
    assert main(cli("--out", str(out), "--scale", "1", "--scale", "2", "--scale", "3")) == 2  # 3 scales, 2 subjects
    assert main(cli("--out", str(out), "--granularity", "a,b")) == 2
    assert main(cli("--out", str(tmp_path / "out.xyz"))) == 2
    assert main(cli("--out", str(out), "--backend", "onnxruntime")) == 2  # needs --engine-dir
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


def test_cli_module_error_is_one_line_exit_2(tmp_path):
    run = subprocess.run([sys.executable, "-m", "runtime.generate", *cli("--out", str(tmp_path / "o.png"),
                                                                          "--engine-dir", str(tmp_path / "none"))],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 2
    assert "the build folder does not exist" in run.stderr and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.png").exists()
