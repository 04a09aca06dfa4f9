"""tools/average_checkpoints.py: the output's one checkpoint is the mean of the chosen steps'
parameters, at the newest step, and loads as a run; asking for more checkpoints than the run
keeps is an error that says how many there are."""

import os
import subprocess
import sys

import flax
import jax
import numpy as np
import pytest

from test_train import REPO, needs_shakespeare, tiny_config, train
from jaxlm.train import checkpoint, loop

sys.path.insert(0, os.path.join(REPO, "tools"))
import average_checkpoints  # noqa: E402


def flat(params) -> dict:
    return {"/".join(k): np.asarray(v) for k, v in flax.traverse_util.flatten_dict(jax.device_get(params)).items()}


@needs_shakespeare
def test_the_average_of_the_last_checkpoints_is_their_mean_and_loads_as_a_run(data_dir, tmp_path):
    config = tiny_config(data_dir, steps=15, steps_per_call=5)
    config.checkpoint.update(dict(every=5, keep=3, async_save=False))
    train(config, tmp_path / "run")
    assert checkpoint.saved_steps(str(tmp_path / "run")) == [5, 10, 15]
    run, _, _ = loop.restore_latest(str(tmp_path / "run"))
    saved = {s: flat(checkpoint.restore_params(str(tmp_path / "run"), run.abstract_state.params, step=s)[0])
             for s in (10, 15)}
    assert not np.allclose(saved[10]["decoder/layers/mlp/wi/kernel"], saved[15]["decoder/layers/mlp/wi/kernel"])
    result = subprocess.run([sys.executable, os.path.join(REPO, "tools", "average_checkpoints.py"),
                             f"--workdir={tmp_path / 'run'}", "--last=2", f"--output={tmp_path / 'avg'}"],
                            capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "averaged steps [10, 15]" in result.stdout
    _, averaged, step = loop.restore_latest(str(tmp_path / "avg"))
    assert step == 15
    for name, value in flat(averaged).items():
        np.testing.assert_allclose(value, (saved[10][name] + saved[15][name]) / 2, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match=r"keeps 3 checkpoints \[5, 10, 15\], fewer than --last=4"):
        average_checkpoints.average_workdir(str(tmp_path / "run"), str(tmp_path / "avg4"), 4)
    with pytest.raises(FileNotFoundError, match="no checkpoint step 7"):
        checkpoint.restore_params(str(tmp_path / "run"), run.abstract_state.params, step=7)
