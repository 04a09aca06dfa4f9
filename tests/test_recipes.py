"""Full-length recipe runs (slow: `python -m pytest -m slow`)."""

import pytest

from test_train import REPO, needs_shakespeare, read_metrics

from jaxlm import config as config_lib
from jaxlm.train import loop


@pytest.mark.slow
@needs_shakespeare
def test_baby_gpt_reaches_nanogpts_validation_loss(tmp_path):
    """nanoGPT's README reports about 1.88 for this recipe on CPU after 2000 iterations."""
    config = config_lib.from_file(f"{REPO}/configs/gpt_shakespeare_char.py")
    config.data.data_dir = str(tmp_path / "tfds")
    config.mesh.num_devices = 1
    config.sample.max_new_tokens = 0
    loop.train_and_evaluate(config, str(tmp_path / "run"))
    assert read_metrics(tmp_path / "run", "eval/loss")[2000] <= 1.90
