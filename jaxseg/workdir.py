"""Workdir paths: local folders or storage URLs (gs://...) shared by every process of a pod; the
output folders of the command lines, and their summaries of them on stdout; and the exit status of
a training that stopped with its workdir ready to resume.

pathlib would turn 'gs://bucket/run' into the local folder 'gs:/bucket/run' and write each TPU
host's checkpoints to its own disk; etils.epath keeps the URL (orbax writes it through tensorstore,
the small files go through TensorFlow's gfile).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import pathlib
import re
import secrets
import sys

from etils import epath

# A run stopped by a signal after saving exits with this (EX_TEMPFAIL: run it again), not 0, so that
# a launch script stops there instead of evaluating a half-trained model as the result.
STOPPED_EXIT_STATUS = 75


def is_storage_url(path: str | os.PathLike) -> bool:
    """Whether PATH is a storage URL (gs://bucket/x), not a local path."""
    return "://" in os.fspath(path)


def workdir_path(workdir: str | os.PathLike) -> epath.Path:
    """The workdir as an epath.Path: absolute for local folders (orbax wants that), with `~`
    expanded (--output=~/x reaches the program unexpanded), URLs untouched."""
    path = epath.Path(workdir)
    return path if is_storage_url(workdir) else path.expanduser().absolute()


@contextlib.contextmanager
def complete_or_absent(target: os.PathLike):
    """Yields a hidden path beside TARGET to write it at, renamed to TARGET when the block ends
    and removed when it raises: a write that fails or is stopped halfway (a full disk, Ctrl-C)
    leaves the earlier file whole, never a truncated one that a later reader trusts, and a scan
    of the folder passes over the hidden name. The file is synced to disk before the rename, so
    that a power loss does not leave it empty either. A local hidden file exists (empty) as the
    block starts, locked until it ends. TARGET may be a pathlib or an epath path."""
    # A short name of this write's own, not TARGET's name lengthened: a target whose name just
    # fits the file system's 255 bytes stays writable. Not the pid alone: processes in other
    # containers (each its own pid 1) may write into one shared folder. The suffix tells
    # OpenCV a video's container.
    partial = target.with_name(f".jaxseg-{os.getpid()}-{secrets.token_hex(6)}.partial"
                               f"{target.suffix}")
    with contextlib.ExitStack() as held:
        if not is_storage_url(partial):
            # Locked until the rename, and the kernel drops the lock when its writer dies: so
            # remove_stale_partials tells a file that a killed write left from one still being
            # written, by any process (one of another container, whose pid means nothing here).
            lock = held.enter_context(open(partial, "x"))
            with contextlib.suppress(OSError):  # no locks here: such a file is never removed
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:
            yield partial
            # The data on disk before a name points at it: ext4 and xfs may write the rename
            # first, and a power loss between the two could leave an empty file at TARGET.
            _fsync(partial)
            partial.replace(target)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
    with contextlib.suppress(OSError):  # and the rename; some file systems cannot sync a folder
        _fsync(target.parent, folder=True)


# The names complete_or_absent gives its partial files.
_PARTIAL_NAME = re.compile(r"\.jaxseg-(\d+)-[0-9a-f]{12}\.partial(\.[^.]+)?")


def remove_stale_partials(folder: pathlib.Path) -> int:
    """Removes the hidden partial files that writes killed outright (SIGKILL, out of memory) left
    in the local FOLDER; returns how many. One is kept while a process holds its lock (its writer,
    in whatever container), where locks cannot be taken, and while its pid runs here, other
    than this process's (a writer of an earlier jaxseg, which did not lock them)."""
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:  # no such folder yet
        return 0
    for entry in entries:
        named = _PARTIAL_NAME.fullmatch(entry.name)
        if not named or not entry.is_file(follow_symlinks=False):
            continue
        # This process's pid is a killed run's that had it too (a container's pid 1 at each run):
        # this process's own writes are locked.
        if int(named[1]) != os.getpid() and _running(int(named[1])):
            continue
        try:
            with open(entry.path, "rb") as f:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.unlink(entry.path)
        except OSError:  # held by its writer, no locks here, or gone already
            continue
        removed += 1
    return removed


def _running(pid: int) -> bool:
    """Whether PID is a process of this pid namespace (another user's included)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # no such process, or no pid at all
        return False
    except PermissionError:  # another user's
        pass
    return True


def _fsync(path, *, folder: bool = False) -> None:
    """Flushes a local file's or folder's contents to disk; storage URLs are left to their
    storage (an object is durable once written)."""
    if is_storage_url(path):
        return
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if folder else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_whole(path: os.PathLike, text: str) -> None:
    """Writes TEXT to PATH (pathlib or epath) through `complete_or_absent`: a reader finds the
    earlier file or the new one, never one cut short."""
    with complete_or_absent(path) as partial:
        partial.write_text(text)


def local_folder_problem(path: epath.Path) -> str | None:
    """Creates a local folder if needed; why it cannot be created or written, else None.

    URLs are left to their storage, whose errors come with the first write."""
    if is_storage_url(path):
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"cannot create it ({e.strerror or e})"
    return None if os.access(path, os.W_OK) else "not writable"


def output_file_problem(path: epath.Path) -> str | None:
    """Why a file cannot be written at the local PATH (a folder there, a file where one of its
    folders should be, a folder not writable), or None; creates nothing, so that a command can
    refuse its --output before its work rather than after. URLs are left to their storage."""
    if is_storage_url(path):
        return None
    path = pathlib.Path(path)
    try:
        if path.is_dir():
            return "is a folder: name the file to write"
        parent = next(p for p in path.parents if p.exists())  # the root exists
    except OSError as e:  # in a folder this user may not enter (another's home): not False
        return f"cannot reach it ({e.strerror})"
    if not parent.is_dir():
        return f"{parent} is not a folder"
    return None if os.access(parent, os.W_OK | os.X_OK) else f"{parent} is not writable"


TRAIN_LOCK = ".train.lock"


class WorkdirBusy(RuntimeError):
    """Another process holds the workdir's training lock."""


@contextlib.contextmanager
def exclusive_lock(path: os.PathLike, *, wait: bool, unguarded: str):
    """Holds an exclusive lock on the local file PATH (created if absent) and yields it open, or
    raises BlockingIOError where another process holds it and WAIT is false. The kernel drops the
    lock when its holder dies, SIGKILL included. Some network file systems (Lustre without
    -o flock) have no locks: there it warns that UNGUARDED and yields the file unlocked."""
    with open(path, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK):
                raise  # BlockingIOError included
            logging.getLogger(__name__).warning("%s cannot be locked (%s): %s",
                                                pathlib.Path(path).parent, e.strerror, unguarded)
        yield lock


@contextlib.contextmanager
def training_lock(workdir: epath.Path):
    """Holds an exclusive lock on WORKDIR/.train.lock while a run trains there, or raises
    WorkdirBusy naming the holder's pid: two trainers in one folder would both write its
    checkpoints and logs. Storage URLs (gs://...) are not locked (their file systems have no
    such locks)."""
    if is_storage_url(workdir):
        yield
        return
    with contextlib.ExitStack() as held:
        try:  # around the taking only: the training inside may raise BlockingIOError of its own
            lock = held.enter_context(exclusive_lock(
                workdir / TRAIN_LOCK, wait=False, unguarded="nothing stops a second training there"))
        except BlockingIOError:
            holder = pathlib.Path(workdir / TRAIN_LOCK).read_text().strip() or "unknown"
            raise WorkdirBusy(f"another jaxseg.train (pid {holder}) is training in it: wait for "
                              "it to end, or stop it (SIGTERM saves), then run again") from None
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
        yield


def local_output_folder(text: str) -> pathlib.Path:
    """An `--output` folder for commands that write with local file APIs (predict, export), or
    SystemExit: for "" (pathlib would make it the current folder), for a URL (pathlib would
    quietly make gs://b/x the local folder gs:/b/x), for an existing file, for a path this user
    may not look at."""
    if not text:
        raise SystemExit("error: --output: give the folder to write to")
    if is_storage_url(text):
        raise SystemExit(f"error: --output {text}: give a local folder (this command writes local "
                         "files; copy them to storage afterwards)")
    path = pathlib.Path(text).expanduser()  # --output=~/out: no shell expands it
    try:
        not_a_folder = path.exists() and not path.is_dir()
    except OSError as e:  # in a folder this user may not enter (another's home): not False
        raise SystemExit(f"error: --output {path}: cannot reach it ({e.strerror})") from None
    if not_a_folder:
        raise SystemExit(f"error: --output {path}: exists and is not a folder")
    return path


def escape_unencodable_stdout() -> None:
    """Lets stdout print a path that is not valid UTF-8 (escaped, as stderr prints it) instead of
    raising under a UTF-8 locale at a command's summary line, after all its work. A captured stream
    without `reconfigure` (a notebook's, say) is left as it is."""
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")
