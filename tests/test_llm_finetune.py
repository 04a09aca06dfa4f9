"""A Llama-class checkpoint from transformers through jaxlm and back: imported with its
tokenizer.json, fine-tuned with LoRA and QLoRA by `configs/llama_lora.py`, merged, exported;
transformers loads the export and decodes greedily exactly what jaxlm decodes."""

import json
import os
import subprocess
import sys

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
hf_tokenizers = pytest.importorskip("tokenizers")

from jaxlm import chat as jaxlm_chat, config as config_lib, convert, models
from jaxlm.data import builders
from jaxlm.data import sft as sft_data
from jaxlm.infer import sampling
from jaxlm.train import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
from jaxlm import convert_hf  # noqa: E402
import merge_lora  # noqa: E402

PROMPT = "ROMEO: What light"
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def shakespeare() -> str:
    path = builders.jaxlm_data_dir() / "tinyshakespeare" / "input.txt"
    if not path.is_file():
        pytest.skip(f"Tiny Shakespeare is not under {path.parent}")
    return path.read_text()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A random 2-layer Llama (grouped-query attention) with a byte-level BPE tokenizer.json
    trained on the first 200k characters of Tiny Shakespeare."""
    hf_dir = tmp_path_factory.mktemp("llama")
    tokenizer = hf_tokenizers.Tokenizer(hf_tokenizers.models.BPE())
    tokenizer.pre_tokenizer = hf_tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = hf_tokenizers.decoders.ByteLevel()
    trainer = hf_tokenizers.trainers.BpeTrainer(
        vocab_size=384, special_tokens=["<s>", "</s>"],
        initial_alphabet=hf_tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([shakespeare()[:200_000]], trainer)
    tokenizer.save(str(hf_dir / "tokenizer.json"))
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
         "chat_template": CHATML}))
    config = transformers.LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=0,
        eos_token_id=1, rope_parameters=dict(rope_type="default", rope_theta=10000.0))
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(hf_dir)
    return str(hf_dir)


def finetune(method: str, llama_dir: str, workdir: str, data_dir: str):
    config = config_lib.from_file(os.path.join(REPO, "configs", "llama_lora.py"), method)
    config.init_from = llama_dir
    config.data.update(dict(seq_len=64, data_dir=data_dir))
    config.train.update(dict(steps=50, batch_size=8, log_every=10, eval_every=50, eval_batches=4))
    config.optim.update(dict(lr=1e-2, warmup_steps=5))
    config.checkpoint.update(dict(every=50, async_save=False))
    config.sample.max_new_tokens = 0
    config.mesh.num_devices = 1
    return loop.train_and_evaluate(config, workdir)


@pytest.mark.slow  # about 100 s per method
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_llama_lora_finetunes_merges_and_exports_to_transformers(method, llama_dir, data_dir, tmp_path):
    workdir, merged, exported = (str(tmp_path / name) for name in ("run", "merged", "hf"))
    finetune(method, llama_dir, workdir, data_dir)
    assert loop.restore_latest(workdir)[2] == 50

    merge_lora.merge_workdir(workdir, merged)
    assert convert_hf.main(["export", f"--workdir={merged}", f"--hf_dir={exported}"]) == 0
    merged_run, merged_params, _ = loop.restore_latest(merged)
    evaluate = loop.Evaluator(merged_run, merged_run.config)
    base = convert.import_params(llama_dir, merged_run.config.model)
    before, after = evaluate(base)["eval/loss"], evaluate(merged_params)["eval/loss"]
    assert after < before - 0.1, (before, after)  # LoRA on a random base: 5.97 -> 5.81 (lora)
    prompt = merged_run.tokenizer.encode(PROMPT)[None]
    ours = sampling.generate(models.get(merged_run.config.model), merged_params, prompt, 24, temperature=0.0)

    model = transformers.AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model.generate(torch.from_numpy(prompt.astype(np.int64)), max_new_tokens=24, do_sample=False,
                                eos_token_id=None, pad_token_id=0)
    np.testing.assert_array_equal(ours, theirs[:, prompt.shape[1]:].numpy())
    text = merged_run.tokenizer.encode(shakespeare()[:400])[None]
    with torch.no_grad():
        their_logits = model(torch.from_numpy(text.astype(np.int64))).logits.numpy()
    our_logits = models.get(merged_run.config.model).apply({"params": merged_params}, text)
    np.testing.assert_allclose(our_logits, their_logits, atol=1e-4)

    # Chat: the template renders the conversation, the reply streams, the history is kept.
    conversation = jaxlm_chat.Conversation(models.get(merged_run.config.model), merged_params,
                                           merged_run.tokenizer, max_new_tokens=16)
    pieces = []
    first = conversation.reply("Who art thou?", pieces.append)
    tokenizer = merged_run.tokenizer
    prompt = tokenizer.encode("<|im_start|>user\nWho art thou?<|im_end|>\n<|im_start|>assistant\n")[None]
    greedy = sampling.generate(models.get(merged_run.config.model), merged_params, prompt, 16, temperature=0.0)[0]
    stop = [i for i, t in enumerate(greedy) if t in tokenizer.stop_ids]
    assert first == "".join(pieces) == tokenizer.decode(greedy[:stop[0] if stop else 16].tolist())
    conversation.reply("Speak again.")
    assert [m["role"] for m in conversation.messages] == ["user", "assistant"] * 2
    assert "Who art thou?" in tokenizer.decode(conversation.prompt())
    if method == "lora":  # the REPL itself, once
        result = subprocess.run([sys.executable, "-m", "jaxlm.chat", f"--workdir={merged}", "--max_new_tokens=16"],
                                input="Who art thou?\n\n", capture_output=True, text=True, cwd=REPO, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        assert first in result.stdout


@pytest.mark.slow  # about 60 s per method
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_instruction_tuning_an_imported_llama_with_its_chat_template(method, llama_dir, data_dir, tmp_path):
    """task sft on a Hugging Face Llama: the ChatML template of its tokenizer renders the
    conversations, the loss covers the assistant's reply and its <|im_end|>, LoRA/QLoRA learn the
    replies well enough for greedy generation to give them back."""
    records = [{"task": "answer", "prompt": f"{verb} number {i}.", "response": reply}
               for i in range(8) for verb, reply in (("Accept", "yes"), ("Refuse", "no"))]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records * 4))
    (tmp_path / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:6]))
    config = config_lib.from_file(os.path.join(REPO, "configs", "sft_mixture.py"), "lora")
    config.init_from = llama_dir
    config.data.update(dict(files=f"train={tmp_path / 'train.jsonl'},validation={tmp_path / 'validation.jsonl'}",
                            tokenizer="huggingface", tokenizer_path="", seq_len=96, data_dir=data_dir))
    if method == "qlora":
        config.model.quant.update(dict(weights="nf4", group_size=32, embeddings=False))
    config.task.update(dict(task_metrics="answer=exact_match", generate_tokens=12))
    config.train.update(dict(steps=120, batch_size=8, log_every=40, eval_every=120, peak_flops=1e9))
    config.optim.update(dict(lr=1e-2, warmup_steps=10))
    config.checkpoint.update(dict(every=120, async_save=False))
    config.sample.max_new_tokens = 0
    config.mesh.num_devices = 1
    run = loop.train_and_evaluate(config, str(tmp_path / "run"))
    del run
    restored, params, step = loop.restore_latest(str(tmp_path / "run"))
    tokens, mask = sft_data.encode(sft_data.read_jsonl(str(tmp_path / "validation.jsonl"))[1], restored.tokenizer)
    assert restored.tokenizer.decode(tokens[mask].tolist()) == "no<|im_end|>\n"
    assert restored.tokenizer.decode(tokens.tolist()).startswith("<|im_start|>user\nRefuse number 0.<|im_end|>")
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        metrics = [json.loads(line) for line in f]
    final = [m for m in metrics if "eval/answer/exact_match" in m][-1]
    assert final["eval/answer/exact_match"] == 1.0, final  # replies "yes<|im_end|>": the end is text here
    losses = [m["train/loss"] for m in metrics if "train/loss" in m]
    assert losses[-1] < losses[0] and final["eval/accuracy"] > 0.8 and step == 120
