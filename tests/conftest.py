"""Tests run with 8 host CPU devices so that meshes can be tested on one machine.

The flag must be set before JAX initialises its backend, hence here, before any test imports jax.
Single-device runs use `config.mesh.num_devices = 1`.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
