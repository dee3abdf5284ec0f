"""Test setup: 8 fake CPU devices before jax initialises, and shared fixtures."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import atexit  # noqa: E402
import pathlib  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    # One persistent compilation cache for the session and the training and evaluation
    # subprocesses it starts: each fresh interpreter otherwise compiles the same programs again
    # (a small U-Net's eager initialisers alone take about 20 s on two cores).
    _cache = tempfile.mkdtemp(prefix="jaxseg-tests-jax-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ.update(JAX_COMPILATION_CACHE_DIR=_cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def manual_dir():
    """The real datasets (`JAXSEG_MANUAL_DIR`, default ../shared/data); skips when absent."""
    path = pathlib.Path(os.environ.get("JAXSEG_MANUAL_DIR", REPO.parent / "shared" / "data"))
    if not (path / "portraits").is_dir():
        pytest.skip(f"real data not found at {path}; set JAXSEG_MANUAL_DIR")
    return path


@pytest.fixture(scope="session")
def real_data_dir(manual_dir, tmp_path_factory):
    """Both real datasets prepared (reused from $TFDS_DATA_DIR when CI has them there)."""
    from jaxseg import datasets

    data_dir = os.environ.get("TFDS_DATA_DIR") or str(tmp_path_factory.mktemp("real"))
    for name, sub in datasets.MANUAL_SUBDIRS.items():
        datasets.prepare(name, data_dir=data_dir, manual_dir=str(manual_dir / sub))
    return data_dir
