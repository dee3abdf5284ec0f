"""Test setup: 8 fake CPU devices before jax initialises, and shared fixtures."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def manual_dir():
    """The real datasets (`JAXSEG_MANUAL_DIR`, default ../shared/data); skips when absent."""
    path = pathlib.Path(os.environ.get("JAXSEG_MANUAL_DIR", REPO.parent / "shared" / "data"))
    if not (path / "portraits").is_dir():
        pytest.skip(f"real data not found at {path}; set JAXSEG_MANUAL_DIR")
    return path
