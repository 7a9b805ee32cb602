"""Every command line answers ``--help`` and rejects bad arguments, files and output paths before loading any model
(no torch is imported by then), with one line naming the problem in CLI terms and exit 2; an OS error (read-only
place, a path under a file, a full disk) is one line with the path and the reason, never a traceback.

Timings are not asserted here: ``python -m runtime.startup_benchmark`` measures them.
"""

from __future__ import annotations

import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from dynaip_trt.cli import MARKER, written_image
from dynaip_trt.configs import DEFAULT_CONFIG, get_config

ROOT = Path(__file__).resolve().parents[1]
STEP = get_config(DEFAULT_CONFIG).pixel_multiple  # image sides of the default config are multiples of it
REF = str(ROOT / "examples" / "subject_a.png")
CLIS = ("runtime.generate", "runtime.benchmark", "export.onnx", "export.build", "export.parity",
        "calibration.collect", "calibration.quantize", "runtime.serve", "runtime.loadtest", "runtime.serve_benchmark")
PROBE = ("import runpy, sys\n"
         "sys.argv = [sys.argv[1], *sys.argv[2:]]\n"
         "code = 0\n"
         "try:\n"
         "    code = runpy.run_module(sys.argv[0], run_name='__main__') and 0\n"
         "except SystemExit as e:\n"
         "    code = e.code\n"
         "print('TORCH' if 'torch' in sys.modules else 'LEAN', code)\n")


def probe(module: str, *args: str, cwd: Path = ROOT, **kw) -> tuple[str, int, str]:
    """Run ``python -m module args`` through a wrapper that reports whether torch was imported; returns
    (``"LEAN"`` or ``"TORCH"``, exit code, stderr)."""
    run = subprocess.run([sys.executable, "-c", PROBE, module, *args], capture_output=True, text=True, cwd=cwd,
                         **kw)
    loaded, code = run.stdout.strip().splitlines()[-1].split()
    return loaded, int(code), run.stderr


@pytest.mark.parametrize("module", CLIS)
def test_help_loads_no_model_code(module):
    loaded, code, _ = probe(module, "--help")
    assert (loaded, code) == ("LEAN", 0)


def one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


GENERATE = ("--prompt", "a photo", "--ref", REF)


@pytest.mark.parametrize("args, message", [
    (("--prompt", "x", "--ref", "missing.png", "--out", "o.png"), "--ref missing.png: image file missing.png does not"),
    ((*GENERATE, "--out", "o.png", "--engine-dir", "no-such-build"), "--engine-dir no-such-build: the build folder "
                                                                      "does not exist"),
    ((*GENERATE, "--out", "/proc/dynaip.png"), "--out /proc/dynaip.png: cannot write there"),
    ((*GENERATE, "--out", "/dev/full"), "--out /dev/full exists and is not a regular file"),
    ((*GENERATE, "--out", "afile/o.png"), "--out afile/o.png: cannot write there (not a folder)"),
    ((*GENERATE, "--out", "nodir/o.png"), "--out nodir/o.png: cannot write there (no such folder)"),
    ((*GENERATE, "--out", "o.xyz"), "unknown image suffix '.xyz'"),
    ((*GENERATE, "--out", "o.png", "--scale", "nan"), "--scale nan must be a finite number in [0, 10]"),
    ((*GENERATE, "--out", "o.png", "--steps", "0"), "--steps 0 must be in [1, 1000]"),
    ((*GENERATE, "--out", "o.png", "--height", "50"), f"--height 50 must be a multiple of {STEP} in [{STEP}, 4096]"),
    ((*GENERATE, "--out", "o.png", "--granularity", "1,2"), "--granularity has 2 values; this model has 3 levels"),
    ((*GENERATE, "--out", "o.png", "--backend", "onnxruntime"), "give --engine-dir, or leave out --backend"),
    ((*GENERATE, "--out", "o.png", "--precision", "fp16"), "--precision applies to a build folder"),
    ((*GENERATE, "--out", "o.png", "--base", "nowhere", "--clip", "nowhere"), "--base nowhere: no such folder"),
    ((*GENERATE, "--out", "mine.png"), "--out mine.png exists and was not written by dynaip-trt"),
])
def test_generate_rejects_bad_input_before_loading_anything(tmp_path, args, message):
    (tmp_path / "afile").write_text("a regular file")
    Image.new("RGB", (8, 8)).save(tmp_path / "mine.png")  # the user's image: never overwritten
    loaded, code, stderr = probe("runtime.generate", *args, cwd=tmp_path)
    assert (loaded, code) == ("LEAN", 2)
    assert message in one_error_line(stderr)
    assert Image.open(tmp_path / "mine.png").size == (8, 8)


def test_generate_in_a_build_checks_precision_and_backend_in_cli_terms(tiny_build, tmp_path):
    loaded, code, stderr = probe("runtime.generate", *GENERATE, "--out", "o.png", "--engine-dir", str(tiny_build),
                                 "--precision", "bf16", cwd=tmp_path)
    assert (loaded, code) == ("LEAN", 2)
    line = one_error_line(stderr)
    assert "--precision bf16" in line and "use --precision fp32" in line
    _, code, stderr = probe("runtime.generate", *GENERATE, "--out", "o.png", "--engine-dir", str(tiny_build),
                            "--backend", "tensorrt", cwd=tmp_path)
    assert code == 2 and "no TensorRT engines" in one_error_line(stderr)


@pytest.mark.parametrize("module, args, message", [
    ("export.onnx", ("--engine-dir", "user", "--models", "vae"), "--engine-dir user already holds files"),
    ("export.onnx", ("--models", "unet"), "--models: unknown model ['unet']"),
    ("export.onnx", ("--base", "nowhere", "--clip", "x"), "--base nowhere: no such folder"),
    ("export.onnx", ("--base", "nowhere"), "--base and --clip must be given together"),
    ("export.build", ("--precision", "int4"), "--precision 'int4' is unknown"),
    ("export.build", ("--precision", "fp16", "--skip-export", "--engine-dir", "none"), "--engine-dir none: the build "
                                                                                       "folder does not exist"),
    ("export.build", ("--precision", "fp8", "--calib", "user"), "--calib user already holds files"),
    ("export.parity", ("--engine-dir", "user"), "--engine-dir user is not a build folder"),
    ("export.parity", ("--engine-dir", "none", "--json", "/proc/r.json"), "--json /proc/r.json: cannot write there"),
    ("calibration.collect", ("--calib", "user"), "--calib user already holds files"),
    ("calibration.quantize", ("--calib", "user"), "--calib user has no amax.json"),
    ("runtime.benchmark", ("--backends", "torch-compiled"), "--backends: unknown ['torch-compiled']"),
    ("runtime.benchmark", ("--json", "afile/b.json"), "--json afile/b.json: cannot write there (not a folder)"),
])
def test_other_commands_reject_bad_input_before_loading_anything(tmp_path, module, args, message):
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("mine")
    (tmp_path / "afile").write_text("a regular file")
    loaded, code, stderr = probe(module, *args, cwd=tmp_path)
    assert (loaded, code) == ("LEAN", 2), stderr
    assert message in one_error_line(stderr)
    assert (tmp_path / "user" / "notes.txt").read_text() == "mine"


def test_a_full_disk_while_writing_is_one_line_and_leaves_nothing(tiny_build, tmp_path):
    """RLIMIT_FSIZE makes any write past 64 bytes fail with EFBIG, as a full disk fails with ENOSPC: the generation
    runs, the image cannot be written, and the user gets the path and the reason."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))

    run = subprocess.run([sys.executable, "-m", "runtime.generate", *GENERATE, "--engine-dir", str(tiny_build),
                          "--steps", "1", "--out", str(tmp_path / "o.png")], capture_output=True, text=True,
                         cwd=ROOT, preexec_fn=limit)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    errors = [ln for ln in run.stderr.splitlines() if ln.startswith("ERROR")]
    assert errors == [f"ERROR runtime.generate: --out {tmp_path / 'o.png'}: cannot write it (File too large); "
                      f"nothing was written"]
    assert list(tmp_path.iterdir()) == []


def test_our_own_image_may_be_replaced_and_a_comma_in_a_path_is_one_file(tiny_build, tmp_path):
    ref = tmp_path / "a,b.png"
    shutil.copy(REF, ref)
    out = tmp_path / "o.png"
    for _ in range(2):  # the second run replaces the first run's image
        run = subprocess.run([sys.executable, "-m", "runtime.generate", "--prompt", "x", "--ref", str(ref),
                              "--view", REF, "--engine-dir", str(tiny_build), "--steps", "1", "--out", str(out)],
                             capture_output=True, text=True, cwd=ROOT)
        assert run.returncode == 0, run.stderr
    assert written_image(out) and Image.open(out).info["Software"] == MARKER


def test_log_lines_in_a_file_stay_whole(tiny_build, tmp_path):
    """Written to a file, log lines never glue onto a progress bar (no carriage returns, each line a record)."""
    log = tmp_path / "run.log"
    with open(log, "w") as f:
        run = subprocess.run([sys.executable, "-m", "runtime.generate", *GENERATE, "--engine-dir", str(tiny_build),
                              "--out", str(tmp_path / "o.png"), "-v"], stderr=f, cwd=ROOT)
    assert run.returncode == 0
    text = log.read_text()
    assert "\r" not in text
    assert all(line.split(" ", 1)[0] in ("DEBUG", "INFO", "WARNING") for line in text.splitlines() if line)
