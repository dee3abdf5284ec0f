"""The launch scripts: syntax, dry runs, clear failures without their tools, a real local cluster."""
import io
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zipfile

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = ["gpu.sh", "tpu_vm.sh", "slurm.sbatch", "local_cluster.sh"]
# What the scripts may use besides the tools under test; a PATH of just these lacks gcloud/srun/...
BASICS = ["bash", "sh", "env", "dirname", "basename", "sed", "cat", "mktemp", "rm", "mkdir", "tar",
          "seq", "sleep", "tail"]


@pytest.fixture
def bin_dir(tmp_path):
    """A PATH folder with the basic utilities only (add fake tools with `_stub`)."""
    path = tmp_path / "bin"
    path.mkdir()
    for tool in BASICS:
        found = shutil.which(tool)
        if found:
            (path / tool).symlink_to(found)
    return path


def _stub(path, name):
    """A fake `name` that says it was called and fails (dry runs must not call it)."""
    (path / name).write_text(f"#!/bin/sh\necho 'stub {name} called' >&2\nexit 1\n")
    (path / name).chmod(0o755)


def _run(args, path, env=None, cwd=REPO, timeout=60):
    full_env = {"PATH": str(path), "HOME": os.environ.get("HOME", "/tmp"), **(env or {})}
    return subprocess.run(["bash", *map(str, args)], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("script", SCRIPTS)
def test_syntax_and_help(script):
    assert subprocess.run(["bash", "-n", LAUNCH / script]).returncode == 0
    out = subprocess.run(["bash", LAUNCH / script, "-h"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "Usage" in out.stdout or "sbatch" in out.stdout


def test_gpu_without_nvidia_smi(bin_dir):
    out = _run([LAUNCH / "gpu.sh", "--dry-run"], bin_dir)
    assert out.returncode != 0
    assert "nvidia-smi not found" in out.stderr


def test_gpu_dry_run(bin_dir):
    _stub(bin_dir, "nvidia-smi")
    out = _run([LAUNCH / "gpu.sh", "--dry-run", "--config.train.num_steps=100"], bin_dir,
               env={"WORKDIR": "/tmp/w"})
    assert out.returncode == 0, out.stderr
    pinned = next(line.split("==")[1].strip() for line in (REPO / "requirements.txt").read_text()
                  .splitlines() if line.startswith("jax=="))
    assert f"jax\\[cuda12\\]=={pinned}" in out.stdout
    assert ("-m jaxseg.train --config configs/gpu.py --workdir /tmp/w --config.train.num_steps=100"
            in out.stdout)
    for dataset in ("portrait_segmentation", "ccp_person"):
        assert f"--checkpoint best --dataset {dataset} --split test" in out.stdout
    assert "stub" not in out.stderr  # nothing ran


def test_a_workdir_that_is_a_file_is_refused_before_the_setup(bin_dir, cpu_tree, tmp_path):
    """jaxseg.train refused it only after the venv was made and pip had installed."""
    (tmp_path / "file").write_text("")
    _stub(bin_dir, "nvidia-smi")
    out = _run([LAUNCH / "gpu.sh", "--dry-run"], bin_dir, env={"WORKDIR": str(tmp_path / "file")})
    assert out.returncode == 2 and "stub" not in out.stderr
    assert f"gpu.sh: error: workdir {tmp_path / 'file'} exists and is not a folder" in out.stderr
    assert "pip install" not in out.stdout
    script, path = cpu_tree
    out = _run([script, tmp_path / "file"], path)
    assert out.returncode == 2
    assert f"cpu.sh: error: workdir {tmp_path / 'file'} exists and is not a folder" in out.stderr
    assert "setup done" not in out.stdout and "ran python" not in out.stdout


def test_gpu_refuses_an_unknown_cuda_extra_before_the_setup(bin_dir):
    """pip installed the CPU jax for jax[cuda-12] (a warning only): the run failed at the GPU
    check after the whole setup."""
    _stub(bin_dir, "nvidia-smi")
    out = _run([LAUNCH / "gpu.sh", "--dry-run"], bin_dir, env={"JAX_CUDA": "cuda-12"})
    assert out.returncode == 2 and "JAX_CUDA=cuda-12: name jax's CUDA extra" in out.stderr
    assert "pip install" not in out.stdout
    out = _run([LAUNCH / "gpu.sh", "--dry-run"], bin_dir, env={"JAX_CUDA": "cuda13"})
    assert out.returncode == 0 and "jax\\[cuda13\\]" in out.stdout, out.stderr


def test_gpu_refuses_a_python_older_than_312(bin_dir, tmp_path):
    """Its venv was made by any python3 (3.10 on many GPU images), then reused at every rerun."""
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: H100'\n")
    old = tmp_path / "python3.11"
    old.write_text("#!/bin/sh\n[ \"$1\" = -c ] && exit 1\necho 'Python 3.11.7'\n")
    for tool in (bin_dir / "nvidia-smi", old):
        tool.chmod(0o755)
    env = {"VENV": str(tmp_path / "venv"), "PYTHON": str(old), "WORKDIR": str(tmp_path / "w")}
    out = _run([LAUNCH / "gpu.sh"], bin_dir, env=env)
    assert out.returncode == 2 and "is not Python 3.12 or newer" in out.stderr, out.stderr
    assert not (tmp_path / "venv").exists()
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    shutil.copy(old, tmp_path / "venv" / "bin" / "python")  # a venv an older run made
    out = _run([LAUNCH / "gpu.sh"], bin_dir, env=env)
    assert out.returncode == 2, out.stderr
    assert "has Python 3.11.7, and jax" in out.stderr and "remove it and run again" in out.stderr
    assert "pip install" not in out.stdout


def test_tpu_without_gcloud(bin_dir):
    out = _run([LAUNCH / "tpu_vm.sh", "--zone", "z", "--workdir", "gs://b/w", "--manual-dir",
                "gs://b/d", "--dry-run"], bin_dir)
    assert out.returncode != 0
    assert "gcloud not found" in out.stderr


def test_tpu_missing_settings(bin_dir):
    _stub(bin_dir, "gcloud")
    out = _run([LAUNCH / "tpu_vm.sh", "--zone", "z", "--manual-dir", "gs://b/d", "--dry-run"], bin_dir)
    assert out.returncode != 0 and "--workdir is required" in out.stderr
    out = _run([LAUNCH / "tpu_vm.sh", "--zone", "z", "--workdir", "gs://b/w", "--accelerator-type",
                "x-8", "--manual-dir", "gs://b/d", "--dry-run"], bin_dir)
    assert out.returncode != 0 and "--runtime-version" in out.stderr


def test_tpu_dry_run(bin_dir, tmp_path):
    _stub(bin_dir, "gcloud")
    data = tmp_path / "mydata"
    (data / "portraits").mkdir(parents=True)
    out = _run([LAUNCH / "tpu_vm.sh", "--zone=us-central2-b", "--accelerator-type", "v4-32",
                "--workdir", "gs://b/run", "--manual-dir", data, "--project", "p", "--dry-run",
                "--", "--config.train.num_steps=10"], bin_dir)
    assert out.returncode == 0, out.stderr
    s = out.stdout
    assert ("gcloud compute tpus tpu-vm create jaxseg-tpu --zone=us-central2-b --project=p "
            "--accelerator-type=v4-32 --version=tpu-ubuntu2204-base") in s
    assert f"scp --recurse {data} jaxseg-tpu:" in s
    assert s.count("--worker=all") == 5  # 2 copies, install, train, evaluate
    assert "jax\\[tpu\\]==" in s
    assert ("-m jaxseg.train --config configs/tpu.py --workdir gs://b/run "
            "--config.train.num_steps=10") in s
    assert "JAXSEG_MANUAL_DIR=$HOME/mydata" in s
    # Train and evaluate both join the slice through jax.distributed.initialize()'s own discovery.
    assert s.count("JAXSEG_DISTRIBUTED=auto") == 2
    for d in ("portrait_segmentation", "ccp_person"):  # the best checkpoint, kept in the workdir
        assert (f"-m jaxseg.evaluate --workdir gs://b/run --checkpoint best --dataset {d} --split "
                f"test --output ~/jaxseg_eval/best_{d}_test.json;") in s
    assert "gcloud storage cp ~/jaxseg_eval/*.json gs://b/run/eval/" in s
    assert "stub" not in out.stderr


def test_tpu_ships_a_config_kept_outside_configs(bin_dir, tmp_path):
    _stub(bin_dir, "gcloud")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "big.py").write_text("from configs.tpu import get_config\n")
    common = [LAUNCH / "tpu_vm.sh", "--zone", "z", "--workdir", "gs://b/w", "--dry-run"]
    out = _run(common, bin_dir, env={"CONFIG": "big.py"}, cwd=mine)  # relative to the caller
    assert out.returncode == 0, out.stderr
    assert f"cp {mine / 'big.py'} " in out.stdout and "/code/configs/launch_big.py" in out.stdout
    assert "-m jaxseg.train --config configs/launch_big.py " in out.stdout
    for cwd in (REPO, mine):  # from the caller's folder, or else from the repository's
        out = _run(common, bin_dir, env={"CONFIG": "configs/smoke.py"}, cwd=cwd)
        assert out.returncode == 0, out.stderr
        assert "-m jaxseg.train --config configs/smoke.py " in out.stdout
        assert "launch_" not in out.stdout  # a config in configs/ travels with it
    out = _run(common, bin_dir, env={"CONFIG": "nope.py"})
    assert out.returncode == 2 and "config not found: nope.py" in out.stderr


@pytest.mark.parametrize("accelerator,ok", [("v4-8", True), ("v5litepod-8", True),
                                            ("v4-32", False), ("v5litepod-16", False)])
def test_tpu_local_workdir_only_on_one_host(bin_dir, accelerator, ok):
    _stub(bin_dir, "gcloud")
    out = _run([LAUNCH / "tpu_vm.sh", "--zone", "z", "--workdir", "/tmp/w", "--accelerator-type",
                accelerator, "--dry-run"], bin_dir)
    assert (out.returncode == 0) == ok, out.stderr
    if not ok:
        assert "spans several hosts" in out.stderr and "gs://" in out.stderr


def test_slurm_without_srun(bin_dir):
    out = _run([LAUNCH / "slurm.sbatch", "--dry-run"], bin_dir, env={"SLURM_JOB_ID": "1"})
    assert out.returncode != 0
    assert "srun not found" in out.stderr


def test_slurm_outside_allocation(bin_dir):
    _stub(bin_dir, "srun")
    out = _run([LAUNCH / "slurm.sbatch", "--dry-run"], bin_dir)
    assert out.returncode != 0 and "sbatch" in out.stderr


@pytest.fixture
def venv(tmp_path):
    """A venv for slurm.sbatch's VENV whose python is this one."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    return venv


def test_slurm_dry_run(bin_dir, tmp_path, venv):
    _stub(bin_dir, "srun")
    env = {"SLURM_JOB_ID": "7", "SLURM_SUBMIT_DIR": str(REPO), "SLURM_NTASKS_PER_NODE": "4(x2)",
           "SLURM_JOB_NUM_NODES": "2", "VENV": str(venv)}
    out = _run([LAUNCH / "slurm.sbatch", "--dry-run", "--config.train.batch_size=128"], bin_dir,
               env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    # The default workdir does not depend on the job id: resubmitting the same command resumes.
    assert (f"srun --ntasks-per-node=4 --kill-on-bad-exit=1 {venv}/bin/python -m jaxseg.train "
            "--config configs/gpu.py --workdir runs/slurm --config.train.batch_size=128") in out.stdout
    assert "-m jaxseg.evaluate --workdir runs/slurm --checkpoint best" in out.stdout
    help_text = subprocess.run(["bash", LAUNCH / "slurm.sbatch", "-h"], capture_output=True,
                               text=True, timeout=30).stdout
    assert "WORKDIR (default runs/slurm," in help_text and "resumes" in help_text


def test_slurm_gives_each_task_the_cpus_per_task_of_the_job(bin_dir, venv):
    """Since Slurm 22.05, srun does not inherit sbatch's --cpus-per-task: the #SBATCH line's 8 CPUs
    per task were not given to the processes, each left with one CPU for its decoding threads."""
    _stub(bin_dir, "srun")
    env = {"SLURM_JOB_ID": "7", "SLURM_SUBMIT_DIR": str(REPO), "SLURM_NTASKS_PER_NODE": "8",
           "SLURM_CPUS_PER_TASK": "6", "VENV": str(venv)}
    out = _run([LAUNCH / "slurm.sbatch", "--dry-run"], bin_dir, env=env)
    assert out.returncode == 0, out.stderr
    steps = [line for line in out.stdout.splitlines() if line.startswith("+ srun ")]
    assert len(steps) == 3  # train, then the two evaluations
    assert all("srun --ntasks-per-node=8 --cpus-per-task=6 --kill-on-bad-exit=1 " in line
               for line in steps), steps


def _logging_stub(path, name, log):
    """A fake `name` that records its call in `log` and fails."""
    (path / name).write_text(f"#!/bin/sh\necho \"{name} $*\" >> '{log}'\nexit 1\n")
    (path / name).chmod(0o755)


@pytest.fixture
def all_stubs(bin_dir, tmp_path, venv):
    """bin_dir with logging gcloud/srun/nvidia-smi, and the environment each script needs."""
    log = tmp_path / "calls.log"
    for tool in ("gcloud", "srun", "nvidia-smi"):
        _logging_stub(bin_dir, tool, log)
    env = {"SLURM_JOB_ID": "7", "SLURM_SUBMIT_DIR": str(REPO), "SLURM_NTASKS_PER_NODE": "2",
           "VENV": str(venv), "PYTHON": sys.executable}
    return bin_dir, env, log


# Each script's own options, then a mistyped one; no --dry-run, so anything that ran would be real.
UNKNOWN_OPTION_CASES = {
    "gpu.sh": ["--skip-install"],
    "tpu_vm.sh": ["--zone", "z", "--workdir", "gs://b/w"],
    "slurm.sbatch": [],
    "local_cluster.sh": ["-n", "1"],
    "cpu.sh": [],
}


@pytest.mark.parametrize("script", UNKNOWN_OPTION_CASES)
@pytest.mark.parametrize("bad", [["--dryrun"], ["--config.train.num_steps=5", "--dry-run"],
                                 ["--config.data.aug.hflip", "--bogus"],  # a boolean takes no value
                                 ["--", "--config.train.num_steps=5", "stray"],
                                 ["--config", "configs/smoke.py"]])
def test_unknown_option_fails_before_anything_runs(all_stubs, script, bad):
    """A mistyped option is a usage error at once, not jaxseg.train's after the setup (or a VM)."""
    path, env, log = all_stubs
    out = _run([LAUNCH / script, *UNKNOWN_OPTION_CASES[script], *bad], path, env=env)
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"{script}: error: " in out.stderr and "--config.FIELD=VALUE" in out.stderr
    assert "see " + script + " --help" in out.stderr
    assert not log.exists(), log.read_text()  # no gcloud/srun/nvidia-smi call
    assert "+ " not in out.stdout  # no command printed (or run)
    assert "Python 3.12" not in out.stderr  # cpu.sh: the setup did not start either


@pytest.mark.parametrize("script", [["local_cluster.sh", "-n", "2", "--dry-run"],
                                    ["local_cluster.sh", "-m", "evaluate", "--dry-run"],
                                    ["slurm.sbatch"],
                                    ["tpu_vm.sh", "--zone", "z", "--workdir", "gs://b/w"]])
@pytest.mark.parametrize("flag", [["--process_id=1"], ["--num_processes", "4"],
                                  ["--config.train.num_steps=5", "--coordinator_address=h:1"]])
def test_scripts_that_start_a_cluster_refuse_the_process_flags(all_stubs, script, flag):
    """Each process's place comes from the script (or SLURM, or the TPU VM); the same
    --process_id on every process made them all process 0, and --num_processes=4 on a cluster of
    2 waited out JAX's start-up timeout. The help says only config overrides go through."""
    path, env, log = all_stubs
    out = _run([LAUNCH / script[0], *script[1:], "--", *flag], path, env=env)
    assert out.returncode == 2, out.stdout + out.stderr
    assert (f"{script[0]}: error: '{flag[-1] if '=' in flag[-1] else flag[0]}': {script[0]} "
            "gives each process its place in the cluster itself") in out.stderr
    assert not log.exists(), log.read_text()  # no gcloud/srun call
    assert "+ " not in out.stdout and "local cluster:" not in out.stdout


def test_training_overrides_pass_the_check(all_stubs):
    path, env, _ = all_stubs
    args = ["--config.train.num_steps=5", "--config.train.batch_size", "8",
            "--noconfig.data.aug.hflip", "--num_processes=1", "--config.data.folder", "-photos"]
    out = _run([LAUNCH / "gpu.sh", "--dry-run", "--skip-install", *args], path, env=env)
    assert out.returncode == 0, out.stderr
    assert "--workdir runs/gpu " + " ".join(args) in out.stdout
    out = _run([LAUNCH / "local_cluster.sh", "-m", "evaluate", "--dry-run", "--dataset",
                "ccp_person", "--flip_tta", "--split", "test"], path, env=env)
    assert out.returncode == 0, out.stderr  # evaluate's own flags: checked by evaluate itself


def test_tpu_checks_arguments_before_gcloud(all_stubs, tmp_path):
    """A --manual-dir with a space used to be refused only after the VM was created."""
    path, env, log = all_stubs
    data = tmp_path / "my data"
    (data / "portraits").mkdir(parents=True)
    out = _run([LAUNCH / "tpu_vm.sh", "--zone", "z", "--workdir", "gs://b/w", "--manual-dir", data],
               path, env=env)
    assert out.returncode == 2 and "without spaces" in out.stderr
    assert not log.exists(), log.read_text()


@pytest.fixture
def cpu_tree(tmp_path, bin_dir):
    """launch/cpu.sh in a copy of launch/ whose setup_env.sh does nothing and a `python` that
    prints its arguments: what cpu.sh would train and evaluate, without doing it."""
    tree = tmp_path / "repo"
    (tree / "launch").mkdir(parents=True)
    for name in ("cpu.sh", "train_args.sh"):
        shutil.copy(LAUNCH / name, tree / "launch" / name)
    (tree / "launch" / "setup_env.sh").write_text("echo 'setup done'\n")
    (bin_dir / "python").write_text('#!/bin/sh\necho "ran python $*"\n')
    (bin_dir / "python").chmod(0o755)
    return tree / "launch" / "cpu.sh", bin_dir


@pytest.mark.parametrize("args,workdir,rest", [
    ([], "runs/default", ""),
    (["--config.train.num_steps=5"], "runs/default", " --config.train.num_steps=5"),
    (["--", "--config.train.num_steps=5"], "runs/default", " --config.train.num_steps=5"),
    (["runs/x", "--config.train.num_steps=5"], "runs/x", " --config.train.num_steps=5"),
    (["runs/x", "--", "--config.train.num_steps=5"], "runs/x", " --config.train.num_steps=5")])
def test_cpu_first_argument(cpu_tree, args, workdir, rest):
    """A first argument starting with '-' is an option, not the workdir."""
    script, path = cpu_tree
    out = _run([script, *args], path)
    assert out.returncode == 0, out.stderr
    assert (f"ran python -m jaxseg.train --config configs/default.py --workdir {workdir}{rest}\n"
            in out.stdout)
    for dataset in ("portrait_segmentation", "ccp_person"):  # the best checkpoint, on test
        assert (f"ran python -m jaxseg.evaluate --workdir {workdir} --dataset {dataset} "
                f"--split test\n") in out.stdout


def test_cpu_help_and_bad_option(cpu_tree):
    script, path = cpu_tree
    for flag in ("-h", "--help"):
        out = _run([script, flag], path)
        assert out.returncode == 0 and "Usage: bash launch/cpu.sh" in out.stdout
        assert "setup done" not in out.stdout
    out = _run([script, "--dryrun"], path)
    assert out.returncode == 2 and "unknown option '--dryrun'" in out.stderr
    assert "setup done" not in out.stdout and "ran python" not in out.stdout


def test_cpu_help_says_how_to_choose_what_it_refuses(cpu_tree):
    """cpu.sh refuses --config and --workdir, naming its help as the place that says how to
    choose them: it said nothing of another config."""
    script, path = cpu_tree
    help_text = _run([script, "--help"], path).stdout
    for flag, how in (("--config", "python -m jaxseg.train --config FILE --workdir DIR"),
                      ("--workdir", "[WORKDIR (default runs/default)]")):
        out = _run([script, flag, "x"], path)
        assert out.returncode == 2 and "its help says how to choose it" in out.stderr
        assert how in " ".join(help_text.split()), help_text


def test_local_cluster_dry_run(bin_dir):
    out = _run([LAUNCH / "local_cluster.sh", "-n", "3", "-d", "4", "-p", "12345", "--dry-run",
                "--config.train.num_steps=5"], bin_dir, env={"PYTHON": sys.executable})
    assert out.returncode == 0, out.stderr
    assert "3 processes x 4 CPU devices, coordinator 127.0.0.1:12345" in out.stdout
    assert "--xla_force_host_platform_device_count=4" in out.stdout
    assert ("-m jaxseg.train --config configs/smoke.py --workdir runs/local_cluster "
            "--config.train.num_steps=5") in out.stdout
    out = _run([LAUNCH / "local_cluster.sh", "-m", "evaluate", "--dry-run", "--dataset", "ccp_person"],
               bin_dir, env={"PYTHON": sys.executable})
    assert "-m jaxseg.evaluate --workdir runs/local_cluster --dataset ccp_person" in out.stdout
    out = _run([LAUNCH / "local_cluster.sh", "-n", "0"], bin_dir, env={"PYTHON": sys.executable})
    assert out.returncode != 0 and "-n must be a positive integer" in out.stderr


@pytest.mark.parametrize("args, error", [
    (["-n"], "-n needs a value"), (["--dry-run", "-w"], "-w needs a value"),
    (["-p", "0", "--dry-run"], "-p must be a port number (1-65535), got '0'"),
    (["-p", "65536", "--dry-run"], "-p must be a port number (1-65535), got '65536'")])
def test_local_cluster_refuses_a_missing_value_or_port_in_its_error_format(bin_dir, args, error):
    """An option without its value (the last argument), or a port outside 1-65535, is a usage
    error (status 2) in the script's own words, as its other argument errors are."""
    out = _run([LAUNCH / "local_cluster.sh", *args], bin_dir, env={"PYTHON": sys.executable})
    assert (out.returncode, out.stderr) == (2, f"local_cluster.sh: error: {error}\n")


CLUSTER_CHECK = textwrap.dedent('''
    """Joins the cluster from the JAXSEG_* variables and sums one value per device over processes."""
    import os
    import sys

    if os.environ["JAXSEG_PROCESS_ID"] == "1" and "--fail" in sys.argv:
        sys.exit(7)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    jax.distributed.initialize(os.environ["JAXSEG_COORDINATOR_ADDRESS"],
                               int(os.environ["JAXSEG_NUM_PROCESSES"]),
                               int(os.environ["JAXSEG_PROCESS_ID"]))
    mesh = jax.make_mesh((jax.device_count(),), ("d",))
    local = np.full((jax.local_device_count(),), jax.process_index() + 1, np.float32)
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("d")), local)
    total = float(jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x))
    print(f"process {jax.process_index()} of {jax.process_count()}: {jax.device_count()} devices,"
          f" total {total}")
''')


@pytest.fixture
def cluster_module(tmp_path):
    (tmp_path / "mod").mkdir()
    (tmp_path / "mod" / "cluster_check.py").write_text(CLUSTER_CHECK)
    return {"PYTHON": sys.executable, "PYTHONPATH": str(tmp_path / "mod"),
            "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}  # must be overridden


def test_local_cluster_runs_collective(cluster_module, tmp_path):
    """2 processes x 2 devices: process p contributes p + 1 per device, so the sum is 2*1 + 2*2."""
    out = _run([LAUNCH / "local_cluster.sh", "-n", "2", "-d", "2", "-m", "cluster_check", "-w",
                tmp_path / "w"], os.environ["PATH"], env=cluster_module, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    for i in range(2):
        log = (tmp_path / "w" / "logs" / f"process_{i}.log").read_text()
        assert f"process {i} of 2: 4 devices, total 6.0" in log
    assert "all 2 processes finished" in out.stdout


def test_local_cluster_failure_stops_the_others(cluster_module, tmp_path):
    """Process 1 exits at once; 0 and 2 (waiting for it) are stopped, with process 1's status."""
    out = _run([LAUNCH / "local_cluster.sh", "-n", "3", "-d", "1", "-m", "cluster_check", "-l",
                tmp_path / "logs", "--", "--fail"], os.environ["PATH"], env=cluster_module,
               timeout=120)
    assert out.returncode == 7, out.stdout + out.stderr
    assert "process 1 failed (exit 7); stopping the others" in out.stderr


FAKE_TRAIN = textwrap.dedent('''
    """Stands in for jaxseg.train in the local_cluster.sh tests, without JAX.

    Prints "process <i> ready <pid> <message>" once its signal handlers are set. Then with
    --exit=S process 1 exits with S at once; with --sigkill process 1 is killed by SIGKILL and
    process 0 fails (exit 1, as in a collective after its peer's death) once process 1 is gone;
    with --abort process 1 fails (exit 1) and process 0 is aborted (SIGABRT, as JAX's
    coordination service aborts the peers of a failed process) once process 1 is gone.
    Otherwise it waits for a stop, as jaxseg.train does: a first SIGTERM or Ctrl-C asks for a
    save, which takes --save_s seconds (a validation, then the checkpoint), then it exits 75; a
    second Ctrl-C stops it at once.
    """
    import argparse
    import fcntl
    import os
    import pathlib
    import signal
    import sys
    import time

    parser = argparse.ArgumentParser()
    parser.add_argument("--save_s", type=float, default=0.0)
    parser.add_argument("--exit", type=int)
    parser.add_argument("--sigkill", action="store_true")
    parser.add_argument("--abort", action="store_true")
    parser.add_argument("--message", default="")
    args = parser.parse_args()
    index = int(os.environ["JAXSEG_PROCESS_ID"])
    requested = False


    def handle(signum, frame):
        global requested
        if signum == signal.SIGINT and requested:
            raise KeyboardInterrupt
        requested = True


    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    lock = pathlib.Path(os.environ["FAKE_TRAIN_DIR"]) / "process_1.lock"
    if (args.sigkill or args.abort) and index == 1:
        held = open(lock, "w")
        fcntl.flock(held, fcntl.LOCK_EX)  # released by the kernel when this process dies
        lock.with_suffix(".held").touch()
    print(f"process {index} ready {os.getpid()} {args.message}", flush=True)
    if args.exit is not None and index == 1:
        sys.exit(args.exit)
    if args.sigkill or args.abort:
        if index == 1:
            if args.abort:
                sys.exit(1)
            os.kill(os.getpid(), signal.SIGKILL)
        while not lock.with_suffix(".held").exists():
            time.sleep(0.01)
        with open(lock) as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # waits for process 1's death
        if args.abort:
            print("Terminating process because the JAX distributed service detected fatal "
                  "errors", flush=True)
            os.abort()
        print("Gloo: connection closed by peer", flush=True)
        sys.exit(1)
    while not requested:
        time.sleep(0.05)
    print(f"process {index} saving", flush=True)
    time.sleep(args.save_s)
    print(f"process {index} saved", flush=True)
    sys.exit(75)
''')


@pytest.fixture
def fake_train(tmp_path):
    (tmp_path / "mod").mkdir()
    (tmp_path / "mod" / "fake_train.py").write_text(FAKE_TRAIN)
    return {"PYTHON": sys.executable, "PYTHONPATH": str(tmp_path / "mod"),
            "FAKE_TRAIN_DIR": str(tmp_path)}


def _start_fake_cluster(fake_train, logs, num, *args):
    """local_cluster.sh running fake_train in a session of its own (its process group is what a
    terminal's Ctrl-C reaches), once every process has its signal handlers."""
    proc = subprocess.Popen(
        ["bash", LAUNCH / "local_cluster.sh", "-n", str(num), "-d", "1", "-m", "fake_train",
         "-l", logs, "--", *args], cwd=REPO,
        env={"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), **fake_train},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 60
    while not all((logs / f"process_{i}.log").exists()
                  and "ready" in (logs / f"process_{i}.log").read_text() for i in range(num)):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    return proc


@pytest.mark.parametrize("how", ["SIGTERM to the script", "Ctrl-C"])
def test_local_cluster_stop_waits_for_the_saves(fake_train, tmp_path, how):
    """A save that takes longer than 10 s (a validation first) is waited for, not killed (it
    left a checkpoint-tmp folder, and the rerun lost steps), and the script exits 75 as each
    process does. Ctrl-C reaches the processes from the terminal, and SIGTERM from the script."""
    logs = tmp_path / "logs"
    proc = _start_fake_cluster(fake_train, logs, 2, "--save_s=13")
    if how == "Ctrl-C":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=90)
    assert proc.returncode == 75, stdout + stderr
    for i in range(2):
        assert f"process {i} saved" in (logs / f"process_{i}.log").read_text(), stderr
    assert "all 2 processes stopped after saving (exit 75): rerun the same command" in stderr


def test_local_cluster_second_signal_kills_at_once(fake_train, tmp_path):
    """A second SIGTERM (or Ctrl-C) while the processes save kills them at once."""
    logs = tmp_path / "logs"
    proc = _start_fake_cluster(fake_train, logs, 2, "--save_s=60")
    pids = [int((logs / f"process_{i}.log").read_text().split("ready ")[1].split()[0])
            for i in range(2)]
    proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    while not all("saving" in (logs / f"process_{i}.log").read_text() for i in range(2)):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    time.sleep(1)
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=90)
    assert time.monotonic() - start < 15, stderr  # not the 60 s save
    assert proc.returncode == 143, stdout + stderr  # 128 + SIGTERM, the script's own stop
    for i in range(2):
        assert f"process {i} was killed by this script's SIGKILL (exit 137)" in stderr
        with pytest.raises(ProcessLookupError):
            os.kill(pids[i], 0)


def test_local_cluster_keeps_earlier_logs(fake_train, tmp_path):
    """A rerun (to resume, or -m evaluate on the same workdir) appends to the logs, after a line
    per launch: the first launch's error, which the script pointed at, is still there."""
    logs = tmp_path / "logs"
    args = ["-n", "2", "-d", "1", "-m", "fake_train", "-l", logs, "--"]
    out = _run([LAUNCH / "local_cluster.sh", *args, "--exit=7", "--message=first"],
               os.environ["PATH"], env=fake_train)
    assert out.returncode == 7, out.stdout + out.stderr
    assert f"{logs}/process_1.log" in out.stderr and "first" in out.stderr
    out = _run([LAUNCH / "local_cluster.sh", *args, "--exit=3", "--message=second"],
               os.environ["PATH"], env=fake_train)
    assert out.returncode == 3, out.stdout + out.stderr
    log = (logs / "process_1.log").read_text()
    headers = [line for line in log.splitlines() if line.startswith("==== ")]
    said = [line for line in log.splitlines() if line.startswith("process 1 ready")]
    assert [line.split()[-1] for line in said] == ["first", "second"], log
    assert len(headers) == 2 and all("local_cluster.sh" in h and "process 1 of 2" in h
                                     and "-m fake_train" in h for h in headers), headers
    assert "second" in out.stderr and "first" not in out.stderr  # this launch's part of the log
    assert (logs / "process_0.log").read_text().count("ready") == 2


@pytest.mark.parametrize("flag, status, cause, effect", [
    # Process 1 is killed (SIGKILL: the machine's OOM killer, say), and process 0 fails on its next
    # collective: the cause is process 1's death, not process 0's error.
    ("--sigkill", 137, "process 1 was killed by SIGKILL (exit 137)", "process 0 failed (exit 1)"),
    # Process 1 fails of itself (exit 1) and JAX aborts process 0 for it (SIGABRT, at once, so
    # both end in one poll): the cause is process 1, not the aborted peer.
    ("--abort", 1, "process 1 failed (exit 1)", "process 0 was killed by SIGABRT (exit 134)")])
def test_local_cluster_reports_the_process_that_failed_first(fake_train, tmp_path, flag, status,
                                                             cause, effect):
    logs = tmp_path / "logs"
    out = _run([LAUNCH / "local_cluster.sh", "-n", "2", "-d", "1", "-m", "fake_train", "-l", logs,
                "--", flag], os.environ["PATH"], env=fake_train)
    assert out.returncode == status, out.stdout + out.stderr
    assert out.stderr.index(cause) < out.stderr.index(effect), out.stderr
    assert f"the end of {logs}/process_1.log" in out.stderr, out.stderr


@pytest.mark.parametrize("name,num_devices", [("gpu", 1), ("tpu", 32), ("tpu", 8)])
def test_accelerator_configs(name, num_devices):
    import importlib

    config = importlib.import_module(f"configs.{name}").get_config()
    assert config.model.compute_dtype == "bfloat16"
    assert config.data.image_size == 256
    from jaxseg import config_check

    config_check.validate(config, num_devices=num_devices)


def test_gpu_array_train_set_overrides_fields_by_their_type():
    import importlib.util

    from configs import default

    spec = importlib.util.spec_from_file_location("gpu_array_train", LAUNCH / "gpu_array_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = default.get_config()
    assert module.parse_like(config, "data.aug.copy_paste", "0.5") == 0.5
    assert module.parse_like(config, "model.base_features", "32") == 32
    assert module.parse_like(config, "data.aug.hflip", "False") is False
    for field, text, message in [
            ("data.aug.copypaste", "1", "copy_paste"),  # a typo: the known name is suggested
            ("data.aug.hflip", "2", "true or false"),
            ("optim.step_fractions", "0.5,0.9", "single numbers"),
            ("data.aug", "1", "single numbers"),
            ("train.num_steps", "10", "set by this script"),
            ("eval.batch_size", "8", "set by this script"),
            ("train.eval_every", "5", "not read by this script"),  # once accepted and ignored
            ("data.eval", "ccp_person", "not read by this script"),
            ("eval.flip_tta", "true", "not read by this script"),
            ("model.base_features", "wide", "invalid literal")]:
        with pytest.raises((KeyError, ValueError), match=message):
            module.parse_like(config, field, text)


def _load_launch_module(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, LAUNCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("argv,message", [
    (["--set", "data.aug.copy_paste"], "--set data.aug.copy_paste: expected FIELD=VALUE"),
    (["--set", "data.aug.nope=1"], "--set data.aug.nope: unknown field 'nope' in data.aug"),
    (["--set", "nope.x=1"], "unknown field 'nope' at the top level"),
    (["--set", "data.aug.copy_paste.x=1"], "data.aug.copy_paste is a value, not a section"),
    (["--set", "data.aug.copypaste=1"], "did you mean data.aug.copy_paste?")])
def test_gpu_array_train_set_errors_are_usage_errors(monkeypatch, capsys, tmp_path, argv, message):
    """Refused before the (here missing) data file is opened, with a message naming the field."""
    module = _load_launch_module("gpu_array_train")
    monkeypatch.setattr(sys, "argv", ["gpu_array_train.py", "--data", str(tmp_path / "none.npz"),
                                      "--out", str(tmp_path / "run"), *argv])
    with pytest.raises(SystemExit) as e:
        module.main()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "gpu_array_train.py: error: --set " in err and message in err, err
    assert "--set: --set" not in err and "\"'" not in err
    assert not (tmp_path / "run").exists()


def test_gpu_array_train_refuses_an_earlier_run(monkeypatch, capsys, tmp_path):
    module = _load_launch_module("gpu_array_train")
    run = tmp_path / "run"
    run.mkdir()
    np.savez(run / "model_state.npz", w=np.ones(2))
    monkeypatch.setattr(sys, "argv", ["gpu_array_train.py", "--data", str(tmp_path / "none.npz"),
                                      "--out", str(run)])
    with pytest.raises(SystemExit) as e:
        module.main()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "already holds a model_state.npz" in err and "use a new --out" in err
    assert np.load(run / "model_state.npz")["w"].tolist() == [1.0, 1.0]  # untouched


@pytest.mark.parametrize("argv,message", [
    (["--set", "train.ema_decay=1.5"], "train.ema_decay=1.5 must be in [0, 1)"),
    # A negative step count trained and saved nothing and exited 0.
    (["--num_steps", "-5"], "--num_steps: must be at least 0, got -5"),
    (["--budget_s", "-1"], "--budget_s: must be a finite number above 0, got -1"),
    # A nan deadline compared false with every time: the run never stopped.
    (["--deadline_s", "nan"], "--deadline_s: must be a number, got nan")])
def test_gpu_array_train_refuses_an_impossible_config_or_step_count(monkeypatch, capsys, tmp_path,
                                                                    argv, message):
    """Refused before the data is opened (the config checked by jaxseg.config_check, as
    jaxseg.train checks it)."""
    module = _load_launch_module("gpu_array_train")
    monkeypatch.setattr(sys, "argv", ["gpu_array_train.py", "--data", str(tmp_path / "none.npz"),
                                      "--out", str(tmp_path / "run"), *argv])
    with pytest.raises(SystemExit) as e:
        module.main()
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_gpu_array_train_refuses_an_out_it_cannot_write_before_the_data(monkeypatch, capsys,
                                                                        tmp_path):
    """--out is created after the data is decoded and the step compiled: one under a file failed
    there, minutes into a rented machine, with a traceback."""
    module = _load_launch_module("gpu_array_train")
    (tmp_path / "file").write_text("a file, not a folder\n")
    monkeypatch.setattr(sys, "argv", ["gpu_array_train.py", "--data", str(tmp_path / "none.npz"),
                                      "--out", str(tmp_path / "file" / "run")])
    with pytest.raises(SystemExit) as e:
        module.main()
    assert e.value.code == 2
    assert f"error: --out {tmp_path / 'file' / 'run'}: {tmp_path / 'file'} is not a folder" in (
        capsys.readouterr().err)


def _tiny_array_file(monkeypatch, path, datasets: str, *, per_split: int):
    """An array file (launch/make_array_file.py) of 16 px random examples: `per_split` in each
    split of each of the comma-separated `datasets`."""
    rng = np.random.default_rng(0)
    examples = [{"image": rng.integers(0, 255, (20, 24, 3), dtype=np.uint8),
                 "mask": (rng.random((20, 24, 1)) > 0.5).astype(np.uint8)}
                for _ in range(per_split)]
    packer = _load_launch_module("make_array_file")
    monkeypatch.setattr(packer.datasets, "data_source", lambda name, split: examples)
    monkeypatch.setattr(sys, "argv", ["make_array_file.py", "--size", "16", "--datasets",
                                      datasets, "--output", str(path)])
    packer.main()
    return path


def test_gpu_array_train_runs_the_configured_mixture_without_tensorflow_or_opencv(monkeypatch,
                                                                                  tmp_path):
    """A tiny run on CPU, with TensorFlow, TFDS and OpenCV blocked as on the accelerator machine
    (a config check importing jaxseg.datasets for its names stopped the script at its first line
    there): it trains on the datasets the run's data.train names (the default config's mixture of
    both was used), without augmentation under data.aug.enabled=false (both --set fields the
    script once left unread), and validates on every dataset of the file."""
    data = _tiny_array_file(monkeypatch, tmp_path / "arr.npz",
                            "portrait_segmentation,ccp_person", per_split=3)
    prelude = ("import sys; sys.modules.update(dict.fromkeys(('tensorflow', 'tensorflow_datasets', "
               "'cv2'))); from jaxseg import device_augment; "
               "device_augment.augment_batch = lambda *a: sys.exit('augmented with "
               "data.aug.enabled=false'); sys.argv.pop(0); import runpy; "
               "runpy.run_path(sys.argv[0], run_name='__main__')")
    out = subprocess.run(
        [sys.executable, "-c", prelude, LAUNCH / "gpu_array_train.py", "--data", data,
         "--out", tmp_path / "run", "--num_steps", "2", "--batch_size", "8", "--base_features", "4",
         "--num_validations", "1", "--set", "data.train=portrait_segmentation:3",
         "--set", "data.aug.enabled=false"],
        cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True,
        timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["batch_mixture"] == {"portrait_segmentation": 8}
    assert summary["train_examples"] == {"portrait_segmentation": 3}
    assert summary["validation_examples"] == {"portrait_segmentation": 3, "ccp_person": 3}
    assert summary["config"]["data"]["train"] == "portrait_segmentation:3"
    assert summary["steps_done"] == 2
    with zipfile.ZipFile(tmp_path / "run" / "model_state.npz") as weights:
        assert {i.compress_type for i in weights.infolist()} == {zipfile.ZIP_DEFLATED}
    # Saved as pretrained, the run keeps its own output shift unless told another.
    saver = _load_launch_module("save_pretrained_from_npz")
    model, config, _ = saver.load_run(tmp_path / "run")
    assert model.output_shift == (0.0, 0.0) and tuple(config.model.output_shift) == (0.0, 0.0)
    model, config, _ = saver.load_run(tmp_path / "run", (0.5, 0.0))
    assert model.output_shift == (0.5, 0.0) and tuple(config.model.output_shift) == (0.5, 0.0)


@pytest.mark.parametrize("case", ["depth too deep for the file's size", "no training rows"])
def test_gpu_array_train_checks_the_run_against_the_file(monkeypatch, capsys, tmp_path, case):
    """Before training: a depth that the file's 16 px does not allow (checked at 256 only, it
    failed inside the model), and a trained dataset without training rows (a gather error)."""
    data = _tiny_array_file(monkeypatch, tmp_path / "arr.npz",
                            "portrait_segmentation,ccp_person", per_split=2)
    argv = ["gpu_array_train.py", "--data", str(data), "--out", str(tmp_path / "run")]
    if case == "no training rows":
        arrays = dict(np.load(data))
        arrays["split"] = np.where(arrays["source"] == 1, 1, arrays["split"])
        np.savez(data, **arrays)
        message = "holds no training examples of ['ccp_person'], which data.train names"
    else:
        argv += ["--set", "model.depth=5"]
        message = "at 16px: "
    module = _load_launch_module("gpu_array_train")
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as e:
        module.main()
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_gpu_array_train_refuses_an_array_file_of_top_left_masks(monkeypatch, capsys, tmp_path):
    """A file made before masks were resized at pixel centres (no mask_resize key) would train a
    model half a pixel low again: refused, with what to do."""
    data = _tiny_array_file(monkeypatch, tmp_path / "arr.npz", "ccp_person", per_split=2)
    z = dict(np.load(data))
    assert str(z.pop("mask_resize")) == "centre"
    np.savez(tmp_path / "old.npz", **z)
    module = _load_launch_module("gpu_array_train")
    monkeypatch.setattr(sys, "argv", ["gpu_array_train.py", "--data", str(tmp_path / "old.npz"),
                                      "--out", str(tmp_path / "run"), "--batch_size", "8",
                                      "--set", "data.train=ccp_person"])
    with pytest.raises(SystemExit) as e:
        module.main()
    assert e.value.code == 2
    assert "make it again with launch/make_array_file.py" in capsys.readouterr().err


@pytest.mark.parametrize("name, message", [
    ("none.npz", "cannot read it (No such file or directory)"),
    ("text.npz", "not an array file of launch/make_array_file.py"),
    ("cut.npz", "not an array file of launch/make_array_file.py"),
    ("one.npy", "not an array file of launch/make_array_file.py")])
def test_gpu_array_train_refuses_a_missing_or_unreadable_array_file(monkeypatch, capsys, tmp_path,
                                                                    name, message):
    (tmp_path / "text.npz").write_text("not an array file\n")
    np.savez(tmp_path / "whole.npz", a=np.arange(1000))
    (tmp_path / "cut.npz").write_bytes((tmp_path / "whole.npz").read_bytes()[:500])
    np.save(tmp_path / "one.npy", np.arange(3))
    module = _load_launch_module("gpu_array_train")
    monkeypatch.setattr(sys, "argv", ["gpu_array_train.py", "--data", str(tmp_path / name),
                                      "--out", str(tmp_path / "run")])
    with pytest.raises(SystemExit) as e:
        module.main()
    assert e.value.code == 2
    assert f"error: --data {tmp_path / name}: {message}" in capsys.readouterr().err


def test_gpu_array_train_refuses_a_mixture_the_file_cannot_give(monkeypatch, capsys, tmp_path):
    """data.train names a dataset the array file lacks: refused, not trained without it."""
    _tiny_array_file(monkeypatch, tmp_path / "arr.npz", "ccp_person", per_split=2)
    module = _load_launch_module("gpu_array_train")
    monkeypatch.setattr(sys, "argv", ["gpu_array_train.py", "--data", str(tmp_path / "arr.npz"),
                                      "--out", str(tmp_path / "run"), "--batch_size", "8"])
    with pytest.raises(SystemExit) as e:
        module.main()  # the default data.train mixes portrait_segmentation and ccp_person
    assert e.value.code == 2
    assert ("data.train names ['portrait_segmentation'], which" in capsys.readouterr().err)
    assert not (tmp_path / "run" / "model_state.npz").exists()


@pytest.mark.parametrize("argv,message", [
    (["--size", "0"], "argument --size: must be at least 1, got 0"),
    (["--datasets", "nope"], "--datasets: unknown dataset 'nope'"),
    (["--datasets", "person_folder"], "--datasets: person_folder needs folder="),
    # OpenCV took 900 (for 90) as 100, a larger file than asked for, and said so once per image.
    (["--jpeg_quality", "900"], "--jpeg_quality must be from 0 to 100, got 900"),
    (["--jpeg_quality", "-1"], "--jpeg_quality must be from 0 to 100, got -1")])
def test_make_array_file_bad_arguments_are_usage_errors(monkeypatch, capsys, tmp_path, argv,
                                                        message):
    """A size OpenCV cannot resize to, a dataset it cannot read and a JPEG quality it does not
    take gave tracebacks or were taken as something else."""
    module = _load_launch_module("make_array_file")
    if argv[0] == "--jpeg_quality":  # refused before any data is read
        monkeypatch.setattr(module.datasets, "data_source", lambda name, split: [])
    monkeypatch.setattr(sys, "argv", ["make_array_file.py", "--output", str(tmp_path / "arr"),
                                      *argv])
    with pytest.raises(SystemExit) as e:
        module.main()
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "arr.npz").exists()


@pytest.mark.parametrize("output,message", [("file/arr", "file is not a folder"),
                                            ("folder.npz", "is a folder: name the file to write")])
def test_make_array_file_refuses_an_unwritable_output_before_reading_data(
        monkeypatch, capsys, tmp_path, output, message):
    """The file is written after every example is encoded: an --output it cannot be written at
    failed there, after all the encoding (33 s at --size 64 here), with a traceback."""
    module = _load_launch_module("make_array_file")
    (tmp_path / "file").write_text("a file, not a folder\n")
    (tmp_path / "folder.npz").mkdir()

    def read(name, split):
        raise AssertionError("the data was read before --output was checked")

    monkeypatch.setattr(module.datasets, "data_source", read)
    monkeypatch.setattr(sys, "argv", ["make_array_file.py", "--output", str(tmp_path / output)])
    with pytest.raises(SystemExit) as e:
        module.main()
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_make_array_file_without_its_data_says_so_in_one_line(monkeypatch, capsys, tmp_path):
    """No manual dir and no network: the builder's own message (how to build offline) ended in
    a traceback, as jaxseg.datasets build, train and evaluate say it in one line."""
    import socket

    module = _load_launch_module("make_array_file")
    build = module.datasets.data_source
    monkeypatch.setattr(module.datasets, "data_source", lambda name, split: build(
        name, split, data_dir=str(tmp_path / "dd")))

    def offline(address, timeout):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "create_connection", offline)
    for name in list(os.environ):
        if name == "JAXSEG_MANUAL_DIR" or name.lower().endswith("_proxy"):
            monkeypatch.delenv(name)
    monkeypatch.setattr(sys, "argv", ["make_array_file.py", "--datasets", "ccp_person",
                                      "--output", str(tmp_path / "arr")])
    with pytest.raises(SystemExit) as e:
        module.main()
    message = str(e.value.code)
    assert message.startswith("error: ccp_person: could not download ") and "\n" not in message
    assert "to build offline, point the manual dir at a folder holding photos" in message
    assert not (tmp_path / "arr.npz").exists()


@pytest.mark.parametrize("output,written", [("arr", "arr.npz"), ("arr.npz", "arr.npz"),
                                            ("sub/arr.v2", "sub/arr.v2.npz")])
def test_make_array_file_output_path(monkeypatch, capsys, tmp_path, output, written):
    """np.savez appends .npz to a name without it: the script reports (and stats) that file."""
    module = _load_launch_module("make_array_file")
    rng = np.random.default_rng(0)
    example = {"image": rng.integers(0, 255, (12, 10, 3), dtype=np.uint8),
               "mask": (rng.random((12, 10, 1)) > 0.5).astype(np.uint8)}
    monkeypatch.setattr(module.datasets, "data_source", lambda name, split: [example] * 2)
    monkeypatch.setattr(sys, "argv", ["make_array_file.py", "--size", "8", "--datasets",
                                      "ccp_person", "--output", str(tmp_path / output)])
    module.main()
    assert f"wrote {tmp_path / written}: " in capsys.readouterr().out
    z = np.load(tmp_path / written)
    assert int(z["size"]) == 8 and z["split"].tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize("script", ["gpu_array_train.py", "make_array_file.py",
                                    "save_pretrained_from_npz.py"])
def test_python_launchers_run_without_pythonpath(script, tmp_path):
    """`python launch/X.py --help` from any folder, with no PYTHONPATH: a real help, no traceback."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, LAUNCH / script, "--help"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: {script}")


def test_setup_env_leaves_the_sourcing_shell_alone(tmp_path):
    """`source launch/setup_env.sh` (the README's way) once turned on errexit in the user's shell,
    so that the next failing command closed it, and its own failure `exit`ed that shell."""
    tree = tmp_path / "repo"
    (tree / "launch").mkdir(parents=True)
    shutil.copy(LAUNCH / "setup_env.sh", tree / "launch" / "setup_env.sh")
    (tree / "requirements.txt").write_text("")
    report = 'echo "rc=$? opts=$-"; set -o | grep pipefail; false; echo alive'
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    # No .venv and a Python that fails: the setup fails, and returns.
    out = subprocess.run(["bash", "-c", f"PYTHON=false source launch/setup_env.sh; {report}"],
                         cwd=tree, env=env, capture_output=True, text=True, timeout=60)
    assert "rc=1" in out.stdout and "alive" in out.stdout, out.stdout + out.stderr
    # A .venv whose tools succeed: the setup succeeds and changes no shell option.
    venv_bin = tree / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    for tool in ("python", "pip"):
        (venv_bin / tool).write_text("#!/bin/sh\necho 'Python 3.12.0'\n")
        (venv_bin / tool).chmod(0o755)
    out = subprocess.run(["bash", "-c", f"source launch/setup_env.sh; {report}"], cwd=tree,
                         env=env, capture_output=True, text=True, timeout=60)
    assert "environment ready" in out.stdout and "rc=0" in out.stdout, out.stdout + out.stderr
    opts = out.stdout.split("opts=")[1].split()[0]
    assert "e" not in opts and "u" not in opts
    assert "pipefail" in out.stdout and "on" not in out.stdout.split("pipefail")[1].split()[0]
    assert "alive" in out.stdout


def _setup_env_tree(tmp_path, venv_python: str):
    """A repository tree holding setup_env.sh, an empty requirements.txt and a .venv whose python
    is `venv_python` (a shell script) and whose pip leaves a mark when it runs."""
    tree = tmp_path / "repo"
    (tree / "launch").mkdir(parents=True)
    shutil.copy(LAUNCH / "setup_env.sh", tree / "launch" / "setup_env.sh")
    (tree / "requirements.txt").write_text("")
    venv_bin = tree / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").write_text(venv_python)
    (venv_bin / "pip").write_text(f"#!/bin/sh\ntouch {tmp_path / 'pip_ran'}\n")
    for tool in ("python", "pip"):
        (venv_bin / tool).chmod(0o755)
    return tree


def test_setup_env_refuses_a_venv_of_an_older_python(tmp_path):
    """A .venv made by an older Python was reused, and failed at every pip install."""
    tree = _setup_env_tree(  # fails the version check, as Python 3.11 does
        tmp_path, "#!/bin/sh\n[ \"$1\" = -c ] && exit 1\necho 'Python 3.11.7'\n")
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    out = subprocess.run(["bash", "-c", "source launch/setup_env.sh; echo rc=$?"], cwd=tree,
                         env=env, capture_output=True, text=True, timeout=60)
    assert "rc=1" in out.stdout, out.stdout + out.stderr
    assert "/.venv has Python 3.11.7, and jax 0.12 needs 3.12 or newer" in out.stderr
    assert not (tmp_path / "pip_ran").exists()


@pytest.mark.skipif(shutil.which("dash") is None, reason="needs dash")
def test_setup_env_sourced_from_another_shell_says_so(tmp_path):
    """Sourced from dash or zsh, it found no BASH_SOURCE and made .venv in the wrong folder."""
    tree = _setup_env_tree(tmp_path, "#!/bin/sh\necho 'Python 3.12.0'\n")
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    out = subprocess.run([shutil.which("dash"), "-c", ". launch/setup_env.sh; echo rc=$?"],
                         cwd=tree, env=env, capture_output=True, text=True, timeout=60)
    assert "rc=1" in out.stdout and "from bash" in out.stderr, out.stdout + out.stderr
    assert not (tmp_path / ".venv").exists() and not (tmp_path / "pip_ran").exists()


def test_make_array_file_stores_each_example_as_rgb_photo_and_0_255_mask(monkeypatch, tmp_path):
    """Each row is its (dataset, split) example resized as jaxseg resizes it: the JPEG decodes
    (by Pillow, as gpu_array_train.py reads it) to the RGB photo, the PNG to the mask times 255,
    and the split and source columns say where it came from."""
    from PIL import Image

    from jaxseg import resolution

    module = _load_launch_module("make_array_file")
    names, splits = ["portrait_segmentation", "ccp_person"], ["train", "validation"]
    rng = np.random.default_rng(2)
    sources = {}
    for d, name in enumerate(names):
        for s, split in enumerate(splits):
            # A smooth photo of a colour of its own (far from its channels reversed) and a mask
            # of its own, so that a row from the wrong place or in BGR order shows.
            colour = np.array([200 - 60 * d, 40 + 100 * s, 20 + 30 * d], np.float32)
            ramp = np.linspace(0, 30, 24, dtype=np.float32)[None, :, None]
            image = np.broadcast_to(colour + ramp, (20, 24, 3)).astype(np.uint8)
            mask = (rng.random((20, 24, 1)) > 0.5).astype(np.uint8)
            sources[name, split] = [{"image": image, "mask": mask}] * (2 + d + s)
    monkeypatch.setattr(module.datasets, "data_source", lambda name, split: sources[name, split])
    out = {}
    for quality in (100, 30):
        monkeypatch.setattr(sys, "argv", ["make_array_file.py", "--size", "16", "--datasets",
                                          ",".join(names), "--output", str(tmp_path / f"q{quality}"),
                                          "--jpeg_quality", str(quality)])
        module.main()
        out[quality] = np.load(tmp_path / f"q{quality}.npz")
    z = out[100]
    assert [str(n) for n in z["source_names"]] == names
    assert len(z["split"]) == len(z["source"]) == sum(len(v) for v in sources.values())

    def decoded(kind, k):
        a, b = z[f"{kind}_offsets"][k:k + 2]
        return np.asarray(Image.open(io.BytesIO(z[f"{kind}_bytes"][a:b].tobytes())))

    rows = {}
    for k, (s, d) in enumerate(zip(z["split"], z["source"])):
        key = (names[d], splits[s])
        rows[key] = rows.get(key, 0) + 1
        example = sources[key][0]
        photo = decoded("image", k).astype(np.float32)
        assert photo.shape == (16, 16, 3)
        assert np.abs(photo - resolution.resize_image(example["image"], 16)).mean() < 2, key
        np.testing.assert_array_equal(decoded("mask", k),
                                      resolution.resize_mask(example["mask"], 16)[..., 0] * 255)
    assert rows == {key: len(v) for key, v in sources.items()}
    # --jpeg_quality reaches the encoder.
    assert len(out[30]["image_bytes"]) < len(z["image_bytes"])


def test_gpu_array_train_config_takes_every_flag():
    """config_for: the flags reach the config that is trained and saved in summary.json."""
    import argparse

    module = _load_launch_module("gpu_array_train")
    args = argparse.Namespace(base_features=8, residual=True, batch_size=24, ema_decay=0.5,
                              boundary_weight=2.0, learning_rate=0.01,
                              set=["data.aug.copy_paste=0.25", "model.depth=3"])
    c = module.config_for(64, 50, args)
    assert (c.data.image_size, c.model.base_features, c.model.residual, c.model.depth) == (64, 8, True, 3)
    assert (c.train.batch_size, c.eval.batch_size, c.train.num_steps) == (24, 24, 50)
    assert (c.train.ema_decay, c.loss.boundary_weight, c.optim.learning_rate) == (0.5, 2.0, 0.01)
    assert c.data.aug.copy_paste == 0.25 and c.model.compute_dtype == "bfloat16"
    assert 0 <= c.optim.warmup_steps < 50


def test_gpu_array_train_trains_on_training_rows_and_saves_the_weights_it_selected(monkeypatch,
                                                                                  tmp_path):
    """With splits of unequal sizes: it trains on the file's training rows and validates on its
    validation rows of each dataset, validates both the trained and the EMA weights, and the
    saved weights give (recomputed here, without padding) the IoU by which they were selected."""
    import jax
    import jax.numpy as jnp
    from PIL import Image

    data = _tiny_array_file(monkeypatch, tmp_path / "arr.npz",
                            "portrait_segmentation,ccp_person", per_split=3)
    arrays = dict(np.load(data))
    arrays["split"][[3, 6]] = [0, 1]  # portraits: 4 training, 2 validation; ccp: 2 and 4
    np.savez(data, **arrays)
    names = [str(n) for n in arrays["source_names"]]
    module = _load_launch_module("gpu_array_train")
    monkeypatch.setattr(sys, "argv", [
        "gpu_array_train.py", "--data", str(data), "--out", str(tmp_path / "run"), "--num_steps",
        "2", "--batch_size", "8", "--base_features", "4", "--num_validations", "1",
        "--set", "model.depth=2"])
    module.main()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    split, source = arrays["split"], arrays["source"]
    assert summary["train_examples"] == {n: int(np.sum((split == 0) & (source == d)))
                                         for d, n in enumerate(names)} == {names[0]: 4, names[1]: 2}
    assert summary["validation_examples"] == {n: int(np.sum((split == 1) & (source == d)))
                                              for d, n in enumerate(names)}
    assert {h["weights"] for h in summary["validation_history"]} == {"model", "ema"}
    selected = summary["selected"]
    assert selected in summary["validation_history"]

    def rows(kind):
        buf, offsets = arrays[f"{kind}_bytes"], arrays[f"{kind}_offsets"]
        return np.stack([np.asarray(Image.open(io.BytesIO(buf[a:b].tobytes())))
                         for a, b in zip(offsets[:-1], offsets[1:])])

    images, masks = rows("image"), rows("mask") > 127
    saver = _load_launch_module("save_pretrained_from_npz")
    model, config, _ = saver.load_run(tmp_path / "run")
    for d, name in enumerate(names):
        val = (split == 1) & (source == d)
        probs = jax.nn.sigmoid(model(jnp.asarray(images[val]), train=False)[..., 0])
        pred = np.asarray(probs) >= config.eval.threshold
        iou = np.sum(pred & masks[val]) / np.sum(pred | masks[val])
        assert selected[name] == pytest.approx(iou, abs=1e-6), name


def _gpu_array_train_validating_with(monkeypatch, tmp_path, counts):
    """launch/gpu_array_train.py, loaded and set to train 2 steps on a tiny array file into
    TMP_PATH/run, whose validation's (intersection, union) per image are COUNTS(model, images,
    latest): LATEST the trained and EMA models last merged for validation and saving. Returns
    the module (run its main()) and the list of merged models."""
    import types

    from flax import nnx

    data = _tiny_array_file(monkeypatch, tmp_path / "arr.npz", "portrait_segmentation,ccp_person",
                            per_split=2)
    module = _load_launch_module("gpu_array_train")
    merged = []

    def merge(graphdef, state):  # the weights validated and saved at each validation
        merged.append(nnx.merge(graphdef, state))
        return merged[-1]

    def jit(counts_of):
        return lambda model, images, masks: counts(model, images, merged[-1])

    monkeypatch.setattr(module, "nnx", types.SimpleNamespace(merge=merge, jit=jit,
                                                             state=nnx.state))
    monkeypatch.setattr(sys, "argv", [
        "gpu_array_train.py", "--data", str(data), "--out", str(tmp_path / "run"), "--num_steps",
        "2", "--batch_size", "8", "--base_features", "4", "--num_validations", "1",
        "--set", "model.depth=2"])
    return module, merged


@pytest.mark.parametrize("chosen", ["model", "ema"])
def test_gpu_array_train_saves_the_weights_that_validation_chose(monkeypatch, tmp_path, chosen):
    """Validation forced to prefer CHOSEN's weights (the trained or the EMA ones, which differ
    after training): model_state.npz holds exactly those."""
    import jax
    from flax import nnx

    def counts(model, images, latest):  # IoU 1 for CHOSEN, else 0
        return np.full(len(images), int(model is latest[chosen])), np.ones(len(images))

    module, merged = _gpu_array_train_validating_with(monkeypatch, tmp_path, counts)
    module.main()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["selected"]["weights"] == chosen
    saved = dict(np.load(tmp_path / "run" / "model_state.npz"))

    def flat(kind):
        return {jax.tree_util.keystr(k): np.asarray(v) for k, v in
                jax.tree_util.tree_leaves_with_path(jax.device_get(nnx.state(merged[-1][kind])))}

    expected, other = flat(chosen), flat({"model": "ema", "ema": "model"}[chosen])
    assert saved.keys() == expected.keys()
    assert all(np.array_equal(saved[k], expected[k]) for k in expected)
    assert not all(np.array_equal(saved[k], other[k]) for k in other)


def test_gpu_array_train_killed_while_validating_the_ema_keeps_a_matching_summary(monkeypatch,
                                                                                  tmp_path):
    """Killed after the trained weights were saved, while the EMA weights were validated: the
    summary already selects the saved weights (it was written only once both were validated)."""
    def counts(model, images, latest):
        if model is latest["ema"]:
            raise KeyboardInterrupt  # the machine's kill
        return np.ones(len(images)), np.ones(len(images))

    module, _ = _gpu_array_train_validating_with(monkeypatch, tmp_path, counts)
    with pytest.raises(KeyboardInterrupt):
        module.main()
    assert (tmp_path / "run" / "model_state.npz").is_file()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["selected"]["weights"] == "model" and summary["selected"]["step"] == 2


def _array_train_run(run, *, seed, num_steps, selected_step, base_features=4):
    """A launch/gpu_array_train.py --out folder: a model's flat state (keyed by path, as that
    script writes it) and a summary.json of its bf16-compute config and selected step."""
    import jax
    from flax import nnx

    from fake_data import tiny_config
    from jaxseg.models import create_model

    config = tiny_config({"model.base_features": base_features, "model.compute_dtype": "bfloat16",
                          "train.num_steps": num_steps})
    state = nnx.state(create_model(config.model, seed=seed))
    run.mkdir()
    np.savez(run / "model_state.npz", **{jax.tree_util.keystr(k): np.asarray(v)
                                         for k, v in jax.tree_util.tree_leaves_with_path(state)})
    summary = {"config": json.loads(config.to_json()), "num_steps": num_steps,
               "steps_done": selected_step, "device": "fake",
               "selected": {"mean": 0.5, "step": selected_step, "weights": "ema"}}
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def test_save_pretrained_from_npz_saves_the_runs_in_order_as_float32_members(monkeypatch, capsys,
                                                                            tmp_path):
    """Several runs make an ensemble: its members are the runs' own weights in the order given,
    with --output_shift, float32 compute, and each run's selected step in the card (a run cut
    short by its deadline selected weights before its planned num_steps)."""
    import jax
    from flax import nnx

    saver = _load_launch_module("save_pretrained_from_npz")
    runs = [_array_train_run(tmp_path / "second", seed=2, num_steps=10, selected_step=10),
            _array_train_run(tmp_path / "first", seed=1, num_steps=10, selected_step=4)]
    saved = []
    monkeypatch.setattr(saver.inference, "save_pretrained",
                        lambda models, config, card: saved.append((models, config, card)))
    monkeypatch.setattr(sys, "argv", ["save_pretrained_from_npz.py", *map(str, runs),
                                      "--output_shift", "0.5,0"])
    saver.main()
    [(models, config, card)] = saved
    assert len(models) == 2
    for model, run in zip(models, runs):
        flat = np.load(run / "model_state.npz")
        for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(model)):
            np.testing.assert_array_equal(leaf, flat[jax.tree_util.keystr(path)])
        assert model.output_shift == (0.5, 0.0)
    assert config.model.compute_dtype == "float32" and tuple(config.model.output_shift) == (0.5, 0.0)
    assert card["steps"] == [10, 4]
    assert [m["selected"]["step"] for m in card["members"]] == [10, 4]
    assert all(m["config"]["model"]["compute_dtype"] == "float32" for m in card["members"])

    # One run: its own card, the steps of the weights it selected.
    saved.clear()
    monkeypatch.setattr(sys, "argv", ["save_pretrained_from_npz.py", str(runs[1])])
    saver.main()
    [(models, config, card)] = saved
    assert len(models) == 1 and card["steps"] == 4 and "config" not in card
    assert models[0].output_shift == (0.0, 0.0) and config.model.compute_dtype == "float32"

    # Members of different widths cannot be one ensemble.
    wider = _array_train_run(tmp_path / "wider", seed=3, num_steps=10, selected_step=10,
                             base_features=8)
    saved.clear()
    monkeypatch.setattr(sys, "argv", ["save_pretrained_from_npz.py", *map(str, runs), str(wider)])
    with pytest.raises(SystemExit) as e:
        saver.main()
    assert e.value.code == 2 and not saved
    assert "ensemble members must share one image size and model config" in capsys.readouterr().err


@pytest.mark.parametrize("shift", ["nan,0", "0,inf", "17,0", "0,-16.5"])
def test_save_pretrained_from_npz_refuses_an_output_shift_out_of_range(monkeypatch, capsys,
                                                                      tmp_path, shift):
    """nan or inf was saved in the model's config, and stopped its every call; a shift beyond
    half the image (the run's 32 pixels: 16) was saved too. Each is one usage error, as
    config_check says of model.output_shift."""
    saver = _load_launch_module("save_pretrained_from_npz")
    run = _array_train_run(tmp_path / "run", seed=1, num_steps=10, selected_step=10)
    saved = []
    monkeypatch.setattr(saver.inference, "save_pretrained", lambda *a: saved.append(a))
    monkeypatch.setattr(sys, "argv", ["save_pretrained_from_npz.py", str(run),
                                      "--output_shift", shift])
    with pytest.raises(SystemExit) as e:
        saver.main()
    assert e.value.code == 2 and not saved
    err = capsys.readouterr().err
    assert "--output_shift: model.output_shift=" in err and "at most half the image size (16)" in err
    # Half the image is the most config_check allows.
    monkeypatch.setattr(sys, "argv", ["save_pretrained_from_npz.py", str(run),
                                      "--output_shift", "16,-16"])
    saver.main()
    [(_, config, _)] = saved
    assert tuple(config.model.output_shift) == (16.0, -16.0)


@pytest.mark.parametrize("damage,message", [
    ("other_width", "does not hold the weights of the model its summary.json describes"),
    ("truncated_npz", "model_state.npz: unreadable, a copy cut short?"),
    ("bad_json", "summary.json: not a gpu_array_train.py summary")])
def test_save_pretrained_from_npz_refuses_files_that_are_not_one_run(monkeypatch, capsys, tmp_path,
                                                                      damage, message):
    """The weights of a run of another width were saved under this run's config (nnx.update takes
    any shape), and a cut-short or unreadable file gave a traceback: each is one usage error."""
    saver = _load_launch_module("save_pretrained_from_npz")
    run = _array_train_run(tmp_path / "run", seed=1, num_steps=10, selected_step=10)
    if damage == "other_width":
        other = _array_train_run(tmp_path / "other", seed=1, num_steps=10, selected_step=10,
                                 base_features=8)
        (run / "model_state.npz").write_bytes((other / "model_state.npz").read_bytes())
    elif damage == "truncated_npz":
        data = (run / "model_state.npz").read_bytes()
        (run / "model_state.npz").write_bytes(data[:len(data) // 2])
    else:
        (run / "summary.json").write_text("{")
    saved = []
    monkeypatch.setattr(saver.inference, "save_pretrained", lambda *a: saved.append(a))
    monkeypatch.setattr(sys, "argv", ["save_pretrained_from_npz.py", str(run)])
    with pytest.raises(SystemExit) as e:
        saver.main()
    assert e.value.code == 2 and not saved
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
