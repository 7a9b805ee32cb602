"""No command deletes or overwrites a file it did not write: a build or calibration folder that holds anything else
is refused before any work (one line naming it, exit 2) and left byte for byte as it was; a previous build of ours
is replaced atomically."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dynaip_trt.errors import OutputError
from dynaip_trt.files import claim_dir, foreign_entries
from dynaip_trt.manifest import MANIFEST_FILE, Manifest
from calibration import collect as calibration_collect
from export import onnx as export_onnx
from export.exporter import export_all

from conftest import captured_logs, working_directory


def snapshot(root: Path) -> dict[str, object]:
    """Every entry under ``root``: file bytes, symlink targets, folders (symlinks not followed)."""
    out: dict[str, object] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = p.read_bytes()
    return out


names = st.text(alphabet="abcxyz019_-.", min_size=1, max_size=8).filter(lambda n: n not in (".", ".."))
trees = st.lists(st.tuples(st.lists(names, min_size=1, max_size=3), st.binary(max_size=16)), min_size=1, max_size=6)


def write_tree(root: Path, tree: list[tuple[list[str], bytes]]) -> None:
    for parts, data in tree:
        path = root.joinpath(*parts)
        if any(p.exists() and not p.is_dir() for p in path.parents if root in p.parents) or path.is_dir():
            continue  # a generated file where a folder was generated (or the reverse): skip the clash
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=trees, with_build=st.booleans())
def test_export_refuses_any_folder_with_foreign_files_and_changes_nothing(tmp_path_factory, tiny_build, tree,
                                                                          with_build):
    root = tmp_path_factory.mktemp("out")
    if with_build:  # a previous build of ours with the user's files added to it
        shutil.copytree(tiny_build, root, dirs_exist_ok=True)
    write_tree(root, tree)
    before = snapshot(root)
    assert foreign_entries(root, Manifest.owned_files(root)), "the generated tree must hold a foreign file"
    with captured_logs("export.onnx") as messages:
        rc = export_onnx.main(["--engine-dir", str(root), "--models", "vae"])
    assert rc == 2
    assert len(messages) == 1 and f"--engine-dir {root}" in messages[0] and "did not write" in messages[0]
    assert snapshot(root) == before


def test_dot_and_parent_folders_are_refused(tmp_path):
    project = tmp_path / "project"
    (project / "sub").mkdir(parents=True)
    (project / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    with working_directory(project / "sub"):
        (project / "sub" / "keep.py").write_text("x = 1")
        before = snapshot(tmp_path)
        for out in (".", ".."):
            with captured_logs("export.onnx") as messages:
                assert export_onnx.main(["--engine-dir", out]) == 2
            assert "did not write" in messages[0] and f"--engine-dir {out}" in messages[0]
    assert snapshot(tmp_path) == before


def test_symlink_to_a_user_folder_is_refused_and_a_symlink_to_a_build_is_followed(tmp_path, tiny_build):
    user = tmp_path / "models"
    user.mkdir()
    (user / "flux.safetensors").write_bytes(b"weights")
    link = tmp_path / "link"
    link.symlink_to(user)
    before = snapshot(tmp_path)
    with pytest.raises(OutputError, match="flux.safetensors"):
        claim_dir(link, Manifest.owned_files, "out_dir")
    assert export_onnx.main(["--engine-dir", str(link)]) == 2
    assert snapshot(tmp_path) == before

    build = tmp_path / "build"
    shutil.copytree(tiny_build, build)
    (tmp_path / "to_build").symlink_to(build)
    assert claim_dir(tmp_path / "to_build", Manifest.owned_files, "out_dir") == build.resolve()


def test_a_previous_build_is_replaced_and_a_foreign_file_inside_it_is_refused(tmp_path, tiny_build, tiny_models):
    build = tmp_path / "build"
    shutil.copytree(tiny_build, build)
    (build / "engine_plan.json").write_text("{}")  # a build-side file of ours
    export_all(build, models=tiny_models, names=("text",), progress=False)
    assert set(Manifest.load(build).models) == {"text"} and not (build / "engine_plan.json").exists()
    assert (build / "tokenizer").is_dir()
    (build / "tokenizer" / "my_vocab.txt").write_text("user data")
    before = snapshot(build)
    with pytest.raises(OutputError, match="tokenizer/my_vocab.txt"):
        export_all(build, models=tiny_models, names=("vae",), progress=False)
    assert snapshot(build) == before


def test_empty_and_new_folders_are_accepted(tmp_path):
    (tmp_path / "empty").mkdir()
    assert claim_dir(tmp_path / "empty", Manifest.owned_files, "x") == (tmp_path / "empty").resolve()
    assert claim_dir(tmp_path / "new" / "deeper", Manifest.owned_files, "x") == (tmp_path / "new/deeper").resolve()
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is not a folder"):
        claim_dir(tmp_path / "file", Manifest.owned_files, "--out file")


def test_tampered_manifest_makes_every_file_foreign(tmp_path, tiny_build):
    build = tmp_path / "build"
    shutil.copytree(tiny_build, build)
    (build / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(OutputError, match="did not write"):
        claim_dir(build, Manifest.owned_files, "out_dir")


def test_calibration_folder_with_user_files_is_refused_before_any_work(tmp_path):
    calib = tmp_path / "calib"
    calib.mkdir()
    (calib / "amax.json").write_text('{"mine": true}')  # same name as ours, not ours: must not be overwritten
    before = snapshot(calib)
    with captured_logs("calibration.collect") as messages:
        assert calibration_collect.main(["--calib", str(calib), "--samples", "1"]) == 2
    assert f"--calib {calib}" in messages[0] and "amax.json" in messages[0]
    assert snapshot(calib) == before
