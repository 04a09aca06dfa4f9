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


@pytest.fixture(scope="session")
def tiny_finetune(data_dir):
    """`make(config_file, method, init_from)`: a fine-tuning config of `configs/` on a 2-layer,
    32-wide BERT (the MiniLM's vocabulary) for 3 steps of 8 rows: seconds, not minutes."""
    from jaxlm import config as config_lib

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def make(config_file="sst2.py", method="full", init_from=""):
        config = config_lib.from_file(os.path.join(repo, "configs", config_file), method)
        config.init_from = init_from
        config.data.update(dict(seq_len=32, data_dir=data_dir, pad_multiple=0))  # one compiled length
        config.model.update(dict(name="bert", num_layers=2, emb_dim=32, num_heads=2, mlp_dim=64, max_len=32,
                                 use_bias=True, mlp="gelu_exact"))
        config.peft.update(dict(rank=2, adapter_dim=4, num_tokens=3))
        config.train.update(dict(steps=3, batch_size=8, log_every=1, eval_every=3, eval_batches=1,
                                 peak_flops=1e12))
        config.optim.update(dict(warmup_steps=1))
        config.checkpoint.update(dict(every=3, async_save=False))
        config.mesh.num_devices = 1
        return config

    return make
