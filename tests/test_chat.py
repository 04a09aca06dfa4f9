"""Chat templates render as transformers' `apply_chat_template` renders them (text and ids),
BOS/EOS and the turn's stop ids come from the checkpoint's files, and a workdir keeps them."""

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest

transformers = pytest.importorskip("transformers")
hf_tokenizers = pytest.importorskip("tokenizers")

from jaxlm.data import chat, tokenizers

SPECIALS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>", "<start_of_turn>", "<end_of_turn>"]
# Four families' templates, in the shapes their checkpoints ship (one-line and multi-line: the
# latter depend on trim_blocks/lstrip_blocks; Gemma's and Mistral's refuse some conversations).
TEMPLATES = {
    "chatml": ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] "
               "+ '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
               "{% endif %}", "<|im_start|>", "<|im_end|>"),
    "llama3": ("{{- bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
               "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
               "<|begin_of_text|>", "<|eot_id|>"),
    "gemma": ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
              "supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != "
              "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate') }}{% endif %}"
              "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = "
              "message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + "
              "'<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}",
              "<s>", "<end_of_turn>"),
    "mistral": ("{{ bos_token }}\n{% for message in messages %}\n    {% if message['role'] == 'user' %}\n"
                "        {{ '[INST] ' + message['content'] + ' [/INST]' }}\n    {% elif message['role'] == "
                "'assistant' %}\n        {{ message['content'] + eos_token }}\n    {% else %}\n"
                "        {{ raise_exception('Only user and assistant roles are supported!') }}\n    {% endif %}\n"
                "{% endfor %}\n{% if add_generation_prompt %}{{ '' }}{% endif %}\n{# tojson: #}"
                "{% if messages | length > 9 %}{{ messages[0] | tojson }}{% endif %}", "<s>", "</s>"),
}
CONVERSATIONS = [
    [{"role": "user", "content": "Hello there!"}],
    [{"role": "user", "content": "Translate 'a dog' into German."},
     {"role": "assistant", "content": " Ein Hund. "},
     {"role": "user", "content": "And 'two cats'?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "user", "content": "Tabs\tand\nnew lines, ümlauts"}, {"role": "user", "content": "twice"}],
]


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tokenizer = hf_tokenizers.Tokenizer(hf_tokenizers.models.BPE())
    tokenizer.pre_tokenizer = hf_tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = hf_tokenizers.decoders.ByteLevel()
    trainer = hf_tokenizers.trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                                initial_alphabet=hf_tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([m["content"] for c in CONVERSATIONS for m in c] * 20, trainer)
    tokenizer.save(str(path))
    return path


def hf_folder(tmp_path, tokenizer_json, name):
    template, bos, eos = TEMPLATES[name]
    folder = tmp_path / name
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes(tokenizer_json.read_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template, "bos_token": bos,
         "eos_token": eos}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 7]}))
    return folder


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_templates_render_as_transformers_renders_them(name, tokenizer_json, tmp_path):
    folder = hf_folder(tmp_path, tokenizer_json, name)
    ours = tokenizers.create("huggingface", model_path=str(folder / "tokenizer.json"))
    theirs = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert ours.bos_id == theirs.bos_token_id and ours.eos_id == theirs.eos_token_id
    assert ours.stop_ids == tuple(dict.fromkeys((theirs.eos_token_id, 1, 7)))
    rendered = 0
    for messages in CONVERSATIONS:
        for generation_prompt in (False, True):
            try:
                want = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
            except Exception as refused:  # the template's raise_exception
                with pytest.raises(chat.ChatTemplateError, match=str(refused)[:20]):
                    chat.render(ours, messages, generation_prompt)
                continue
            got = chat.render(ours, messages, generation_prompt)
            assert got == want
            ids = theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
            assert ours.encode(got).tolist() == list(ids)
            rendered += 1
    assert rendered >= 4


def test_a_saved_tokenizer_keeps_its_template_and_specials(tokenizer_json, tmp_path):
    folder = hf_folder(tmp_path, tokenizer_json, "llama3")
    tokenizer = tokenizers.create("huggingface", model_path=str(folder / "tokenizer.json"))
    tokenizer.save(tmp_path / "workdir_tokenizer")
    loaded = tokenizers.load(tmp_path / "workdir_tokenizer")
    assert loaded.chat_template == TEMPLATES["llama3"][0]
    assert (loaded.bos_id, loaded.eos_id, loaded.stop_ids) == (tokenizer.bos_id, tokenizer.eos_id, tokenizer.stop_ids)
    assert loaded.bos_id == SPECIALS.index("<|begin_of_text|>")


def test_no_template_and_malformed_messages_are_named(tokenizer_json):
    plain = tokenizers.create("huggingface", model_path=str(tokenizer_json))
    with pytest.raises(chat.ChatTemplateError, match="no chat template"):
        chat.render(plain, CONVERSATIONS[0])
    plain.settings["chat_template"] = TEMPLATES["chatml"][0]
    with pytest.raises(chat.ChatTemplateError, match="role and a content"):
        chat.render(plain, [{"content": "no role"}])
