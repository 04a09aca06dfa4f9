"""Instruction tuning (task sft): assistant-only loss, packing that keeps examples apart, the
attention implementations respecting segment ids, evaluation by generation, malformed input."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import config as config_lib, models
from jaxlm.data import sft, tokenizers
from jaxlm.models import layers
from jaxlm.tasks import sft as sft_task
from jaxlm.train import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONVERSATIONS = [
    {"task": "sentiment", "messages": [{"role": "user", "content": "great film?"},
                                       {"role": "assistant", "content": "positive"}]},
    {"task": "translate", "prompt": "a small dog runs", "response": "ein kleiner Hund rennt schnell", "system": "Translate."},
    {"task": "chat", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                                  {"role": "user", "content": "name?"}, {"role": "assistant", "content": "jaxlm"}]},
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_the_loss_mask_covers_exactly_the_assistant_turns(tmp_path):
    tok = tokenizers.create("byte")
    conversations = sft.read_jsonl(write_jsonl(tmp_path / "c.jsonl", CONVERSATIONS))
    tokens, mask = sft.encode(conversations[2], tok)
    learned = tok.decode(np.where(mask, tokens, tok.eos_id))
    assert learned == "hello\njaxlm\n"
    assert (tokens[mask] == tok.eos_id).sum() == 2  # each assistant turn ends with EOS (plain template)
    assert tok.decode(tokens) == "User: hi\nAssistant: hello\nUser: name?\nAssistant: jaxlm\n"
    system = sft.encode(conversations[1], tok)
    assert tok.decode(system[0]).startswith("Translate.\n\nUser: a small dog runs\nAssistant: ein kleiner Hund")
    prompt, reference = sft.prompt(conversations[2], tok)
    assert tok.decode(prompt) == "User: hi\nAssistant: hello\nUser: name?\nAssistant: " and reference == "jaxlm"


@pytest.mark.parametrize("line, message", [
    ("not json", "line 2: not valid JSON"),
    ('{"prompt": "x"}', "line 2: needs 'messages', or 'prompt' and 'response'"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "line 2: message 0 must be"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "line 2: the conversation has no assistant message"),
])
def test_a_malformed_line_is_an_error_naming_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(CONVERSATIONS[0]) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=f"bad.jsonl, {message}"):
        sft.read_jsonl(str(path))


def tiny_model(vocab_size=257, attention="cpu"):
    config = config_lib.default_config()
    config.model.update(dict(vocab_size=vocab_size, num_layers=2, num_heads=4, num_kv_heads=2, emb_dim=32,
                             max_len=128, norm="rmsnorm", positions="rotary", mlp="swiglu", dropout=0.0,
                             attention=attention))
    return models.get(config.model)


def per_example_losses(model, params, rows, attention_segments=None):
    """{(row, segment): summed loss} (the model sees `attention_segments`, default the rows')."""
    segments = rows["segment_ids"] if attention_segments is None else attention_segments
    logits = model.apply({"params": params}, jnp.asarray(rows["inputs"]), jnp.asarray(rows["positions"]),
                         segment_ids=jnp.asarray(segments))
    loss = jax.vmap(jax.vmap(lambda l, t: -jax.nn.log_softmax(l)[t]))(logits, jnp.asarray(rows["targets"]))
    loss = np.asarray(loss) * rows["weights"]
    return {(r, s): loss[r][rows["segment_ids"][r] == s].sum()
            for r in range(len(loss)) for s in set(rows["segment_ids"][r]) - {0}}


def test_packed_rows_give_each_example_its_loss_alone(tmp_path):
    tok = tokenizers.create("byte")
    rng = np.random.default_rng(0)
    conversations = [sft.Conversation(({"role": "user", "content": "".join(rng.choice(list("abcdef"), n))},
                                       {"role": "assistant", "content": "".join(rng.choice(list("xyz"), m))}))
                     for n, m in rng.integers(1, 12, (9, 2))]
    examples = [sft.encode(c, tok) for c in conversations]
    packed, stats = sft.pack(examples, 128)
    alone, alone_stats = sft.pack(examples, 128, packed=False)
    assert stats["rows"] < alone_stats["rows"] == 9 and stats["efficiency"] > 2 * alone_stats["efficiency"]
    assert packed["segment_ids"].max() > 2
    model = tiny_model()
    params = model.init(jax.random.key(0), jnp.zeros((1, 128), jnp.int32))["params"]
    packed_losses = sorted(per_example_losses(model, params, packed).values())
    alone_losses = sorted(per_example_losses(model, params, alone).values())
    np.testing.assert_allclose(packed_losses, alone_losses, rtol=0, atol=2e-4)
    # Without segment ids the packed examples see each other: the losses change.
    mixed = sorted(per_example_losses(model, params, packed, np.where(packed["segment_ids"] > 0, 1, 0)).values())
    assert np.abs(np.subtract(mixed, packed_losses)).max() > 1e-2


def test_the_attention_implementations_agree_on_segment_ids():
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 12, 4, 8)), jnp.float32) for _ in range(3))
    segments = jnp.asarray([[1] * 5 + [2] * 4 + [0] * 3, [1] * 12])
    bias = layers.segment_bias(segments) + layers.causal_bias(jnp.arange(12), 12)
    cpu = layers.dot_product_attention(q, k, v, bias, "cpu")
    xla = layers.dot_product_attention(q, k, v, bias, "xla")
    np.testing.assert_allclose(cpu, xla, atol=1e-5)
    # Segment 2 of row 0 attends as if it were alone.
    alone = layers.dot_product_attention(q[:1, 5:9], k[:1, 5:9], v[:1, 5:9], layers.causal_bias(jnp.arange(4), 4),
                                         "xla")
    np.testing.assert_allclose(xla[:1, 5:9], alone, atol=1e-5)


def sft_config(tmp_path, data_dir, **task):
    records = [r for _ in range(40) for r in CONVERSATIONS]
    train = write_jsonl(tmp_path / "train.jsonl", records)
    validation = write_jsonl(tmp_path / "validation.jsonl", CONVERSATIONS)
    config = config_lib.from_file(os.path.join(REPO, "configs", "sft_mixture.py"))
    config.data.update(dict(files=f"train={train},validation={validation}", tokenizer="byte", seq_len=96,
                            data_dir=data_dir))
    config.model.update(dict(num_layers=2, emb_dim=64, num_heads=4, num_kv_heads=2, mlp_dim=128, max_len=160))
    config.task.update(dict(task_metrics="sentiment=accuracy,translate=bleu", generate_tokens=40, **task))
    config.train.update(dict(steps=150, batch_size=8, log_every=50, eval_every=150, peak_flops=1e9))
    config.optim.update(dict(lr=3e-3, warmup_steps=5))
    config.checkpoint.update(dict(every=150, async_save=False))
    config.sample.max_new_tokens = 0
    config.mesh.num_devices = 1
    return config


def test_the_sft_loss_ignores_prompt_tokens(tmp_path, data_dir):
    config = sft_config(tmp_path, data_dir)
    tok = tokenizers.create("byte")
    task = sft_task.SFT(config, tok)
    batch = task.eval_batches("validation", 0)[0]
    params = task.init(jax.random.key(0))["params"]
    loss = float(task.loss(params, batch)[0])
    prompt = (batch["weights"] == 0) & (batch["segment_ids"] > 0)
    assert prompt.sum() > batch["weights"].sum()  # most tokens are prompt
    changed = {**batch, "targets": np.where(prompt, (batch["targets"] + 7) % 256, batch["targets"])}
    assert float(task.loss(params, changed)[0]) == pytest.approx(loss, rel=1e-6)
    answer = batch["weights"] > 0
    changed = {**batch, "targets": np.where(answer, (batch["targets"] + 7) % 256, batch["targets"])}
    assert abs(float(task.loss(params, changed)[0]) - loss) > 1e-2  # a random model: small but clear


def test_instruction_tuning_learns_and_is_evaluated_by_generation(tmp_path, data_dir):
    config = sft_config(tmp_path, data_dir)
    loop.train_and_evaluate(config, str(tmp_path / "run"))
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        metrics = [json.loads(line) for line in f]
    final = [m for m in metrics if "eval/sentiment/accuracy" in m][-1]
    # The three answers are learned by heart: greedy generation reproduces them.
    assert final["eval/sentiment/accuracy"] == 1.0 and final["eval/chat/exact_match"] == 1.0
    assert final["eval/translate/bleu"] == pytest.approx(100.0)
    losses = [m["train/loss"] for m in metrics if "train/loss" in m]
    assert losses[-1] < 0.25 * losses[0]


def test_generation_metrics_score_as_named():
    assert sft_task.score("accuracy", ["Positive ", "no"], ["positive", "yes"]) == 0.5
    assert sft_task.score("exact_match", ["Positive"], ["positive"]) == 0.0
    f1 = sft_task.score("entity_f1", ["PER: John Smith; LOC: Paris", "none"], ["PER: John  Smith; ORG: UN", "none"])
    assert f1 == pytest.approx(2 * 1 / (2 + 2))
    assert sft_task.task_metrics("a=bleu, b=entity_f1") == {"a": "bleu", "b": "entity_f1"}
    with pytest.raises(ValueError, match="TASK=METRIC"):
        sft_task.task_metrics("a=rouge")
    assert sft_task.entity_answer(["John", "Smith", "visited", "Paris", "."],
                                           ["B-PER", "I-PER", "O", "B-LOC", "O"]) == "PER: John Smith; LOC: Paris"
    assert sft_task.entity_answer(["a"], ["O"]) == "none"


def test_sft_needs_its_files_and_a_usable_tokenizer(tmp_path, data_dir):
    config = sft_config(tmp_path, data_dir)
    config.data.tokenizer = "char"
    with pytest.raises(ValueError, match="task sft needs data.tokenizer byte, sentencepiece"):
        sft_task.SFT.build_tokenizer(config, str(tmp_path / "w"))
    config.data.files = f"validation={tmp_path / 'validation.jsonl'}"
    with pytest.raises(ValueError, match="needs a train file"):
        sft_task.SFT(config, tokenizers.create("byte"))
