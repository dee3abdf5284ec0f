"""Orbax checkpoints of the train state: the last N periodic saves, and the best by validation IoU.

Layout under the workdir: `checkpoints/<step>/` (latest N) and `best/<step>/` (one, highest
validation IoU). Each holds `state` (the train-state pytree) and `meta` (JSON: config, step,
data position, metrics). Orbax writes to a temporary directory and renames it when complete, so a
hard kill during a save leaves the previous checkpoint usable.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import traceback

import jax
import orbax.checkpoint as ocp
from etils import epath

from jaxseg.workdir import workdir_path

LATEST_DIR = "checkpoints"
BEST_DIR = "best"


def _not_a_read_only_note(record: logging.LogRecord) -> bool:
    # Orbax warns, per manager, that a read-only one will not save: 3-6 lines before every
    # evaluation's or prediction's output (or its one-line error) that say nothing to the user.
    return not record.getMessage().startswith(("CheckpointManagerOptions.read_only=True",
                                               "Given directory is read only"))


def _refused_by_storage(error: BaseException | None) -> bool:
    """Whether ERROR is storage refusing a write (a full disk, no permission, a folder gone): an
    OSError, or tensorstore's ValueError carrying the system's error code."""
    return isinstance(error, OSError) or (isinstance(error, ValueError)
                                          and "os_error_code=" in str(error))


# Where orbax logs the traceback of a save's error and then raises it (in its background threads,
# then where the save is waited for); the logs of errors it goes on past (an old checkpoint it
# could not remove) come from elsewhere and stay.
_RAISED_AFTER_LOGGING = {"run", "_thread_func", "wait_until_finished", "_write_and_log",
                         "_update_and_log"}


def _not_a_trace_said_in_one_line(record: logging.LogRecord) -> bool:
    # A save that storage refused was logged with its traceback up to ten times before the
    # trainer said it in one line (SaveError); a second Ctrl-C while a save was waited for, once
    # before the trainer's line "interrupted".
    return not (record.exc_info and f"{os.sep}orbax{os.sep}" in record.pathname
                and record.funcName in _RAISED_AFTER_LOGGING
                and (_refused_by_storage(record.exc_info[1])
                     or isinstance(record.exc_info[1], KeyboardInterrupt)))


logging.getLogger("absl").addFilter(_not_a_read_only_note)
logging.getLogger("absl").addFilter(_not_a_trace_said_in_one_line)


class SaveError(RuntimeError):
    """A checkpoint could not be written (no space, a folder gone or replaced, a storage error).

    Orbax's background threads of the failed save never finish, so a process that meets this
    must end with os._exit: a normal exit waits for those threads forever.
    """

    @property
    def from_storage(self) -> bool:
        """Whether the storage refused the save (its cause); other causes may be bugs."""
        return _refused_by_storage(self.__cause__)


class UnreadableCheckpoint(FileNotFoundError):
    """A checkpoint folder that exists but cannot be read (empty, files deleted, not jaxseg's).

    A FileNotFoundError, as for a missing checkpoint, so that every command naming a missing one
    in one line names this one so too. FALLBACK: the newest other step of its folder, what moving
    it out leaves there to use, or None. ELSEWHERE: where FALLBACK is None, what a loading command
    can name instead (--checkpoint of the workdir's other series), or that there is nothing.
    """

    def __init__(self, message: str, fallback: int | None, elsewhere: str = ""):
        super().__init__(message)
        self.fallback = fallback
        self.elsewhere = elsewhere


# How tensorstore's ValueError begins for a data file that is gone, cut short or garbled (in the
# checkpoint's merged `d/` folder); its other errors, and orbax's ValueErrors, do not begin so.
_LOST_DATA = re.compile(r"(NOT_FOUND|OUT_OF_RANGE|DATA_LOSS): ")


def _damaged(e: Exception) -> bool:
    # Orbax says KeyError for a missing item, FileNotFoundError or a bare Exception for missing
    # files, tensorstore a ValueError with its status code for lost or cut data, and json a
    # JSONDecodeError for a garbled metadata file. Other errors are not the checkpoint's: a tree of
    # another structure (ValueError) is the caller's to explain, and a storage or permission error
    # says nothing against it.
    return (isinstance(e, (KeyError, FileNotFoundError, json.JSONDecodeError))
            or type(e) is Exception
            or (isinstance(e, ValueError) and bool(_LOST_DATA.match(str(e)))))


def _drop_closed_loop_notices() -> None:
    """From now on, drops the "Event loop is closed" errors of the reads that a failed restore
    leaves running: orbax closes its event loop at a restore's first failed read, and each read
    still running then reports its end to the closed loop, which Python prints as a traceback of
    its own (a hundred after the one-line error of a garbled checkpoint, some at exit). A save's
    writes that storage refused (a full disk) end so too. Those results are not wanted; other
    unraisable errors are printed as before."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_loop_notices", False):
        return

    def hook(unraisable):
        frames = traceback.extract_tb(unraisable.exc_traceback)
        if not (isinstance(unraisable.exc_value, RuntimeError)
                and str(unraisable.exc_value) == "Event loop is closed"
                and frames and frames[0].name == "call_soon_threadsafe"):
            previous(unraisable)

    hook.drops_closed_loop_notices = True
    sys.unraisablehook = hook


def _reading(manager: ocp.CheckpointManager, step: int, which: str,
             other: tuple[str, int | None, epath.Path]):
    """A context raising UnreadableCheckpoint for a damaged checkpoint at STEP, asked for as
    WHICH: one asked for by number is told to name another step, one found as 'latest' or 'best'
    to move this one out of their way. OTHER: the workdir's other series, as (its name for
    --checkpoint, the step that name reads or None, its folder)."""
    def unreadable(e: Exception) -> UnreadableCheckpoint:
        fallback = max((s for s in manager.all_steps() if s != step), default=None)
        return UnreadableCheckpoint(
            f"checkpoint {manager.directory / str(step)} cannot be read ({_summary(e)}): it is "
            "incomplete or not written by jaxseg; " + (
                f"it is the only checkpoint in {manager.directory}" if fallback is None else
                f"name step {fallback} instead" if which not in ("best", "latest") else
                f"move it out of {manager.directory} to use step {fallback} instead"),
            fallback, _elsewhere(*other) if fallback is None else "")
    return _raising_on_damage(unreadable)


@contextlib.contextmanager
def _raising_on_damage(error_for):
    """Within: an orbax read that found the checkpoint damaged (files lost, cut short or garbled)
    raises ERROR_FOR(its error) instead; other errors pass as they are."""
    _drop_closed_loop_notices()  # before: some reads end before the error reaches this frame
    try:
        yield
    except Exception as e:
        if not _damaged(e):
            raise
        raise error_for(e) from None


def _summary(e: Exception) -> str:
    """ERROR's type and the start of its first line."""
    what = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    return f"{type(e).__name__}{': ' + what if what else ''}"


def damage_said(what: str, remedy: str):
    """A context within which an orbax checkpoint found damaged inside (files lost, cut short or
    garbled) raises FileNotFoundError "WHAT cannot be read (the error): REMEDY" in one line, as
    the workdir's checkpoints are refused; other errors pass as they are."""
    return _raising_on_damage(
        lambda e: FileNotFoundError(f"{what} cannot be read ({_summary(e)}): {remedy}"))


def _elsewhere(name: str, step: int | None, directory: epath.Path) -> str:
    # What a loading command can read where the damaged checkpoint is the only one of its folder.
    if step is None:
        return "train again (the workdir holds no other checkpoint)"
    return f"use --checkpoint {name} (step {step}, in {directory}) instead, or train again"


@contextlib.contextmanager
def _saving(manager: ocp.CheckpointManager):
    # An asynchronous save's error surfaces at the next save, wait or close, as whatever orbax
    # met (often a bare Exception): one type, naming the folder, lets the trainer stop cleanly.
    _drop_closed_loop_notices()  # before: the writes of a save end in its background
    try:
        yield
    except Exception as e:
        raise SaveError(f"saving a checkpoint in {manager.directory} failed: "
                        f"{type(e).__name__}: {e}") from e


def _manager(directory: epath.Path, options: ocp.CheckpointManagerOptions):
    # Each series names its own cross-process barriers: orbax keys them by step alone, so the two
    # series saving one step at once (the last step, validated and saved) met in one barrier.
    options.multiprocessing_options = ocp.options.MultiprocessingOptions(
        barrier_sync_key_prefix=directory.name)
    try:
        return ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))
    except ValueError:  # json's JSONDecodeError or UnicodeDecodeError
        # Orbax reads each step's metrics (best/'s validation IoU) on opening: a garbled one
        # stopped every command on the workdir, training too, with json's traceback.
        garbled = [path.parent.parent for path in sorted(directory.glob("*/metrics/metrics"))
                   if not _holds_json(path)]
        if not garbled:
            raise
        raise UnreadableCheckpoint(
            f"checkpoint {garbled[0]} cannot be read (its metrics file is not JSON): it is "
            f"incomplete or not written by jaxseg; move it out of {directory}", None) from None


def _holds_json(path: epath.Path) -> bool:
    try:
        json.loads(path.read_text())
    except (ValueError, OSError):
        return False
    return True


def name_problem(which: str) -> str | None:
    """Why WHICH names no checkpoint, or None: 'best', 'latest' or a step number in ASCII digits
    (str.isdigit also takes a superscript, which int() refuses)."""
    if which in ("best", "latest") or re.fullmatch(r"[0-9]+", which):
        return None
    return "name 'best', 'latest' or a step number"


class Checkpoints:
    """The workdir's two checkpoint series (periodic and best)."""

    def __init__(self, workdir: str | os.PathLike, *, keep: int = 3, async_save: bool = True,
                 read_only: bool = False):
        workdir = workdir_path(workdir)
        self.latest = _manager(workdir / LATEST_DIR, ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, read_only=read_only,
            create=not read_only))
        self.best = _manager(workdir / BEST_DIR, ocp.CheckpointManagerOptions(
            max_to_keep=1, best_fn=lambda m: m["val_iou"], best_mode="max",
            keep_checkpoints_without_metrics=False, enable_async_checkpointing=async_save,
            read_only=read_only, create=not read_only))
        self._said_no_best = False  # the fallback to the latest is said once, not at each read

    def save(self, step: int, state, meta: dict, *, force: bool = False) -> None:
        """Periodic save (asynchronous): the state and its JSON metadata."""
        with _saving(self.latest):
            self.latest.save(step, args=_save_args(state, meta), force=force)

    def save_best(self, step: int, state, meta: dict, val_iou: float) -> None:
        """Offers a checkpoint to the best series; orbax keeps it only if its IoU is the highest.

        A step the series already holds is left as it is: a run killed after validating but
        before its next periodic save resumes from an earlier step and validates that step again,
        with the same state (resuming is deterministic).
        """
        if step in self.best.all_steps():
            return
        with _saving(self.best):
            self.best.save(step, args=_save_args(state, meta), metrics={"val_iou": float(val_iou)},
                           force=True)

    def latest_step(self) -> int | None:
        """Newest periodic step, or None."""
        return self.latest.latest_step()

    def best_step(self) -> int | None:
        """Step of the best checkpoint, or None."""
        return self.best.best_step()

    def resolve(self, which: str) -> tuple[ocp.CheckpointManager, int]:
        """'best', 'latest' or a step number -> (manager, step); errors name what exists."""
        instead_of_best = which == "best"
        if which == "best":
            step = self.best_step()
            if step is not None:
                return self.best, step
            which = "latest"  # a run that never validated still has its latest checkpoint
        if which == "latest":
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoint in {self.latest.directory}")
            # Else best_* results hold it unsaid; by the first process only, as jaxseg's other
            # messages, not once per host of a pod.
            if instead_of_best and not self._said_no_best and jax.process_index() == 0:
                self._said_no_best = True
                logging.getLogger(__name__).warning(
                    "no best checkpoint in %s: using the latest, step %d",
                    self.best.directory, step)
            return self.latest, step
        if problem := name_problem(which):
            raise FileNotFoundError(f"no checkpoint {which!r}: {problem}")
        step = int(which)
        for manager in (self.latest, self.best):
            if step in manager.all_steps():
                return manager, step
        raise FileNotFoundError(
            f"no checkpoint at step {step}; available: periodic {self.latest.all_steps()}, "
            f"best {self.best.all_steps()}")

    def restore(self, which: str | int, abstract_state) -> tuple[object, dict, int]:
        """Restores onto `abstract_state` (shapes, dtypes and target shardings): (state, meta, step)."""
        with self._reading_state(which) as (manager, step):
            out = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return out.state, dict(out.meta), step

    def restore_nodes(self, which: str | int, abstract_state, names) -> tuple[dict, int]:
        """Restores the top-level nodes NAMES of the train state onto `abstract_state` (the whole
        state's shapes, dtypes and target shardings, all checked against the checkpoint's),
        reading no array of the other nodes: ({name: node}, step). Not on a Checkpoints that has
        saved or restored whole states: orbax keeps one handler per item."""
        item = {name: node if name in names else jax.tree.map(lambda _: ocp.PLACEHOLDER, node)
                for name, node in abstract_state.items()}
        with self._reading_state(which) as (manager, step):
            out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                item, ocp.checkpoint_utils.construct_restore_args(item))))
        return {name: out.state[name] for name in names}, step

    @contextlib.contextmanager
    def _reading_state(self, which: str | int):
        """(manager, step) of WHICH, whose train state is read within: damage is an
        UnreadableCheckpoint."""
        manager, step = self.resolve(str(which))
        with _reading(manager, step, str(which), self._other(manager)):
            # Without it orbax guesses the tree from the arrays' names, as dicts that do not fit
            # the state: jax's structure error, which a resume took for a changed optimiser.
            if not (tree := manager.directory / str(step) / "state" / "_METADATA").exists():
                raise FileNotFoundError(f"{tree} is missing")
            yield manager, step

    def read_meta(self, which: str | int) -> tuple[dict, int]:
        """Only the JSON metadata of a checkpoint: (meta, step)."""
        manager, step = self.resolve(str(which))
        with _reading(manager, step, str(which), self._other(manager)):
            out = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out.meta), step

    def _other(self, manager: ocp.CheckpointManager) -> tuple[str, int | None, epath.Path]:
        """The series other than MANAGER: (its name, its step that name reads, its folder)."""
        if manager is self.best:
            return "latest", self.latest_step(), self.latest.directory
        return "best", self.best_step(), self.best.directory

    def wait(self) -> None:
        """Blocks until every asynchronous save has been committed."""
        _for_both(self, "wait_until_finished")

    def close(self) -> None:
        """Waits for pending saves and releases the managers."""
        _for_both(self, "close")


def _for_both(ckpts: Checkpoints, method: str) -> None:
    # Both series, even when the first fails: a process that then ends at once must not cut the
    # other's save short. The first error is raised.
    errors = []
    for manager in (ckpts.latest, ckpts.best):
        try:
            with _saving(manager):
                getattr(manager, method)()
        except SaveError as e:
            errors.append(e)
    if errors:
        raise errors[0]


def _save_args(state, meta: dict):
    return ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))


def abstract_like(state, sharding) -> object:
    """ShapeDtypeStructs of `state` placed with `sharding` (restore onto any device count)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)
