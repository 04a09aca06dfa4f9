"""Every family trains end to end from its task, and a stage+data+tensor mesh of 8 devices gives
the single-device losses (the sharding rules, not the model code, decide the parallelism)."""

import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm.data import builders
from jaxlm.train import loop
from test_train import read_metrics

DATA = builders.jaxlm_data_dir()


def tiny(task: str, data: dict, model: dict, data_dir: str):
    c = config_lib.default_config()
    c.task.name = task
    c.data.update(dict(data_dir=data_dir, **data))
    c.model.update(dict(num_layers=2, num_heads=4, emb_dim=32, mlp_dim=64, max_len=32, vocab_multiple=8,
                        dropout=0.0, **model))
    c.train.update(dict(steps=6, batch_size=8, log_every=1, eval_every=6, eval_batches=1,
                        steps_per_call=3, peak_flops=1e9))
    c.optim.update(dict(lr=3e-3, warmup_steps=2, decay_steps=20))
    c.checkpoint.update(dict(every=1000))
    c.sample.max_new_tokens = 0
    c.mesh.num_devices = 1
    return c


T5 = dict(name="t5", norm="rmsnorm", mlp="geglu", tie_embeddings=False, head_dim=8)
FAMILIES = {
    "bert_mlm_nsp": ("mlm_nsp", dict(name="jaxlm_tiny_shakespeare", tokenizer="char", seq_len=32),
                     dict(name="bert", use_bias=True, mlp="gelu_exact"), "tinyshakespeare"),
    "t5_span_corruption": ("span_corruption",
                           dict(name="jaxlm_tiny_shakespeare", tokenizer="sentencepiece",
                                tokenizer_vocab_size=500, seq_len=32), T5, "tinyshakespeare"),
    "t5_seq2seq": ("seq2seq", dict(name="jaxlm_multi30k", source_key="en", target_key="de",
                                   eval_split="validation", tokenizer="sentencepiece",
                                   tokenizer_vocab_size=500, seq_len=16, target_len=16), T5, "multi30k"),
    "vit": ("image_classification", dict(name="jaxlm_mnist", eval_split="test"),
            dict(name="vit", patch_size=7, use_bias=True, mlp="gelu_exact"), "mnist"),
    "cnn": ("image_classification", dict(name="jaxlm_mnist", eval_split="test"), dict(name="cnn"), "mnist"),
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_trains_and_a_pipelined_data_tensor_mesh_gives_the_single_device_losses(family, data_dir, tmp_path):
    task, data, model, folder = FAMILIES[family]
    if not (DATA / folder).is_dir():
        pytest.skip(f"{folder} not found under JAXLM_DATA_DIR")
    single = tiny(task, data, model, data_dir)
    if family == "cnn":
        single.train.steps_per_call = 1
    loop.train_and_evaluate(single, str(tmp_path / "single"))
    reference = read_metrics(tmp_path / "single")
    assert len(reference) == 6 and all(np.isfinite(list(reference.values())))
    meshed = tiny(task, data, model, data_dir)
    meshed.train.steps_per_call = single.train.steps_per_call
    # Transformers also run their layer stacks as a 2-stage pipeline; the CNN has none.
    meshed.mesh.update(dict(num_devices=0, data=4, tensor=2) if family == "cnn" else
                       dict(num_devices=0, stage=2, data=2, tensor=2))
    loop.train_and_evaluate(meshed, str(tmp_path / "meshed"))
    losses = read_metrics(tmp_path / "meshed")
    np.testing.assert_allclose([losses[s] for s in range(1, 7)], [reference[s] for s in range(1, 7)],
                               rtol=2e-5)
    evals = read_metrics(tmp_path / "single", "eval/loss"), read_metrics(tmp_path / "meshed", "eval/loss")
    np.testing.assert_allclose(evals[1][6], evals[0][6], rtol=2e-5)
