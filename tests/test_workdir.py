"""Workdirs keep storage URLs intact (pathlib would collapse gs://b/run into the folder gs:/b/run)."""
import os

from jaxseg.workdir import local_folder_problem, local_output_folder, workdir_path


def test_url_workdirs_stay_urls():
    path = workdir_path("gs://bucket/jaxseg/run1")
    assert os.fspath(path / "checkpoints") == "gs://bucket/jaxseg/run1/checkpoints"


def test_local_workdirs_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert os.fspath(workdir_path("runs/a")) == os.fspath(tmp_path / "runs" / "a")


def test_local_folder_problem(tmp_path):
    assert local_folder_problem(workdir_path(tmp_path / "a" / "b")) is None
    assert (tmp_path / "a" / "b").is_dir()  # made
    (tmp_path / "file").write_text("")
    assert local_folder_problem(workdir_path(tmp_path / "file" / "x")).startswith(
        "cannot create it (Not a directory")
    assert local_folder_problem(workdir_path("gs://bucket/run")) is None  # left to the storage


def test_an_output_folder_with_a_tilde_is_under_home(tmp_path, monkeypatch):
    """--output=~/out reaches the program unexpanded: it made a folder named '~' here."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert local_output_folder("~/out") == tmp_path / "home" / "out"
