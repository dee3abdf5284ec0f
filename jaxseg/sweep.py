"""Hyperparameter search: `python -m jaxseg.sweep --config C --workdir W --grid a.b=1,2 [--grid ...]`.

Each trial is an ordinary training run (`jaxseg.train`) in its own workdir W/<trial>, with the
trial's values as `--config.a.b=v` overrides, run sequentially or `--parallel N` at a time. Trials
are ranked by validation IoU (the config's eval split, never the test split) into W/results.md and
W/results.csv. Re-running skips finished trials; an interrupted one resumes from its checkpoint.
"""
from __future__ import annotations

import ast
import csv
import itertools
import json
import pathlib
import random
import re
import subprocess
import sys

from jaxseg import metric_writer

RESULT_FILE = "sweep_result.json"


def parse_grid(specs: list[str]) -> dict[str, list]:
    """['a.b=1,2', 'c=x'] -> {'a.b': [1, 2], 'c': ['x']} (values parsed as Python literals)."""
    grid = {}
    for spec in specs:
        field, sep, values = spec.partition("=")
        if not sep or not field or not values:
            raise ValueError(f"--grid needs FIELD=V1,V2,...; got {spec!r}")
        grid[field.strip()] = [_literal(v.strip()) for v in values.split(",")]
    return grid


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def trials(grid: dict[str, list], num_random: int = 0, seed: int = 0) -> list[dict]:
    """The full grid, or `num_random` distinct combinations drawn from it with `seed`."""
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    if num_random:
        combos = random.Random(seed).sample(combos, min(num_random, len(combos)))
    return combos


def trial_name(values: dict) -> str:
    """A stable, readable directory name for a trial's values."""
    text = "_".join(f"{k.split('.')[-1]}={v}" for k, v in values.items())
    return re.sub(r"[^A-Za-z0-9_.=-]", "-", text) or "base"


def _command(config: str, workdir: pathlib.Path, values: dict, extra: list[str]) -> list[str]:
    overrides = [f"--config.{k}={v}" for k, v in values.items()]
    return [sys.executable, "-m", "jaxseg.train", "--config", config, "--workdir", str(workdir),
            *extra, *overrides]


def _result(workdir: pathlib.Path, values: dict) -> dict:
    records = metric_writer.read_metrics(workdir)
    validation = [r for r in records if r["kind"] == "validation"]
    if not validation:
        raise RuntimeError(f"trial {workdir} finished without a validation record")
    best = max(validation, key=lambda r: r["val_iou"])
    return {"trial": workdir.name, **values, "val_iou": best["val_iou"], "best_step": best["step"],
            "final_train_loss": [r for r in records if r["kind"] == "train"][-1]["loss"]}


def run(config: str, workdir: str | pathlib.Path, combos: list[dict], *, parallel: int = 1,
        extra: list[str] = ()) -> list[dict]:
    """Runs the unfinished trials, then ranks every trial by validation IoU; returns the rows."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    todo = [(workdir / trial_name(v), v) for v in combos
            if not (workdir / trial_name(v) / RESULT_FILE).exists()]
    running: list[tuple] = []
    failures = []

    def finish(proc, tdir, values):
        if proc.wait() != 0:
            failures.append(f"{tdir.name} (exit {proc.returncode}, log {tdir / 'train.log'})")
            return
        (tdir / RESULT_FILE).write_text(json.dumps(_result(tdir, values), indent=1) + "\n")

    for tdir, values in todo:
        tdir.mkdir(parents=True, exist_ok=True)
        print(f"trial {tdir.name}: {' '.join(_command(config, tdir, values, list(extra)))}",
              flush=True)
        log = open(tdir / "train.log", "a")
        proc = subprocess.Popen(_command(config, tdir, values, list(extra)), stdout=log,
                                stderr=subprocess.STDOUT)
        running.append((proc, tdir, values))
        while len(running) >= parallel:
            finish(*running.pop(0))
    for item in running:
        finish(*item)
    rows = [json.loads((workdir / trial_name(v) / RESULT_FILE).read_text()) for v in combos
            if (workdir / trial_name(v) / RESULT_FILE).exists()]
    rows.sort(key=lambda r: -r["val_iou"])
    write_table(workdir, rows)
    if failures:
        raise RuntimeError("failed trials: " + "; ".join(failures))
    return rows


def write_table(workdir: pathlib.Path, rows: list[dict]) -> None:
    """results.csv and results.md, ranked by validation IoU."""
    if not rows:
        return
    columns = list(rows[0])
    with open(workdir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| rank | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for rank, row in enumerate(rows, 1):
        cells = [f"{row[c]:.4f}" if isinstance(row[c], float) else str(row[c]) for c in columns]
        lines.append(f"| {rank} | " + " | ".join(cells) + " |")
    (workdir / "results.md").write_text(
        "Ranked by validation IoU (original resolution); the test split is never used.\n\n"
        + "\n".join(lines) + "\n")


def main(argv=None):
    """Entry point."""
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="configs/default.py")
    p.add_argument("--workdir", required=True)
    p.add_argument("--grid", action="append", default=[], help="FIELD=V1,V2,... (repeatable)")
    p.add_argument("--random", type=int, default=0, help="sample N combinations instead of all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parallel", type=int, default=1)
    args, extra = p.parse_known_args(argv)
    if not args.grid:
        p.error("give at least one --grid FIELD=V1,V2")
    rows = run(args.config, args.workdir, trials(parse_grid(args.grid), args.random, args.seed),
               parallel=args.parallel, extra=extra)
    print((pathlib.Path(args.workdir) / "results.md").read_text())
    return rows


if __name__ == "__main__":
    main()
