"""Workdirs keep storage URLs intact (pathlib would collapse gs://b/run into the folder gs:/b/run)."""
import errno
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pytest
from etils import epath

import fixtures_data as fx
from jaxseg import workdir
from jaxseg.workdir import (WorkdirBusy, complete_or_absent, local_folder_problem,
                            local_output_folder, output_file_problem, training_lock, workdir_path,
                            write_text_whole)


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


def test_an_output_folder_that_cannot_be_reached_is_one_line(tmp_path, monkeypatch):
    """--output in a folder this user may not enter (another's home) ended predict, export and
    evaluate in a PermissionError traceback. Monkeypatched: chmod does not stop root."""
    fx.refuse_stat_under(monkeypatch, tmp_path / "theirs")
    with pytest.raises(SystemExit, match=r"^error: --output .*/theirs/out: cannot reach it "
                                         r"\(Permission denied\)$"):
        local_output_folder(str(tmp_path / "theirs" / "out"))
    # Nor evaluate's --output file, there or in a folder below.
    for path in (tmp_path / "theirs" / "r.json", tmp_path / "theirs" / "new" / "r.json"):
        assert output_file_problem(workdir_path(path)) == "cannot reach it (Permission denied)"


def test_a_workdir_or_results_path_with_a_tilde_is_under_home(tmp_path, monkeypatch):
    """evaluate --output=~/r.json and report --output=~/r wrote under a folder named '~' here."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert os.fspath(workdir_path("~/r.json")) == os.fspath(tmp_path / "home" / "r.json")


def test_one_trainer_at_a_time_holds_a_workdir(tmp_path):
    """A second training lock on a workdir is refused, naming the holder's pid, while the first is
    held; it is free once the holder is done, and once a holder dies by SIGKILL (the kernel drops
    the lock): a rerun after a crash is never locked out."""
    workdir = workdir_path(tmp_path)
    with training_lock(workdir):
        with pytest.raises(WorkdirBusy, match=f"pid {os.getpid()}"):
            with training_lock(workdir):
                pass
    with training_lock(workdir):
        pass
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from jaxseg.workdir import training_lock, "
         "workdir_path\nwith training_lock(workdir_path(sys.argv[1])):\n print('held', flush=True);"
         " time.sleep(600)", str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(WorkdirBusy, match=f"pid {holder.pid}"):
            with training_lock(workdir):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with training_lock(workdir):
        pass


def test_training_refuses_a_workdir_another_trainer_holds(tmp_path):
    from configs import smoke
    from jaxseg import config_check, train

    config = smoke.get_config()
    config.num_devices = 1
    workdir = workdir_path(tmp_path / "run")
    workdir.mkdir()
    with training_lock(workdir):
        with pytest.raises(config_check.ConfigError,
                           match=f"--workdir {workdir}: another jaxseg.train \\(pid {os.getpid()}\\)"):
            train.train_and_evaluate(config, str(workdir))
    assert not (workdir / "config.json").exists() and not (workdir / "metrics.jsonl").exists()


def test_a_file_system_without_locks_trains_and_builds_unguarded_with_a_warning(
        tmp_path, monkeypatch, caplog):
    """A dataset build on such a file system (Lustre without -o flock) failed with the
    OSError, where training went on with a warning."""
    import errno
    import fcntl

    from jaxseg import datasets

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level("WARNING"):
        with training_lock(workdir_path(tmp_path)):
            pass
        with datasets._one_build_at_a_time(tmp_path / "data" / "ccp_person" / "1.0.0"):
            pass
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path} cannot be locked (No locks available): nothing stops a second training there",
        f"{tmp_path / 'data' / 'ccp_person'} cannot be locked (No locks available): two "
        "processes building it at once may collide"]
    monkeypatch.setattr(fcntl, "flock", lambda fd, op: (_ for _ in ()).throw(PermissionError(13, "x")))
    with pytest.raises(PermissionError):  # other errors are not hidden
        with training_lock(workdir_path(tmp_path)):
            pass


@pytest.mark.parametrize("path_type", [epath.Path, lambda p: p])
def test_a_write_stopped_halfway_leaves_the_earlier_file_whole(tmp_path, path_type):
    """Results, sweep rows, cards and weights were written in place: a kill or a full disk
    mid-write left a file cut short, which a resumed sweep counted as a finished trial and then
    failed to parse on every later run."""
    target = path_type(tmp_path) / "sweep_result.json"
    write_text_whole(target, '{"val_iou": 0.9}\n')

    class Killed(BaseException):
        pass

    with pytest.raises(Killed):
        with complete_or_absent(target) as partial:
            partial.write_text('{"val_iou": 0.')
            raise Killed
    assert target.read_text() == '{"val_iou": 0.9}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["sweep_result.json"]  # no partial file left
    with complete_or_absent(tmp_path / "w.npz") as partial, open(partial, "wb") as f:
        np.savez_compressed(f, w=np.arange(3))  # as launch/gpu_array_train.py saves weights
    assert np.load(tmp_path / "w.npz")["w"].tolist() == [0, 1, 2]


def test_outputs_written_at_once_into_one_folder_keep_their_own_contents(tmp_path, monkeypatch):
    """The partial file was named by the pid alone: two runs writing into one shared output
    folder from their own containers (each pid 1, say) wrote one partial file, and each renamed
    the other's output to its own name."""
    monkeypatch.setattr(workdir.os, "getpid", lambda: 1)
    with complete_or_absent(tmp_path / "a_mask.png") as first:
        first.write_bytes(b"a")
        with complete_or_absent(tmp_path / "b_mask.png") as second:  # the other run
            second.write_bytes(b"b")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == {"a_mask.png": b"a",
                                                                    "b_mask.png": b"b"}


def test_a_write_is_synced_to_disk_before_its_rename(tmp_path, monkeypatch):
    """The partial file was renamed without an fsync: ext4 and xfs may put the rename on disk
    before the data, and a power loss then left an empty file under the target's name. The
    folder is synced after the rename where the file system lets it; where not, the write stands."""
    events, fsync, replace = [], os.fsync, os.replace
    refuse_folders = False

    def recording_fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        if os.path.isdir(path):
            if refuse_folders:
                raise OSError(errno.EINVAL, "Invalid argument")
            events.append(("fsync folder", path))
        else:
            events.append(("fsync", path, pathlib.Path(path).read_bytes()))
        fsync(fd)

    def recording_replace(source, target):
        events.append(("replace", os.fspath(source), os.fspath(target)))
        replace(source, target)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    for path_type in (epath.Path, lambda p: p):
        events.clear()
        write_text_whole(path_type(tmp_path) / "result.json", "{}\n")
        partial = events[0][1]
        assert events == [("fsync", partial, b"{}\n"),
                          ("replace", partial, str(tmp_path / "result.json")),
                          ("fsync folder", str(tmp_path))]
    refuse_folders = True
    events.clear()
    with complete_or_absent(tmp_path / "w.npz") as partial, open(partial, "wb") as f:
        np.savez(f, w=np.arange(3))  # written by the caller, and closed before the sync
    assert [e[0] for e in events] == ["fsync", "replace"]
    assert np.load(tmp_path / "w.npz")["w"].tolist() == [0, 1, 2]


WRITER = """
import pathlib, sys, time
from jaxseg.workdir import complete_or_absent
with complete_or_absent(pathlib.Path(sys.argv[1])) as partial:
    partial.write_bytes(b"half a video")
    print(partial, flush=True)
    time.sleep(60)
"""


def test_only_partial_files_whose_writer_is_gone_are_removed(tmp_path, monkeypatch):
    """A write killed outright (SIGKILL) left its hidden partial file in the folder for good. It
    is removed once no process holds its lock and its pid is not running; a write still going on
    keeps its file, its pid unknown here (another container's) or not."""
    writer = subprocess.Popen([sys.executable, "-c", WRITER, tmp_path / "clip_mask.mp4"],
                              stdout=subprocess.PIPE, text=True)
    try:
        killed = pathlib.Path(writer.stdout.readline().strip())
        assert workdir.remove_stale_partials(tmp_path) == 0  # being written
        assert killed.read_bytes() == b"half a video"
    finally:
        writer.kill()
        writer.wait()
    gone = writer.pid
    kept = [tmp_path / f".jaxseg-{os.getppid()}-0123456789ab.partial.png",  # unlocked, pid runs
            tmp_path / f".jaxseg-{gone}-0123.partial.png",  # not a name complete_or_absent gives
            tmp_path / f"jaxseg-{gone}-0123456789ab.partial.png",
            tmp_path / f".jaxseg-{gone}-0123456789ab.partial.png.txt",
            tmp_path / "sub" / f".jaxseg-{gone}-0123456789ab.partial.png"]  # another folder
    for path in kept:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"x")
    kept += [tmp_path / f".jaxseg-{gone}-0123456789ac.partial",
             tmp_path / f".jaxseg-{gone}-0123456789ad.partial.png"]
    kept[-2].mkdir()  # not a file
    kept[-1].symlink_to(kept[0])
    monkeypatch.setattr(workdir.os, "getpid", lambda: gone)  # a live writer of another container
    with complete_or_absent(tmp_path / "a_mask.png") as live:
        live.write_bytes(b"png")
        stale = tmp_path / f".jaxseg-{gone}-0123456789ae.partial"
        stale.write_bytes(b"x")
        assert workdir.remove_stale_partials(tmp_path) == 2
    assert not killed.exists() and not stale.exists()
    assert (tmp_path / "a_mask.png").read_bytes() == b"png"
    assert all(path.exists() for path in kept)
    assert workdir.remove_stale_partials(tmp_path / "missing") == 0


def test_a_partial_file_named_with_this_process_pid_is_a_killed_writers(tmp_path):
    """A process started the same way gets the same pid each time (a container's pid 1, as
    `docker run IMAGE python -m jaxseg.predict` starts it): the partial file that such a run left
    when it was killed carries the pid of the run cleaning up, which runs, and stayed for good.
    This process's own writes are locked, and kept."""
    left = tmp_path / f".jaxseg-{os.getpid()}-0123456789ab.partial.png"
    left.write_bytes(b"half")
    with complete_or_absent(tmp_path / "b_mask.png") as live:
        live.write_bytes(b"png")
        assert workdir.remove_stale_partials(tmp_path) == 1
        assert live.exists()
    assert not left.exists() and (tmp_path / "b_mask.png").read_bytes() == b"png"
