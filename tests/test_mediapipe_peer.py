"""The MediaPipe peer baseline's scripts, without mediapipe: shell syntax, early failures, dry run,
and the photo exporter (one lossless RGB PNG per example id)."""
import importlib.util
import os
import pathlib
import subprocess
import sys

import cv2
import numpy as np
import pytest
from PIL import Image

from fake_data import fake_source

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch" / "mediapipe_peer.sh"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def fake_venvs(tmp_path):
    """A stand-in jaxseg venv (bin/python = this interpreter) and a not-yet-created mediapipe one."""
    jax_venv = tmp_path / "jax-venv"
    (jax_venv / "bin").mkdir(parents=True)
    (jax_venv / "bin" / "python").symlink_to(sys.executable)
    return {"JAXSEG_VENV": str(jax_venv), "MEDIAPIPE_VENV": str(tmp_path / "mp-venv"),
            "MEDIAPIPE_PYTHON": sys.executable, "PATH": os.environ["PATH"],
            "HOME": os.environ.get("HOME", "/tmp")}


def _run(args, env):
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)


def test_syntax_and_help():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    out = subprocess.run(["bash", str(SCRIPT), "-h"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "Usage" in out.stdout


@pytest.mark.parametrize("args, message", [
    (["-m", "portrait"], "unknown model 'portrait'"),
    (["-d", "coco"], "unknown dataset 'coco'"),
    (["-d", "ccp_person", "-o"], "option -o needs a value"),
    (["-x"], "unknown option -x"),
    (["extra"], "unexpected arguments"),
])
def test_bad_arguments_fail_early(fake_venvs, args, message):
    out = _run(args, fake_venvs)
    assert out.returncode == 2
    assert message in out.stderr
    assert "+ " not in out.stdout  # nothing was run
    assert not pathlib.Path(fake_venvs["MEDIAPIPE_VENV"]).exists()


def test_missing_jaxseg_venv_and_shared_venv_fail_early(fake_venvs, tmp_path):
    out = _run([], {**fake_venvs, "JAXSEG_VENV": str(tmp_path / "nowhere")})
    assert out.returncode == 2 and "jaxseg's venv not found" in out.stderr
    out = _run([], {**fake_venvs, "MEDIAPIPE_VENV": fake_venvs["JAXSEG_VENV"]})
    assert out.returncode == 2 and "must not enter jaxseg's venv" in out.stderr


def test_dry_run_prints_every_step_and_runs_none(fake_venvs):
    out = _run(["-n", "-d", "ccp_person,portrait_segmentation", "-m", "landscape", "-o", "/tmp/o"],
               fake_venvs)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith("+ ")]
    mp_python = f"{fake_venvs['MEDIAPIPE_VENV']}/bin/python"
    assert lines[0].startswith(f"+ {sys.executable} -m venv {fake_venvs['MEDIAPIPE_VENV']}")
    assert lines[1].startswith(f"+ {mp_python} -m pip install") and "mediapipe==0.10.21" in lines[1]
    for d in ("ccp_person", "portrait_segmentation"):
        assert any("launch/export_split.py --dataset " + d in line for line in lines)
        assert any(line.startswith(f"+ {mp_python} launch/mediapipe_segment.py") and d in line
                   and "--model landscape" in line for line in lines)
        assert any("-m jaxseg.evaluate --dataset " + d in line
                   and f"--output /tmp/o/mediapipe_landscape_{d}_test.json" in line for line in lines)
    assert not pathlib.Path(fake_venvs["MEDIAPIPE_VENV"]).exists()


def test_export_split_writes_one_lossless_rgb_png_per_id(tmp_path, monkeypatch):
    import jaxseg.datasets

    source = fake_source(4, seed=3)
    calls = []

    def fake_data_source(name, split, **kwargs):
        calls.append((name, split))
        return source

    monkeypatch.setattr(jaxseg.datasets, "data_source", fake_data_source)
    export_split = _load("export_split")
    out = tmp_path / "images"
    assert export_split.main(["--dataset", "ccp_person", "--split", "test", "--out", str(out)]) == 0
    assert calls == [("ccp_person", "test")]
    ids = [ex["id"] for ex in source]
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{i}.png" for i in ids] + ["ids.txt"])
    assert (out / "ids.txt").read_text().split() == ids
    for ex in source:
        written = cv2.imread(str(out / f"{ex['id']}.png"), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(written[..., ::-1], ex["image"])  # BGR on disk = RGB source

    # --limit, and the segmenter reads the same id list (without needing mediapipe)
    assert export_split.export(source, tmp_path / "two", limit=2) == ids[:2]
    assert _load("mediapipe_segment").list_ids(tmp_path / "two") == ids[:2]


def test_export_split_and_segment_read_and_write_under_a_non_utf8_folder(tmp_path, monkeypatch,
                                                                          capsys):
    # OpenCV's imread/imwrite crash the process on such a path; both scripts hand it bytes. And
    # the summary line names the folder escaped, not with an encoding error after the work.
    import jaxseg.datasets

    folder = tmp_path / os.fsdecode(b"caf\xe9")  # Latin-1 'café', not UTF-8
    source = fake_source(2, seed=5)
    monkeypatch.setattr(jaxseg.datasets, "data_source", lambda *args, **kwargs: source)
    assert _load("export_split").main(["--dataset", "ccp_person", "--out", str(folder)]) == 0
    assert "caf\\udce9" in capsys.readouterr().out
    ids = [ex["id"] for ex in source]
    segment = _load("mediapipe_segment")
    assert segment.list_ids(folder) == ids
    for ex in source:
        np.testing.assert_array_equal(segment.read_bgr(folder / f"{ex['id']}.png")[..., ::-1],
                                      ex["image"])
    mask = np.where(np.arange(12).reshape(3, 4) % 2, 255, 0).astype(np.uint8)
    segment.write_png(folder / "mask.png", mask)
    np.testing.assert_array_equal(np.asarray(Image.open(folder / "mask.png")), mask)
    (folder / "broken.png").write_bytes(b"not a png")
    assert segment.read_bgr(folder / "broken.png") is None
    assert segment.read_bgr(folder / "missing.png") is None


def test_export_split_and_segment_refuse_bad_arguments_in_one_line(tmp_path, capsys):
    export_split = _load("export_split")
    with pytest.raises(SystemExit, match="^export_split.py: unknown dataset 'nope'"):
        export_split.main(["--dataset", "nope", "--out", str(tmp_path / "out")])
    for script in ("export_split", "mediapipe_segment"):
        for limit in ("0", "-1"):  # [:-1] would drop the last photo without a word
            with pytest.raises(SystemExit):
                _load(script).main(["--dataset" if script == "export_split" else "--images", "x",
                                    "--out", str(tmp_path / "out"), "--limit", limit])
            assert "--limit must be at least 1" in capsys.readouterr().err.replace(":", "")
    assert not (tmp_path / "out").exists()


def test_export_split_rejects_ids_that_are_not_file_names(tmp_path):
    export_split = _load("export_split")
    good = fake_source(1)[0]
    for bad_id in ("../escape", ".", " lead", "two\nlines"):
        with pytest.raises(ValueError, match="not usable as a file name"):
            export_split.export([good, dict(good, id=bad_id)], tmp_path / "out")
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    # person_folder ids with spaces or accents are file names.
    named = [dict(good, id="my photo"), dict(good, id="café")]
    assert export_split.export(named, tmp_path / "named") == ["my photo", "café"]
    assert (tmp_path / "named" / "café.png").is_file()


def test_export_split_exports_the_split_and_data_dir_it_is_given(tmp_path, monkeypatch):
    import jaxseg.datasets

    source = fake_source(3, seed=7)
    calls = []

    def fake_data_source(name, split, **kwargs):
        calls.append((name, split, kwargs))
        return source

    monkeypatch.setattr(jaxseg.datasets, "data_source", fake_data_source)
    export_split = _load("export_split")
    out = tmp_path / "images"
    assert export_split.main(["--dataset", "portrait_segmentation", "--split", "validation",
                              "--data_dir", str(tmp_path / "dd"), "--out", str(out)]) == 0
    assert calls == [("portrait_segmentation", "validation", {"data_dir": str(tmp_path / "dd")})]
    # A --limit of the split's size or more exports all of it.
    ids = [ex["id"] for ex in source]
    for limit in (3, 10):
        assert export_split.export(source, tmp_path / f"limit{limit}", limit=limit) == ids
        assert (tmp_path / f"limit{limit}" / "ids.txt").read_text().split() == ids
