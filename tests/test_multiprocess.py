"""A real multi-process run: two processes x two CPU devices joined by jax.distributed on 127.0.0.1.

Training and evaluation on such a cluster are compared with one process holding four devices (same
global batch, same mesh size), and a process that dies or fails must stop the others quickly.

Cross-process and in-process collectives sum in different orders (gloo's all-reduce between the
processes, XLA's in-process reduction within one), so float32 sums may differ in their last bit;
the training comparison allows for that (see `PARAM_ATOL`), evaluation must match exactly.
"""
import json
import os
import pathlib
import signal
import shutil
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
from flax import nnx

import fixtures_data as fx
from jaxseg import checkpointing, distributed, inference

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 4
OVERRIDES = [f"--config.train.num_steps={STEPS}", "--config.train.checkpoint_every=4",
             "--config.train.eval_every=4", "--config.train.log_every=2",
             "--config.eval.max_examples=16", "--config.data.image_size=32",
             "--config.model.depth=2"]
TIMEOUT_S = 300  # per launch; a healthy one takes well under a minute
# Measured after 4 steps (2x2 vs 1x4 devices): at most 1.3e-7 absolute on any parameter or batch
# statistic (float32 round-off of differently ordered sums, carried through 4 Adam steps), loss
# 1 ulp apart at step 4 and identical at step 2. A wrong data split or a missing all-reduce changes
# parameters by the size of a training update: Adam's first steps move every parameter that has a
# gradient by about the learning rate (1.5e-3 here), three orders of magnitude above PARAM_ATOL.
PARAM_ATOL = 1e-6
LOSS_RTOL = 1e-6
HEARTBEAT_S = 10
PEER_DIED = ("is stopping: a cross-process operation failed: another process of this run probably "
             "died or was killed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(**extra) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", **extra)
    for name in ("JAXSEG_COORDINATOR_ADDRESS", "JAXSEG_NUM_PROCESSES", "JAXSEG_PROCESS_ID"):
        env.pop(name, None)
    return env


class Cluster:
    """`num` processes of one command with `devices` CPU devices each (num=1: no jax.distributed).

    Output goes to files (a full pipe cannot block a process); `wait` bounds the run in time
    and kills whatever of its own processes is left.
    """

    def __init__(self, cmd, *, num: int, devices: int, env: dict, log_dir: pathlib.Path):
        log_dir.mkdir(parents=True, exist_ok=True)
        self.logs = [log_dir / f"process_{i}.log" for i in range(num)]
        port = free_port()
        self.procs = []
        for i in range(num):
            proc_env = dict(env, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
            if num > 1:
                proc_env.update(JAXSEG_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                JAXSEG_NUM_PROCESSES=str(num), JAXSEG_PROCESS_ID=str(i))
            with open(self.logs[i], "w") as log:
                self.procs.append(subprocess.Popen(cmd, cwd=REPO, env=proc_env, stdout=log,
                                                   stderr=subprocess.STDOUT))

    def log(self, i: int) -> str:
        return self.logs[i].read_text(errors="replace")

    def kill(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def exit_codes(self, timeout: float = TIMEOUT_S) -> list[int]:
        """Every process's exit status, whatever it is; fails if one is still running after
        TIMEOUT (each process is given that long), and leaves none running."""
        try:
            return [proc.wait(timeout=timeout) for proc in self.procs]
        except subprocess.TimeoutExpired:
            pytest.fail(f"hung:\n{self.log(0)[-2000:]}\n{self.log(1)[-2000:]}")
        finally:
            self.kill()

    def wait(self, timeout: float = TIMEOUT_S) -> None:
        """Waits for all; fails (after stopping the rest) on a non-zero exit or the timeout."""
        deadline = time.monotonic() + timeout
        try:
            for i, proc in enumerate(self.procs):
                try:
                    rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pytest.fail(f"process {i} still running after {timeout} s:\n"
                                f"{self.log(i)[-3000:]}")
                assert rc == 0, f"process {i} exited {rc}:\n{self.log(i)[-3000:]}"
        finally:
            self.kill()


def wait_all(*clusters):
    """Waits for every cluster; whatever fails or times out, none of their processes is left."""
    try:
        for cluster in clusters:
            cluster.wait()
    finally:
        for cluster in clusters:
            cluster.kill()


def train_command(workdir, *extra):
    return [sys.executable, "-m", "jaxseg.train", "--config", "configs/smoke.py",
            "--workdir", str(workdir), *OVERRIDES, *extra]


def evaluate_command(workdir, output):
    return [sys.executable, "-m", "jaxseg.evaluate", "--workdir", str(workdir), "--checkpoint",
            "latest", "--dataset", "ccp_person", "--split", "validation", "--output", str(output)]


def records(workdir, kind):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def model_state(workdir):
    model, _, step = inference.load_from_workdir(str(workdir), "latest")
    return jax.device_get(nnx.state(model)), step


@pytest.fixture(scope="module")
def runs(manual_dir, tmp_path_factory):
    """Workdirs and evaluation results of the 2x2 cluster and of one process with 4 devices.

    The two trainings run side by side, then both evaluations of the cluster's checkpoint (as two
    processes and as one), to keep the wall time down on small machines.
    """
    root = tmp_path_factory.mktemp("multiprocess")
    env = base_env(JAXSEG_MANUAL_DIR=str(manual_dir))
    env.setdefault("TFDS_DATA_DIR", str(pathlib.Path.home() / "tensorflow_datasets"))
    two, one = root / "two_processes", root / "one_process"
    timings = {}
    start = time.monotonic()
    wait_all(Cluster(train_command(two), num=2, devices=2, env=env, log_dir=root / "logs_train2"),
             Cluster(train_command(one), num=1, devices=4, env=env, log_dir=root / "logs_train1"))
    timings["train"] = time.monotonic() - start
    start = time.monotonic()
    out2, out1 = root / "eval_two.json", root / "eval_one.json"
    # A folder neither process has prepared, in a data dir of its own: both start together, and
    # only one may build it.
    folder = fx.make_simple_folder(root / "folder", [f"p{i}" for i in range(5)])
    out_folder = root / "eval_folder.json"
    folder_command = [sys.executable, "-m", "jaxseg.evaluate", "--workdir", str(two),
                      "--checkpoint", "latest", "--images", str(folder / "images"), "--masks",
                      str(folder / "masks"), "--output", str(out_folder)]
    wait_all(Cluster(evaluate_command(two, out2), num=2, devices=2, env=env,
                     log_dir=root / "logs_eval2"),
             Cluster(evaluate_command(two, out1), num=1, devices=4, env=env,
                     log_dir=root / "logs_eval1"),
             Cluster(folder_command, num=2, devices=1,
                     env=dict(env, TFDS_DATA_DIR=str(root / "tfds")),
                     log_dir=root / "logs_eval_folder"))
    timings["evaluate"] = time.monotonic() - start
    print(f"wall time: {timings}")
    return {"two": two, "one": one, "eval_two": json.loads(out2.read_text()),
            "eval_one": json.loads(out1.read_text()),
            "eval_folder": json.loads(out_folder.read_text())}


def test_two_processes_train_like_one(runs):
    two, one = runs["two"], runs["one"]
    state2, step2 = model_state(two)  # restores in this single process
    state1, step1 = model_state(one)
    assert step2 == step1 == STEPS
    leaves2, leaves1 = jax.tree.leaves(state2), jax.tree.leaves(state1)
    assert len(leaves2) == len(leaves1) and leaves1
    worst = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                for a, b in zip(leaves2, leaves1))
    assert worst <= PARAM_ATOL, f"parameters differ by up to {worst}"

    train2, train1 = records(two, "train"), records(one, "train")
    assert [r["step"] for r in train2] == [r["step"] for r in train1] == [2, 4]
    for r2, r1 in zip(train2, train1):
        assert r2.keys() == r1.keys()
        for key in ("loss", "ce", "dice_loss", "grad_norm", "learning_rate"):
            np.testing.assert_allclose(r2[key], r1[key], rtol=LOSS_RTOL, err_msg=key)
    val2, val1 = records(two, "validation"), records(one, "validation")
    assert [r["step"] for r in val2] == [r["step"] for r in val1] == [STEPS]
    # Model-resolution counts are thresholded probabilities of nearly equal models.
    np.testing.assert_allclose(val2[0]["val_iou"], val1[0]["val_iou"], atol=1e-4)


def test_one_checkpoint_series_written_once(runs):
    two, one = runs["two"], runs["one"]
    # Process 0 writes the logs; orbax commits each checkpoint once for all processes.
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    ckpts = checkpointing.Checkpoints(two, read_only=True)
    assert ckpts.latest.all_steps() == [STEPS]
    assert ckpts.best.all_steps() == [STEPS]
    for series in (checkpointing.LATEST_DIR, checkpointing.BEST_DIR):
        assert [p.name for p in (two / series).iterdir()] == [str(STEPS)]
        assert (two / series / str(STEPS) / "commit_success.txt").exists()
    meta, _ = ckpts.read_meta("latest")
    assert meta["step"] == STEPS and meta["global_batch"] == 8
    assert len(list((two / "tensorboard").iterdir())) == 1
    kinds = [(r["step"], r["kind"]) for r in map(json.loads,
                                                 (two / "metrics.jsonl").read_text().splitlines())]
    assert kinds == [(2, "train"), (4, "train"), (4, "validation")]


def test_evaluation_identical_on_two_processes_and_one(runs):
    two, one = runs["eval_two"], runs["eval_one"]
    assert two["num_images"] == one["num_images"] == 98  # the whole ccp_person validation split
    assert two["checkpoint_step"] == STEPS
    assert two["per_image"] == one["per_image"]
    assert two == one  # every metric, the threshold sweep and the model-resolution metrics


def test_two_processes_prepare_a_new_folder_one_after_the_other(runs):
    result = runs["eval_folder"]
    assert result["dataset"] == "person_folder" and result["num_images"] == 5
    assert sorted(r["id"] for r in result["per_image"]) == [f"p{i}" for i in range(5)]


# ------------------------------------------------------------------ failures stop the whole run


def endless_training_command(tmp_path, workdir):
    """jaxseg.train on a small synthetic folder (prepared in the run's own TFDS dir), logging every
    step and never validating or checkpointing on its own: for runs that are stopped."""
    folder = tmp_path / "folder"
    fx.make_simple_folder(folder / "train", [f"t{i:02d}" for i in range(12)])
    fx.make_simple_folder(folder / "validation", [f"v{i}" for i in range(4)], seed=50)
    return train_command(workdir, "--config.data.train=person_folder",
                         "--config.data.eval=person_folder", f"--config.data.folder={folder}",
                         "--config.train.num_steps=100000", "--config.train.log_every=1",
                         "--config.train.eval_every=100000",
                         "--config.train.checkpoint_every=100000",
                         "--config.eval.max_examples=4", "--config.train.num_logged_images=0")


def wait_until_training(cluster, workdir):
    """Returns once two steps are logged; fails if a process ends first or nothing is logged."""
    deadline = time.monotonic() + TIMEOUT_S
    metrics = workdir / "metrics.jsonl"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        for i, proc in enumerate(cluster.procs):
            assert proc.poll() is None, f"process {i} ended early:\n{cluster.log(i)[-3000:]}"
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)


def latest_step(workdir):
    """The workdir's latest periodic checkpoint step, its managers closed again."""
    ckpts = checkpointing.Checkpoints(workdir, read_only=True)
    try:
        return ckpts.latest_step()
    finally:
        ckpts.close()


def test_killed_process_stops_the_other(tmp_path):
    """SIGKILL one process mid-training: the other exits non-zero within seconds, saying why.

    Synthetic data in a fresh TFDS dir, so this also checks that two processes preparing one
    dataset at once do not collide (distributed.main_process_first).
    """
    workdir = tmp_path / "work"
    cmd = endless_training_command(tmp_path, workdir)
    env = base_env(TFDS_DATA_DIR=str(tmp_path / "tfds"), JAXSEG_MANUAL_DIR=str(tmp_path / "none"),
                   JAXSEG_HEARTBEAT_TIMEOUT_S=str(HEARTBEAT_S))
    cluster = Cluster(cmd, num=2, devices=2, env=env, log_dir=tmp_path / "logs")
    try:
        wait_until_training(cluster, workdir)
        cluster.procs[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        try:
            rc = cluster.procs[0].wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"process 0 still running 60 s after process 1 died:\n"
                        f"{cluster.log(0)[-3000:]}")
        took = time.monotonic() - killed
    finally:
        cluster.kill()
    # Process 0 prepared the dataset while process 1 waited, then process 1 read it.
    from jaxseg.datasets import base

    assert ([p.name for p in (tmp_path / "tfds" / "person_folder").glob("*/*")
             if not p.name.startswith(".")]  # the build's lock file
            == [str(base.PersonSegBuilder.VERSION)])
    assert "Downloading and preparing dataset" in cluster.log(0)
    assert "Downloading and preparing dataset" not in cluster.log(1)
    log = cluster.log(0)
    assert rc != 0, log[-3000:]
    assert took < 3 * HEARTBEAT_S, (took, log[-3000:])
    # Ours when a collective fails at once (the peer's sockets closed), JAX's when the survivor
    # was blocked until the coordination service missed the dead process's heartbeats.
    assert (PEER_DIED in log or ("Terminating process because the JAX distributed service "
                                 "detected fatal errors" in log and "another task died" in log
                                 and "stopped sending heartbeats" in log)), log[-3000:]
    print(f"process 0 exited {rc} {took:.1f} s after process 1 was killed")


def test_a_stop_signal_to_one_process_saves_and_stops_both(tmp_path):
    """A scheduler's SIGTERM reaches one process of two: both stop at the same step boundary,
    that step's checkpoint is committed, and both exit with the stopped status, so that running
    the same command again resumes there."""
    from jaxseg.workdir import STOPPED_EXIT_STATUS

    workdir = tmp_path / "work"
    cmd = endless_training_command(tmp_path, workdir)
    env = base_env(TFDS_DATA_DIR=str(tmp_path / "tfds"), JAXSEG_MANUAL_DIR=str(tmp_path / "none"))
    cluster = Cluster(cmd, num=2, devices=2, env=env, log_dir=tmp_path / "logs")
    try:
        wait_until_training(cluster, workdir)
        cluster.procs[1].send_signal(signal.SIGTERM)
        codes = []
        for i, proc in enumerate(cluster.procs):
            try:
                codes.append(proc.wait(timeout=120))
            except subprocess.TimeoutExpired:
                pytest.fail(f"process {i} still running 120 s after SIGTERM:\n"
                            f"{cluster.log(i)[-3000:]}")
    finally:
        cluster.kill()
    assert codes == [STOPPED_EXIT_STATUS] * 2, [cluster.log(i)[-3000:] for i in range(2)]
    last_logged = records(workdir, "train")[-1]["step"]  # a stopped run logs its last step
    assert latest_step(workdir) == last_logged
    assert f"SIGTERM: saved step {last_logged} to" in cluster.log(1)
    assert f"a stop signal to another process: saved step {last_logged} to" in cluster.log(0)



def test_ctrl_c_to_local_cluster_saves_and_exits_75(tmp_path):
    """launch/local_cluster.sh under a terminal's Ctrl-C: SIGINT reaches every process of its
    group, and the script passes SIGTERM on too; both processes save the same step and exit 75,
    and so does the script (it used to SIGKILL them 10 s later, and exit 130)."""
    from jaxseg.workdir import STOPPED_EXIT_STATUS

    workdir = tmp_path / "work"
    cmd = endless_training_command(tmp_path, workdir)
    args = cmd[cmd.index(str(workdir)) + 1:]  # the config overrides
    env = base_env(TFDS_DATA_DIR=str(tmp_path / "tfds"), JAXSEG_MANUAL_DIR=str(tmp_path / "none"),
                   PYTHON=sys.executable)
    logs = workdir / "logs"
    proc = subprocess.Popen(["bash", "launch/local_cluster.sh", "-n", "2", "-d", "2", "-w",
                             str(workdir), "--", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        metrics = workdir / "metrics.jsonl"
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        out = proc.communicate(timeout=TIMEOUT_S)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == STOPPED_EXIT_STATUS, out[-3000:]
    assert "all 2 processes stopped after saving (exit 75)" in out
    last_logged = records(workdir, "train")[-1]["step"]
    assert latest_step(workdir) == last_logged
    for i in range(2):
        assert f"saved step {last_logged} to" in (logs / f"process_{i}.log").read_text()
    assert not list((workdir / "checkpoints").glob("*tmp*"))

def test_processes_on_other_data_are_refused_before_training(tmp_path):
    """Hosts whose copies of a person_folder differ (one lacks two photos) trained replicas on
    other examples, each process its own, and finished without a word: now every process stops
    before the first step, naming what differs, and nothing is trained or saved."""
    folders = []
    for i, count in enumerate((6, 4)):
        folder = tmp_path / f"host_{i}"
        fx.make_simple_folder(folder / "train", [f"t{j}" for j in range(count)])
        fx.make_simple_folder(folder / "validation", ["v0", "v1"], seed=50)  # alike on both
        folders.append(str(folder))
    config = tmp_path / "per_host.py"  # as the same config file reads on two hosts
    config.write_text(textwrap.dedent(f"""
        import os
        from configs import smoke

        def get_config():
            c = smoke.get_config()
            c.data.folder = {folders!r}[int(os.environ["JAXSEG_PROCESS_ID"])]
            return c
    """))
    workdir = tmp_path / "work"
    cmd = [sys.executable, "-m", "jaxseg.train", "--config", str(config), "--workdir",
           str(workdir), "--config.data.train=person_folder", "--config.data.eval=person_folder",
           "--config.data.image_size=32", "--config.model.depth=2",
           "--config.train.num_steps=2", "--config.train.eval_every=2",
           "--config.train.checkpoint_every=2", "--config.eval.max_examples=2",
           "--config.train.num_logged_images=0"]
    env = base_env(TFDS_DATA_DIR=str(tmp_path / "tfds"), JAXSEG_MANUAL_DIR=str(tmp_path / "none"),
                   JAXSEG_HEARTBEAT_TIMEOUT_S=str(HEARTBEAT_S))
    cluster = Cluster(cmd, num=2, devices=1, env=env, log_dir=tmp_path / "logs")
    rcs = cluster.exit_codes()
    assert rcs == [1, 1], [cluster.log(i)[-2000:] for i in range(2)]
    for i in range(2):
        assert ("error: the processes of this run differ in the training data (process 1 "
                "against process 0): start every process with the same config"
                in cluster.log(i)), cluster.log(i)[-2000:]
    assert not (workdir / "metrics.jsonl").exists() and latest_step(workdir) is None



def run_with_init_checkpoints(tmp_path, paths):
    """A 2-step training of 2 processes on a small person_folder, each process starting from its
    own train.init_checkpoint, PATHS[process id] ("" for none): (exit statuses, cluster,
    workdir)."""
    folder = tmp_path / "folder"
    fx.make_simple_folder(folder / "train", [f"t{j}" for j in range(4)])
    fx.make_simple_folder(folder / "validation", ["v0", "v1"], seed=50)
    config = tmp_path / "per_host.py"
    config.write_text(textwrap.dedent(f"""
        import os
        from configs import smoke

        def get_config():
            c = smoke.get_config()
            c.train.init_checkpoint = {list(map(str, paths))!r}[int(os.environ["JAXSEG_PROCESS_ID"])]
            return c
    """))
    workdir = tmp_path / "work"
    cmd = [sys.executable, "-m", "jaxseg.train", "--config", str(config), "--workdir",
           str(workdir), "--config.data.train=person_folder", "--config.data.eval=person_folder",
           f"--config.data.folder={folder}", "--config.data.image_size=32",
           "--config.model.depth=2", "--config.train.num_steps=2",
           "--config.eval.max_examples=2", "--config.train.num_logged_images=0"]
    env = base_env(TFDS_DATA_DIR=str(tmp_path / "tfds"), JAXSEG_MANUAL_DIR=str(tmp_path / "none"),
                   JAXSEG_HEARTBEAT_TIMEOUT_S=str(HEARTBEAT_S))
    cluster = Cluster(cmd, num=2, devices=1, env=env, log_dir=tmp_path / "logs")
    rcs = cluster.exit_codes()
    return rcs, cluster, workdir


def test_processes_that_differ_in_init_checkpoint_are_refused_in_one_line(tmp_path):
    """train.init_checkpoint was loaded, through orbax's cross-process barriers, before the
    processes had checked that they agree: a process that alone had it set (or alone found no
    checkpoint in the workdir) met the others in barriers of other names, an AssertionError
    ('sync_global_devices name mismatch') or a hang instead of the line naming what differs."""
    rcs, cluster, workdir = run_with_init_checkpoints(tmp_path, ["", tmp_path / "old"])
    assert rcs == [1, 1], [cluster.log(i)[-2000:] for i in range(2)]
    for i in range(2):
        assert ("error: the processes of this run differ in the config (process 1 against "
                "process 0)" in cluster.log(i)), cluster.log(i)[-2000:]
        assert "Traceback" not in cluster.log(i), cluster.log(i)[-2000:]
    assert not (workdir / "metrics.jsonl").exists() and latest_step(workdir) is None


def test_hosts_with_their_own_copy_of_init_checkpoint_train_from_it(runs, tmp_path):
    """Each host holding the same init checkpoint at a path of its own was refused for a config
    that differs: they train from it."""
    copies = [shutil.copytree(runs["two"], tmp_path / f"copy_{i}") for i in range(2)]
    rcs, cluster, workdir = run_with_init_checkpoints(tmp_path, copies)
    assert rcs == [0, 0], [cluster.log(i)[-2000:] for i in range(2)]
    assert f"initialised the model from {copies[0]} (step {STEPS})" in cluster.log(0)
    assert latest_step(workdir) == 2


def test_hosts_whose_init_checkpoints_differ_are_refused_in_one_line(runs, tmp_path):
    """Other weights at each host's train.init_checkpoint (or none at one) stop both processes
    with one line naming what differs, before the first step."""
    one, two = model_state(runs["one"])[0], model_state(runs["two"])[0]
    assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, one, two)))  # 1e-7 apart
    for case, paths, differ in (
            ("other", [runs["two"], runs["one"]], "the model of train.init_checkpoint"),
            ("none", [runs["two"], tmp_path / "none"],
             "whether train.init_checkpoint holds a checkpoint")):
        (tmp_path / case).mkdir()
        rcs, cluster, workdir = run_with_init_checkpoints(tmp_path / case, paths)
        assert rcs == [1, 1], [cluster.log(i)[-2000:] for i in range(2)]
        for i in range(2):
            assert (f"error: the processes of this run differ in {differ} (process 1 against "
                    "process 0)" in cluster.log(i)), cluster.log(i)[-2000:]
            assert "Traceback" not in cluster.log(i), cluster.log(i)[-2000:]
        assert not (workdir / "metrics.jsonl").exists() and latest_step(workdir) is None


def test_processes_in_workdirs_that_differ_are_refused_before_init_checkpoint_is_loaded(tmp_path):
    """A workdir that is not shared, one process's holding a checkpoint: that one would resume
    and the other load train.init_checkpoint (here a missing one: the line of its own error,
    and the other stopping for its peer), not both naming what differs."""
    folder = tmp_path / "folder"
    fx.make_simple_folder(folder / "train", [f"t{j}" for j in range(4)])
    fx.make_simple_folder(folder / "validation", ["v0", "v1"], seed=50)
    (tmp_path / "work_0" / "checkpoints" / "5").mkdir(parents=True)  # a step, as orbax lists them
    train = [sys.executable, "-m", "jaxseg.train", "--config", "configs/smoke.py",
             "--config.data.train=person_folder", "--config.data.eval=person_folder",
             f"--config.data.folder={folder}", "--config.data.image_size=32",
             "--config.model.depth=2", "--config.train.num_steps=2",
             "--config.eval.max_examples=2", "--config.train.num_logged_images=0",
             f"--config.train.init_checkpoint={tmp_path / 'old'}"]
    cmd = ["sh", "-c", 'exec "$@" --workdir "$WORK_ROOT/work_$JAXSEG_PROCESS_ID"', "sh", *train]
    env = base_env(TFDS_DATA_DIR=str(tmp_path / "tfds"), JAXSEG_MANUAL_DIR=str(tmp_path / "none"),
                   JAXSEG_HEARTBEAT_TIMEOUT_S=str(HEARTBEAT_S), WORK_ROOT=str(tmp_path))
    cluster = Cluster(cmd, num=2, devices=1, env=env, log_dir=tmp_path / "logs")
    rcs = cluster.exit_codes()
    assert rcs == [1, 1], [cluster.log(i)[-2000:] for i in range(2)]
    for i in range(2):
        assert ("error: the processes of this run differ in the workdir's latest checkpoint "
                "(process 1 against process 0)" in cluster.log(i)), cluster.log(i)[-2000:]
    assert not (tmp_path / "work_1").exists()


RAISES = textwrap.dedent('''
    import numpy as np
    from jax.experimental import multihost_utils
    from jaxseg import distributed

    distributed.initialize()
    import jax

    multihost_utils.sync_global_devices("started")
    if jax.process_index() == 1:
        raise RuntimeError("a bug in process 1 only")
    multihost_utils.process_allgather(np.ones(3))  # process 1 never joins this one
''')


def test_process_that_raises_stops_the_other(tmp_path):
    """An exception in one process ends it at once, and the one waiting for it in a collective.

    Without distributed's exit hook, the raising process waits at exit in JAX's shutdown barrier
    for the other, which waits in its collective for the first: both hang.
    """
    env = base_env(JAXSEG_HEARTBEAT_TIMEOUT_S=str(HEARTBEAT_S), PYTHONPATH=str(REPO))
    cluster = Cluster([sys.executable, "-c", RAISES], num=2, devices=1, env=env,
                      log_dir=tmp_path / "logs")
    start = time.monotonic()
    rcs = cluster.exit_codes(120)
    assert all(rc != 0 for rc in rcs), rcs
    assert time.monotonic() - start < 60
    assert "RuntimeError: a bug in process 1 only" in cluster.log(1)
    assert ("jaxseg: process 1 of 2 is stopping: the error above is this process's own"
            in cluster.log(1))
    assert f"jaxseg: process 0 of 2 {PEER_DIED}" in cluster.log(0), cluster.log(0)[-2000:]


def test_heartbeat_timeout_from_the_environment(monkeypatch):
    monkeypatch.delenv(distributed.HEARTBEAT_ENV, raising=False)
    assert distributed.heartbeat_timeout_s(300) == 60
    monkeypatch.setenv(distributed.HEARTBEAT_ENV, "10")
    assert distributed.heartbeat_timeout_s(300) == 10
    for bad in ("0", "ten"):
        monkeypatch.setenv(distributed.HEARTBEAT_ENV, bad)
        with pytest.raises(ValueError, match="JAXSEG_HEARTBEAT_TIMEOUT_S must be a positive"):
            distributed.heartbeat_timeout_s(300)


@pytest.fixture
def no_launch_env(monkeypatch):
    for name in (*distributed._ENV, distributed.AUTO_ENV, "SLURM_NTASKS", "SLURM_STEP_NODELIST",
                 "SLURM_STEP_NUM_TASKS", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(name, raising=False)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setattr(distributed, "_stop_all_on_failure", lambda *a: None)
    return calls


def test_auto_lets_jax_find_the_cluster(no_launch_env, monkeypatch):
    # A Cloud TPU VM pod slice shows nothing in its environment: only JAXSEG_DISTRIBUTED=auto
    # (set by launch/tpu_vm.sh) makes jaxseg hand the discovery to jax.distributed.initialize().
    distributed.initialize()
    assert no_launch_env == []
    monkeypatch.setenv(distributed.AUTO_ENV, "auto")
    distributed.initialize()
    assert no_launch_env == [((), {})]


def test_only_a_cluster_of_several_hosts_is_joined_on_its_own(no_launch_env, monkeypatch):
    """One SLURM task, or a GKE TPU pod of one host, is a single process: joining a runtime
    there would wait for peers that never come."""
    monkeypatch.setenv("SLURM_STEP_NODELIST", "node[01-02]")  # a task of an srun step
    for name, single, several in (("SLURM_NTASKS", "1", "2"),
                                  ("TPU_WORKER_HOSTNAMES", "host-0", "host-0,host-1")):
        monkeypatch.setenv(name, single)
        distributed.initialize()
        assert no_launch_env == [], name
        monkeypatch.setenv(name, several)
        distributed.initialize()
        assert len(no_launch_env) == 1, name
        no_launch_env.clear()
        monkeypatch.delenv(name)


def test_a_program_started_outside_an_srun_step_is_a_single_process(no_launch_env, monkeypatch):
    """A batch script or an salloc shell holds its allocation's task count, SLURM_NTASKS, without
    being one of its tasks: jaxseg.evaluate started there asked JAX to join a cluster that JAX's
    SLURM detection (it reads the step's node list) cannot find, and failed with a traceback."""
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_JOB_ID", "200505")
    distributed.initialize()
    assert no_launch_env == []
    # In an srun step, the step's count: one task of it is a single process too.
    monkeypatch.setenv("SLURM_STEP_NODELIST", "node01")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")
    distributed.initialize()
    assert no_launch_env == []
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "16")
    distributed.initialize()
    assert len(no_launch_env) == 1


def test_explicit_launch_settings_reach_jax_with_the_heartbeat_timeout(no_launch_env, monkeypatch):
    monkeypatch.delenv(distributed.HEARTBEAT_ENV, raising=False)
    distributed.initialize("127.0.0.1:1", 2, 1, timeout_s=300)
    assert no_launch_env == [(("127.0.0.1:1", 2, 1), {
        "initialization_timeout": 300,
        "heartbeat_timeout_seconds": distributed.heartbeat_timeout_s(300)})]
    distributed.initialize("[::1]:65535", 2, 1)  # an IPv6 host, the highest port
    assert no_launch_env[-1][0] == ("[::1]:65535", 2, 1)


def test_launch_mistakes_are_one_line_before_joining(no_launch_env, monkeypatch):
    for args, message in [
            (("127.0.0.1:1", 2), "missing: JAXSEG_PROCESS_ID"),
            (("127.0.0.1:1", 2, 2), "process id 2 must be from 0 to 1"),
            (("", 2, -1), "missing: JAXSEG_COORDINATOR_ADDRESS, JAXSEG_PROCESS_ID"),
            # Both were ignored: the process ran alone.
            (("", -2, -1), "the process count must be at least 1, got -2"),
            (("", 0, 1), "process id 1 is one of several processes, but neither a coordinator"),
            (("", 1, 3), "process id 3 is one of several processes"),
            # JAX's IndexError; then process 0's crash and the others' wait for it.
            (("10.0.0.1", 2, 1), "coordinator address must be HOST:PORT.* got '10.0.0.1'"),
            (("node0:http", 2, 0), "coordinator address must be HOST:PORT"),
            (("node0:", 2, 0), "coordinator address must be HOST:PORT"),
            (("node0:65536", 2, 1), "from 1 to 65535"),
            ((":8476", 2, 1), "coordinator address must be HOST:PORT")]:
        with pytest.raises(SystemExit, match=f"^error: .*{message}"):
            distributed.initialize(*args)
    monkeypatch.setenv("JAXSEG_NUM_PROCESSES", "two")
    with pytest.raises(SystemExit, match=r"^error: \$JAXSEG_NUM_PROCESSES must be an integer, got 'two'"):
        distributed.initialize("127.0.0.1:1", process_id=0)
    monkeypatch.setenv(distributed.HEARTBEAT_ENV, "ten")
    with pytest.raises(SystemExit, match="^error: .*JAXSEG_HEARTBEAT_TIMEOUT_S must be a positive"):
        distributed.initialize("127.0.0.1:1", 2, 0)
    assert no_launch_env == []  # JAX's runtime was never asked to start


def test_process_0_refuses_a_coordinator_port_another_program_listens_on(no_launch_env):
    """JAX's coordinator could not listen there: process 0 crashed (SIGSEGV) and the others
    waited for it through the whole start-up timeout."""
    import socket

    with socket.socket() as listener:
        # As an earlier run's coordinator (gRPC) does: its closed connections then do not hold the
        # port (with it unset, they do, for JAX's coordinator too).
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with pytest.raises(SystemExit, match=rf"^error: process 0 cannot serve the coordinator "
                                             rf"on 127.0.0.1:{port} \(.*\): another program"):
            distributed.initialize(f"127.0.0.1:{port}", 2, 0)
        assert no_launch_env == []
        distributed.initialize(f"127.0.0.1:{port}", 2, 1)  # only process 0 listens there
        assert len(no_launch_env) == 1
        client = socket.create_connection(("127.0.0.1", port))
        served, _ = listener.accept()
        served.close()  # closed first by the server: its port lingers in TIME_WAIT
        client.close()
    # Once that listener is gone, the port serves again, TIME_WAIT or not (as it does JAX's).
    distributed.initialize(f"127.0.0.1:{port}", 2, 0)
    assert no_launch_env[-1][0] == (f"127.0.0.1:{port}", 2, 0)


def test_process_0_refuses_a_privileged_coordinator_port_as_such(no_launch_env, monkeypatch):
    """A port below 1024 that a user may not listen on was said to be held by another program."""
    import errno
    import socket

    def refused(self, address):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(socket.socket, "bind", refused)  # as for a user who is not root
    with pytest.raises(SystemExit) as e:
        distributed.initialize("127.0.0.1:80", 2, 0)
    assert str(e.value).startswith("error: process 0 cannot serve the coordinator on "
                                   "127.0.0.1:80 (Permission denied)")
    assert "another program" not in str(e.value) and "choose another" in str(e.value)
    assert no_launch_env == []


def test_several_processes_without_distributed_runtime_is_an_error(no_launch_env, monkeypatch):
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax, "process_count", lambda: 4)
    with pytest.raises(SystemExit, match="one of 4.*JAXSEG_DISTRIBUTED=auto"):
        distributed.initialize()
    monkeypatch.setattr(jax, "process_count", lambda: 1)
    distributed.initialize()  # one process alone needs no runtime


def test_an_error_exit_of_one_process_of_several_is_one_line():
    """exit_with_error raises in a run of several processes (a SystemExit would hang the others);
    its message came out as two chained tracebacks, twice."""
    script = textwrap.dedent("""
        from jaxseg import distributed
        distributed._stop_all_on_failure(0, 2, None)
        try:
            raise ValueError("the cause")
        except ValueError:
            raise distributed.RunError("error: train.batch_size=6 must be a multiple")
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.startswith("error: train.batch_size=6 must be a multiple\n"), result.stderr
    assert "Traceback" not in result.stderr and "jaxseg: process 0 of 2 is stopping" in result.stderr
