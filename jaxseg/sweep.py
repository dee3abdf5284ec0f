"""Hyperparameter search: `python -m jaxseg.sweep --config C --workdir W --grid a.b=1,2 [--grid ...]
[--config.x.y=V ...]` (config overrides, anywhere on the line, go to every trial's training).

Each trial is an ordinary training run (`jaxseg.train`) in its own workdir W/<trial>, with the
trial's values as `--config.a.b=v` overrides, run sequentially or `--parallel N` at a time. Trials
are ranked by validation IoU (the config's eval split, never the test split) into W/results.md and
W/results.csv. Re-running skips finished trials; an interrupted one (preempted: its training saved
and exited before num_steps) is not recorded and resumes from its checkpoint. A sweep folder keeps
its config, extra overrides and the fields they make (W/sweep.json): once a trial has finished
or saved a checkpoint, re-running it with others, or with the config file edited, is refused,
while another --grid adds its trials to the same ranking. SIGTERM to the sweep is passed on to
its running trials, which save and stop; no further trial starts. Every trial's
config is built and checked as jaxseg.train does before any starts; arguments other than
--config.* overrides are refused. On Linux a trial gets SIGTERM too when the sweep dies by
SIGKILL: it saves and stops.
"""
from __future__ import annotations

import ast
import csv
import hashlib
import io
import itertools
import json
import math
import os
import pathlib
import random
import re
import shlex
import signal
import subprocess
import sys
import time
import warnings

from jaxseg import metric_writer
from jaxseg.arg_types import at_least
from jaxseg.workdir import STOPPED_EXIT_STATUS, is_storage_url, write_text_whole

RESULT_FILE = "sweep_result.json"
SWEEP_FILE = "sweep.json"
TRIAL_FILE = "sweep_trial.json"  # the values a trial folder was started with


class SweepError(RuntimeError):
    """Trials that failed or stopped early, or a sweep folder re-run with another command;
    `stopped`: the sweep itself was stopped by a signal; `ranked`: results.md ranks the trials
    that finished all the same."""

    def __init__(self, message: str, *, stopped: bool = False, ranked: bool = False):
        super().__init__(message)
        self.stopped, self.ranked = stopped, ranked


def parse_grid(specs: list[str]) -> dict[str, list]:
    """['a.b=1,2', 'c=x'] -> {'a.b': [1, 2], 'c': ['x']} (values parsed as Python literals;
    a tuple or quoted value keeps its commas: 'optim.step_fractions=(0.5,0.8),(0.6,0.9)' is two
    values, and so is "data.train='a:1,b:1','a:2,b:1'")."""
    grid = {}
    for spec in specs:
        field, sep, values = spec.partition("=")
        if not sep or not field or not values:
            raise ValueError(f"--grid needs FIELD=V1,V2,...; got {spec!r}")
        if field.strip() in grid:  # the later values would replace the earlier ones
            raise ValueError(f"--grid {field.strip()} is given twice: list all its values in one")
        parsed = [_literal(v.strip()) for v in _top_level_split(values)]
        # A repeat (0.001 after 1e-3) would run the same trial twice, in one folder at once.
        if repeats := [v for i, v in enumerate(parsed) if v in parsed[:i]]:
            raise ValueError(f"--grid {field.strip()} lists {repeats[0]!r} twice")
        grid[field.strip()] = parsed
    return grid


def _top_level_split(text: str) -> list[str]:
    """`text` cut at the commas outside brackets and quotes."""
    parts, depth, quote, start = [], 0, "", 0
    for i, char in enumerate(text):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        else:
            depth += (char in "([{") - (char in ")]}")
            if char == "," and depth == 0:
                parts.append(text[start:i])
                start = i + 1
    return parts + [text[start:]]


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def trials(grid: dict[str, list], num_random: int = 0, seed: int = 0) -> list[dict]:
    """The full grid, or `num_random` distinct combinations drawn from it with `seed`."""
    if not num_random:
        return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    # Drawn by their indices in the grid's order: random search over many fields may span
    # billions of combinations, too many to list (sample picks the same indices from a range as
    # from the list, so a seed draws the trials it drew when the list was made).
    total = math.prod(len(options) for options in grid.values())
    if total > sys.maxsize:
        raise ValueError(f"--random: the grid holds {total:.3g} combinations, too many to draw "
                         "from; list fewer values")
    return [_combination(grid, index)
            for index in random.Random(seed).sample(range(total), min(num_random, total))]


def _combination(grid: dict[str, list], index: int) -> dict:
    """The grid's combination number INDEX, in itertools.product's order (the last field's
    values change fastest)."""
    values = []
    for options in reversed(grid.values()):
        index, i = divmod(index, len(options))
        values.append(options[i])
    return dict(zip(grid, reversed(values)))


_MAX_NAME = 200  # characters of a trial's folder name: most file systems allow 255


def trial_name(values: dict, *, whole: bool = False, hashed: bool = False) -> str:
    """A stable, readable directory name for a trial's values: each field by its last part, or
    whole where two fields share it (train.batch_size and eval.batch_size) or `whole` says so;
    cut and ended by a hash of the values where longer than _MAX_NAME (or `hashed` says so)."""
    last = [k.split(".")[-1] for k in values]
    names = [k if whole or last.count(short) > 1 else short for k, short in zip(values, last)]
    text = "_".join(f"{name}={v}" for name, v in zip(names, values.values()))
    text = re.sub(r"[^A-Za-z0-9_.=-]", "-", text) or "base"
    if hashed or len(text) > _MAX_NAME:
        digest = hashlib.sha1(json.dumps(values, sort_keys=True).encode()).hexdigest()[:8]
        text = f"{text[:_MAX_NAME - len(digest) - 1]}-{digest}"
    return text


def _overrides(values: dict) -> list[str]:
    """A trial's values as jaxseg.train's config overrides."""
    return [f"--config.{k}={v}" for k, v in values.items()]


def _command(config: str, workdir: pathlib.Path, values: dict, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "jaxseg.train", "--config", config, "--workdir", str(workdir),
            *extra, *_overrides(values)]


def _trial_config(config: str, extra: list[str], values: dict):
    """The config a trial's jaxseg.train builds from --config CONFIG, the EXTRA overrides and the
    trial's VALUES, by absl's flag parsing as train's: (config, the arguments no flag took), or
    ValueError saying which argument is wrong (the field it lacks, with the nearest name)."""
    from absl import flags
    from ml_collections import config_flags

    from jaxseg import config_check

    argv = ["jaxseg.train", "--config", config, *extra, *_overrides(values)]
    try:
        with warnings.catch_warnings():  # ml_collections loads the config file by load_module()
            warnings.filterwarnings("ignore", "the load_module", DeprecationWarning)
            # sys_argv: ml_collections makes the override flags from the arguments at definition.
            flag_values = flags.FlagValues()
            config_flags.DEFINE_config_file("config", config, flag_values=flag_values,
                                            sys_argv=argv)
            rest = flag_values(argv)
        built = flag_values.config
        # A config file that failed to load stands in as an object raising on use (None where
        # its get_config() returned None).
        built.to_dict()
    except flags.Error as e:  # a value of the wrong type, say
        raise ValueError(str(e)) from None
    except (AttributeError, KeyError, SyntaxError) as e:  # ml_collections: no such field
        if problem := config_check.config_file_problem(e, config):  # or a file without get_config()
            raise ValueError(f"--config: {problem}") from None
        unknown = config_check.unknown_field(e, argv)
        if not unknown:  # an error of the config file's own code: its traceback says where
            raise
        name, suggestion = unknown
        given = [f"--grid {field}" for field in values if name in field.split(".")]
        given += [arg.split("=", 1)[0] for arg in extra if arg.startswith(("--config.", "--noconfig."))
                  and name in arg.split("=", 1)[0].split(".")[1:]]
        hint = f" (did you mean {suggestion!r}?)" if suggestion else ""
        raise ValueError(f"{given[0] if given else 'an override'}: the config has no field "
                         f"{name!r}{hint}") from None
    except OSError as e:
        raise ValueError(f"--config: {config_check.config_file_problem(e, config)}") from None
    return built, rest[1:]


def check_trials(config: str, combos: list[dict], extra: list[str]) -> str | None:
    """Why some trial's training would refuse its config (the config file, the extra overrides,
    then the trial's values, as its jaxseg.train gets them), or None: before any trial starts."""
    from jaxseg import config_check

    for values in combos:
        try:
            built, rest = _trial_config(config, extra, values)
        except ValueError as e:
            return str(e)
        if rest:  # arguments no flag took, which training would ignore
            return f"unrecognized arguments: {' '.join(rest)}"
        try:
            # The devices are the trial's to count: starting JAX here would take them.
            config_check.validate(built, built.get("num_devices") or 1)
        except config_check.ConfigError as e:
            problems = [line.strip().removeprefix("- ") for line in str(e).splitlines()[1:]]
            return f"trial {trial_name(values)}: invalid config: {'; '.join(problems)}"
    return None


def _not_overrides(extra: list[str]) -> list[str]:
    """The options among EXTRA that are no --config.FIELD override (a mistyped sweep option):
    a value of an override's (--config.seed -1) is taken for none."""
    def option(arg):
        try:
            float(arg)
            return False
        except ValueError:
            return arg.startswith("-") and arg != "-"

    return [arg for arg in extra if option(arg) and not arg.startswith(("--config.", "--noconfig."))]


def _last_line(log: pathlib.Path) -> str:
    """The last line of a trial's log (its error, when it failed), or ''."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    return next((line.strip() for line in reversed(lines) if line.strip()), "")


# Run before a trial's command, in the trial's own process (a preexec_fn would run Python in a
# forked copy of the sweep, which in a process with threads, such as a test's with JAX, can
# deadlock): prctl(PR_SET_PDEATHSIG = 1, SIGTERM), kept across the exec of the command, then
# the command. A sweep already gone by then sends no signal: the trial stops as stopped.
_DIE_WITH_THE_SWEEP = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)\n"
    f"if os.getppid() != int(sys.argv[1]): sys.exit({STOPPED_EXIT_STATUS})\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n")


def _dying_with_the_sweep(command: list[str]) -> list[str]:
    """COMMAND, made to get SIGTERM (a trial saves and stops) when the sweep dies, even by
    SIGKILL, which no handler sees: no trial trains on unwatched, beside a rerun's. As it is
    where the system has no prctl(PR_SET_PDEATHSIG) (not Linux)."""
    if not sys.platform.startswith("linux"):
        return command
    return [sys.executable, "-c", _DIE_WITH_THE_SWEEP, str(os.getpid()), *command]


def _result(workdir: pathlib.Path, values: dict) -> dict:
    records = metric_writer.read_metrics(workdir)
    validation = [r for r in records if r["kind"] == "validation"]
    if not validation:
        raise RuntimeError(f"trial {workdir} finished without a validation record")
    best = max(validation, key=lambda r: r["val_iou"])
    return {"trial": workdir.name, **values, "val_iou": best["val_iou"], "best_step": best["step"],
            "final_train_loss": [r for r in records if r["kind"] == "train"][-1]["loss"]}


def _recorded_values(tdir: pathlib.Path) -> dict | None:
    """The values a trial folder holds (None: no trial there, or none recorded)."""
    if (tdir / TRIAL_FILE).exists():
        return json.loads((tdir / TRIAL_FILE).read_text())
    if (tdir / RESULT_FILE).exists():  # a folder from before TRIAL_FILE: its result row has them
        result = json.loads((tdir / RESULT_FILE).read_text())
        return {k: v for k, v in result.items()
                if k not in ("trial", "val_iou", "best_step", "final_train_loss")}
    return None


def trial_dir(workdir: pathlib.Path, values: dict, taken: dict | None = None) -> pathlib.Path:
    """The trial's folder: by its short name, unless a trial of other values holds that name
    (another grid's, eval.batch_size=4 after train.batch_size=4, or, as names keep only letters,
    digits and _.=-, 'a/b' after 'a-b'), then by whole field names, then by those and a hash of
    the values. TAKEN: the values of the folders given to this run's earlier trials."""
    same = json.loads(json.dumps(values))
    for name in (trial_name(values), trial_name(values, whole=True),
                 trial_name(values, whole=True, hashed=True)):
        tdir = workdir / name
        held = (taken or {}).get(tdir)
        recorded = _recorded_values(tdir) if held is None else json.loads(json.dumps(held))
        if recorded is None or recorded == same:
            return tdir
    return tdir  # named by the hash of these values


def _steps(tdir: pathlib.Path) -> tuple[int, int]:
    """(steps trained, train.num_steps) of a trial, from its config.json and metrics file."""
    num_steps = json.loads((tdir / "config.json").read_text())["train"]["num_steps"]
    logged = [r["step"] for r in metric_writer.read_metrics(tdir) if r["kind"] == "train"]
    return max(logged, default=0), num_steps  # training always logs its last step


def _settings(config: str, extra: list[str]) -> dict | None:
    """The config the trials start from (the --config file as it is now, with the EXTRA
    overrides) as JSON, or None where it cannot be built (its trials fail, each saying why)."""
    try:
        built, _ = _trial_config(config, list(extra), {})
    except ValueError:
        return None
    return json.loads(built.to_json())


def _changed_settings(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'field: old -> new' for each field both configs (as JSON) hold with other values."""
    changed = []
    for key in sorted(old.keys() & new.keys()):
        if isinstance(old[key], dict) and isinstance(new[key], dict):
            changed += _changed_settings(old[key], new[key], f"{prefix}{key}.")
        elif old[key] != new[key]:
            changed.append(f"{prefix}{key}: {old[key]!r} -> {new[key]!r}")
    return changed


def trial_environment(parallel: int) -> dict | None:
    """The environment of each trial: this one, where trials run one at a time. Trials running
    side by side on one GPU each grab 75% of its memory at start (JAX's default), so the second
    would run out of it: they allocate as they need instead, unless the user chose otherwise.
    On a CPU these variables do nothing."""
    if parallel == 1 or {"XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_MEM_FRACTION",
                         "XLA_PYTHON_CLIENT_ALLOCATOR"} & os.environ.keys():
        return None
    return {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}


def _check_same_sweep(workdir: pathlib.Path, config: str, extra: list[str]) -> None:
    """Refuses to add this command's trials to a folder whose finished or interrupted trials came
    from another command, or from its config file before an edit (they would be ranked as this
    one's, an interrupted one resumed from its checkpoint); records the command otherwise."""
    from jaxseg import checkpointing

    # The config file by its absolute path: the same file named another way is the same command
    # (a folder from before stored it relative to the working directory, as it is resolved here).
    command = {"config": str(pathlib.Path(config).resolve()), "extra": list(extra)}
    settings = _settings(config, extra)
    path = workdir / SWEEP_FILE
    finished = any(workdir.glob(f"*/{RESULT_FILE}"))
    # A trial that saved a checkpoint (a step's folder: orbax's unfinished saves carry a suffix)
    # resumes from it on a rerun, with the settings it started with.
    interrupted = not finished and any(
        ckpt.name.isdigit() for ckpt in workdir.glob(f"*/{checkpointing.LATEST_DIR}/*"))
    trained = "finished trials" if finished else "interrupted trials"
    if (finished or interrupted) and path.exists():
        stored = json.loads(path.read_text())
        stored_config = str(pathlib.Path(stored["config"]).resolve())
        if [stored_config, stored["extra"]] != [command["config"], command["extra"]]:
            raise SweepError(
                f"{workdir} holds {trained} of --config {stored['config']} with "
                f"{' '.join(stored['extra']) or 'no overrides'}; this command is --config "
                f"{command['config']} with {' '.join(extra) or 'no overrides'}: use a new --workdir")
        # The same file, edited since (or a config it imports): its trials would train otherwise.
        # A folder from before the settings were kept has none to compare with.
        if stored.get("settings") and settings and (
                changed := _changed_settings(stored["settings"], settings)):
            raise SweepError(
                f"{workdir} holds {trained} of --config {stored['config']} as it was "
                f"then; it has changed since ({'; '.join(changed[:5])}"
                f"{'; ...' if len(changed) > 5 else ''}): use a new --workdir")
        return
    if finished or interrupted:  # a folder from before sweep.json existed: nothing to compare with
        print(f"warning: {workdir} has {trained} but no {SWEEP_FILE}; assuming they come "
              "from this command", file=sys.stderr)
    write_text_whole(path, json.dumps({**command, "settings": settings}, indent=1) + "\n")


def run(config: str, workdir: str | pathlib.Path, combos: list[dict], *, parallel: int = 1,
        extra: list[str] = ()) -> list[dict]:
    """Runs the unfinished trials, then ranks every finished trial by validation IoU; returns
    the rows. Raises SweepError naming the trials that failed or stopped early (after ranking)."""
    workdir = pathlib.Path(workdir)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SweepError(f"--workdir {workdir}: cannot create it ({e.strerror or e})") from None
    try:  # a read-only folder or a full disk, said before any trial starts
        _check_same_sweep(workdir, config, extra)
    except OSError as e:
        raise SweepError(f"--workdir {workdir}: cannot write in it ({e.strerror or e})") from None
    # Each folder by the values it holds, whatever their fields' order: names follow the order
    # of the --grid flags, so the same grids given in another order would train every trial
    # again, in new folders, and rank each twice.
    held = {}
    for folder in sorted(workdir.iterdir()):
        if folder.is_dir() and (recorded := _recorded_values(folder)) is not None:
            held.setdefault(json.dumps(recorded, sort_keys=True), folder)
    todo, taken = [], {}
    for values in combos:
        tdir = held.get(json.dumps(values, sort_keys=True)) or trial_dir(workdir, values, taken)
        taken[tdir] = values
        if not (tdir / RESULT_FILE).exists():
            todo.append((tdir, values))
    running: list[tuple] = []
    failures = []
    stopping = []  # the signal that stops the sweep, once one came

    def stop(signum, frame):
        del frame
        stopping.append(signum)
        for proc, _, _ in running:
            if proc.poll() is None:
                proc.send_signal(signum)

    def finish(proc, tdir, values):
        if proc.wait() < 0:  # killed (by the OOM killer, say): its log ends in a progress bar
            failures.append(f"{tdir.name} was killed by signal {-proc.returncode} "
                            f"({signal.strsignal(-proc.returncode)}; log {tdir / 'train.log'})")
            return
        if proc.returncode not in (0, STOPPED_EXIT_STATUS):
            error = _last_line(tdir / "train.log")
            failures.append(f"{tdir.name} failed (exit {proc.returncode}"
                            f"{': ' + error if error else ''}; log {tdir / 'train.log'})")
            return
        try:
            done, num_steps = _steps(tdir)
            if done < num_steps:  # stopped by a signal after saving: resumes on the next run
                failures.append(f"{tdir.name} stopped at step {done} of {num_steps} (preempted?); "
                                "run the same command again to resume it")
                return
            result = _result(tdir, values)
        except (OSError, ValueError, KeyError, RuntimeError) as e:  # no usable record of the run
            failures.append(f"{tdir.name} left no usable record ({e}; log {tdir / 'train.log'})")
            return
        # Whole or absent: a cut result would count the trial finished and break every table.
        write_text_whole(tdir / RESULT_FILE, json.dumps(result, indent=1) + "\n")

    def finish_first_to_end():
        # Whichever trial ends first frees its slot, not the oldest.
        while True:
            for i, (proc, _, _) in enumerate(running):
                if proc.poll() is not None:
                    finish(*running.pop(i))
                    return
            time.sleep(0.2)

    def interrupted(signum, frame):
        del frame
        stopping.append(signum)  # not forwarded: a second Ctrl-C would stop a trial unsaved

    # SIGTERM (a scheduler's stop) would end the sweep alone and leave its trials training
    # unwatched: they get it too, and save. Ctrl-C reaches them from the terminal already: the
    # sweep waits for their saves instead of dying on KeyboardInterrupt.
    previous = signal.signal(signal.SIGTERM, stop), signal.signal(signal.SIGINT, interrupted)
    try:
        for number, (tdir, values) in enumerate(todo):
            if stopping:
                failures.append(f"{len(todo) - number} trial(s) not started: run the same "
                                "command again")
                break
            try:  # a disk that filled during the earlier trials: they are still summed up
                tdir.mkdir(parents=True, exist_ok=True)
                write_text_whole(tdir / TRIAL_FILE, json.dumps(values) + "\n")
                log = open(tdir / "train.log", "a")
            except OSError as e:
                failures.append(f"{len(todo) - number} trial(s) not started, from {tdir.name} on "
                                f"({e.strerror or e}): run the same command again once the cause "
                                "is fixed")
                break
            command = _command(config, tdir, values, list(extra))
            # Quoted as a shell reads it: a trial rerun by hand from this line gets its values
            # whole (a tuple's parentheses, a value's spaces).
            print(f"trial {tdir.name}: {shlex.join(command)}", flush=True)
            with log:  # the trial holds its own copy
                proc = subprocess.Popen(_dying_with_the_sweep(command), stdout=log,
                                        stderr=subprocess.STDOUT, env=trial_environment(parallel))
            running.append((proc, tdir, values))
            if stopping:  # the signal came while this trial started
                proc.send_signal(stopping[0])
            while len(running) >= parallel:
                finish_first_to_end()
        while running:
            finish_first_to_end()
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])
    # Every finished trial of the folder (sweep.json vouches for their config): a rerun with
    # another --grid adds its trials to the earlier ones' ranking instead of replacing it.
    rows = [json.loads(path.read_text()) for path in sorted(workdir.glob(f"*/{RESULT_FILE}"))]
    rows.sort(key=lambda r: -r["val_iou"])
    ranked = False
    try:
        write_table(workdir, rows)
        ranked = bool(rows)
    except OSError as e:  # a disk that filled during the trials: the summary still says what ran
        failures.append(f"results.md and results.csv not written ({e.strerror or e})")
    if failures:
        raise SweepError("unfinished trials: " + "; ".join(failures), stopped=bool(stopping),
                         ranked=ranked)
    return rows


def write_table(workdir: pathlib.Path, rows: list[dict]) -> None:
    """results.csv and results.md, ranked by validation IoU."""
    if not rows:
        return
    columns = list(dict.fromkeys(c for row in rows for c in row))  # grids may vary other fields
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    write_text_whole(workdir / "results.csv", table.getvalue())
    lines = ["| rank | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for number, row in enumerate(rows, 1):
        # Equal IoUs share a rank (1, 1, 3): the one listed first (by folder name) is no better.
        if number == 1 or row["val_iou"] != rows[number - 2]["val_iou"]:
            rank = number
        # 4 significant digits: fixed decimals would print learning rates 1e-5 and 3e-5 as 0.0000.
        # A value's own | (in a path, say) is escaped: it would end the cell early.
        cells = [(f"{row[c]:.4g}" if isinstance(row.get(c), float)
                  else str(row.get(c, "-")).replace("|", "\\|")) for c in columns]
        lines.append(f"| {rank} | " + " | ".join(cells) + " |")
    write_text_whole(
        workdir / "results.md", "Ranked by validation IoU (original resolution); the test split is never used.\n\n"
        + "\n".join(lines) + "\n")


def measured_apart(combos: list[dict]) -> list[str]:
    """The fields that take different values among the trials and change how validation IoU is
    measured (eval.threshold, data.eval, ...): their trials' IoUs do not rank fairly."""
    from jaxseg import config_check

    fields = sorted({f for values in combos for f in values})
    return [f for f in fields if config_check.changes_validation(f)
            and len({repr(values.get(f)) for values in combos}) > 1]


def _parser():
    import argparse

    p = argparse.ArgumentParser(prog="python -m jaxseg.sweep", description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="configs/default.py",
                   help="every trial's jaxseg.train --config (default: %(default)s)")
    p.add_argument("--workdir", required=True,
                   help="the sweep's folder: a workdir per trial, results.md, results.csv")
    p.add_argument("--grid", action="append", default=[], help="FIELD=V1,V2,... (repeatable)")
    p.add_argument("--random", type=at_least(0), default=0,
                   help="sample N combinations instead of all (0 = all)")
    p.add_argument("--seed", type=int,  # None: not given, which only --random may be
                   help="seed of --random's draw (default: 0)")
    p.add_argument("--parallel", type=int, default=1,
                   help="trials run at once (default: %(default)s)")
    return p


def main(argv=None):
    """Entry point."""
    p = _parser()
    args, extra = p.parse_known_args(argv)
    if unknown := _not_overrides(extra):  # a mistyped sweep option would go to every trial
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    if not args.grid:
        p.error("give at least one --grid FIELD=V1,V2")
    if args.parallel < 1:
        p.error(f"--parallel must be at least 1, got {args.parallel}")
    if args.seed is not None and not args.random:  # taken for the trials' seed, say
        p.error("--seed seeds --random's draw and nothing else: give --random N, or set the "
                "trials' training seed with --config.seed=N or --grid seed=...")
    try:
        combos = trials(parse_grid(args.grid), args.random, args.seed or 0)
    except ValueError as e:
        p.error(str(e))
    if not args.workdir:  # pathlib would make "" the current folder
        p.error("--workdir: give the sweep's folder")
    if is_storage_url(args.workdir):  # pathlib made gs://b/s the local folder gs:/b/s
        p.error(f"--workdir {args.workdir}: the sweep's folder must be a local one (a trial's "
                "own training may write to storage: jaxseg.train --workdir URL)")
    # No shell expands --workdir=~/s: the sweep wrote ./~/s, its trials trained in the home
    # folder's ~/s (jaxseg.train expands it), and their results were not found.
    args.workdir = os.path.expanduser(args.workdir)
    # Before any trial starts, and fails on it: a mistyped field, the test split, a bad value.
    if problem := check_trials(args.config, combos, extra):
        p.error(problem)
    if unlike := measured_apart(combos):
        print(f"note: the grid varies {', '.join(unlike)}: the trials' validation IoUs are "
              "measured differently (other examples, cut or prediction), so the ranking compares "
              "unlike figures; to pick a threshold, use one trial's evaluation threshold sweep",
              file=sys.stderr)
    try:
        rows = run(args.config, args.workdir, combos, parallel=args.parallel, extra=extra)
    except SweepError as e:
        if e.ranked:  # one failed trial hid the ranking of all the others
            print((pathlib.Path(args.workdir) / "results.md").read_text())
        print(f"error: {e}", file=sys.stderr)
        # Stopped by a signal: rerunning resumes, as after a stopped training.
        raise SystemExit(STOPPED_EXIT_STATUS if e.stopped else 1) from None
    print((pathlib.Path(args.workdir) / "results.md").read_text())
    return rows


if __name__ == "__main__":
    main()
