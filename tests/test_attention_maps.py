"""Attention maps of a trained run (`jaxlm.attention_maps`, `tools/attention_map.py`): every
layer and head, softmax rows, the masks the model applies, one PNG per kind."""

import os
import sys

import numpy as np
import pytest

from jaxlm import attention_maps, config as config_lib
from jaxlm.train import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))


def trained(config_file, workdir, data_dir, **model):
    config = config_lib.from_file(os.path.join(REPO, "configs", config_file))
    config.model.update(dict(num_layers=2, emb_dim=32, num_heads=2, mlp_dim=64, **model))
    config.data.data_dir = data_dir
    config.train.update(dict(steps=2, batch_size=8, log_every=1, eval_every=2, eval_batches=1, steps_per_call=1))
    config.checkpoint.update(dict(every=2, async_save=False))
    config.sample.max_new_tokens = 0
    config.task.eval_bleu_batches = 1
    config.mesh.num_devices = 1
    loop.train_and_evaluate(config, str(workdir))
    return loop.restore_latest(str(workdir))[:2]


def check_rows(weights, causal: bool):
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)
    if causal:
        assert np.all(np.triu(weights, k=1) == 0)  # no query sees a later position
    else:
        assert np.triu(weights, k=1).max() > 0


@pytest.mark.slow  # a T5 run with beam-search evaluation: about 90 s
def test_translation_maps_and_pngs(tmp_path, data_dir):
    import attention_map

    run, params = trained("t5_multi30k.py", tmp_path / "t5", data_dir, head_dim=16, num_decoder_layers=1)
    text, target = "A man is riding a bike.", "Ein Mann fährt Fahrrad."
    maps = attention_maps.attention_maps(run.task, params, text, target)
    assert sorted(maps.maps) == ["decoder/attn", "decoder/cross_attn", "encoder/attn"]
    source, decoder = maps.tokens["source"], maps.tokens["target"]
    assert "".join(source[:-1]) == text and source[-1].startswith("<")  # the pieces spell the text, then EOS
    assert maps.maps["encoder/attn"].shape == (2, 2, len(source), len(source))
    assert maps.maps["decoder/attn"].shape == (1, 2, len(decoder), len(decoder))
    assert maps.maps["decoder/cross_attn"].shape == (1, 2, len(decoder), len(source))
    check_rows(maps.maps["encoder/attn"], causal=False)
    check_rows(maps.maps["decoder/attn"], causal=True)
    check_rows(maps.maps["decoder/cross_attn"], causal=False)
    longer = "Two brown dogs are playing together in the deep white snow near a wooden house."
    other = attention_maps.attention_maps(run.task, params, longer, target)
    assert other.maps["decoder/cross_attn"].shape[-1] == len(other.tokens["source"]) > len(source)
    own = attention_maps.attention_maps(run.task, params, text)  # the run's own translation as target
    assert own.maps["decoder/cross_attn"].shape[-1] == len(source)
    with pytest.raises(ValueError, match="empty"):
        attention_maps.attention_maps(run.task, params, "  ", target)
    paths = attention_map.write(str(tmp_path / "t5"), text, target, str(tmp_path / "png"))
    assert sorted(os.path.basename(p) for p in paths) == ["decoder_attn.png", "decoder_cross_attn.png", "encoder_attn.png"]
    assert all(open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n" for p in paths)


def test_language_model_maps_are_causal(tmp_path, data_dir):
    run, params = trained("gpt_shakespeare_char.py", tmp_path / "gpt", data_dir)
    maps = attention_maps.attention_maps(run.task, params, "ROMEO: hello")
    assert list(maps.maps) == ["decoder/attn"] and maps.tokens["source"] == list("ROMEO: hello")
    assert maps.maps["decoder/attn"].shape == (2, 2, 12, 12)
    assert maps.axes("decoder/attn") == (list("ROMEO: hello"),) * 2
    check_rows(maps.maps["decoder/attn"], causal=True)
    with pytest.raises(ValueError, match="--target is for translation"):
        attention_maps.attention_maps(run.task, params, "ROMEO", "x")
