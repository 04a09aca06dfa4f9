"""Tests run with 8 host CPU devices so that meshes can be tested on one machine.

The flag must be set before JAX initialises its backend, hence here, before any test imports jax.
Single-device runs use `config.mesh.num_devices = 1`.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


import pytest  # noqa: E402 (after the environment is set)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """Where the tests' TFDS builders prepare their data, once per session (files may override)."""
    return str(tmp_path_factory.mktemp("tfds"))
