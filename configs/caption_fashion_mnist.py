"""Image-to-text on Fashion-MNIST: a ViT encoder and a T5 decoder trained to caption the images
(`captioning`) or to answer questions about them (`vqa`), decoded with beam search.

    python -m jaxlm.main --config=configs/caption_fashion_mnist.py --workdir=/tmp/caption
    python -m jaxlm.main --config=configs/caption_fashion_mnist.py:vqa --workdir=/tmp/vqa
    python -m jaxlm.evaluate --workdir=/tmp/caption      # BLEU, CIDEr-D, class accuracy of the captions
    python -m jaxlm.predict --workdir=/tmp/caption --text=shoe.png
    python -m jaxlm.predict --workdir=/tmp/vqa --text="shoe.png|is this worn on the feet?"

Captions are the class descriptions of `jaxlm/data/image_text.py` (4 descriptions x 8 templates
per class, one drawn per epoch); questions are 6 per image (what it is, whether it is worn on the
feet or the upper body, a shoe, something to carry things in), the question being the answer's
prompt. Evaluation decodes the first `task.eval_bleu_batches` batches of the 10,000 test images
(never trained on). A sentencepiece vocabulary is trained on the distinct texts at start. Start the
encoder from a ViT run with `--config.task.image_init_from=DIR` (e.g. configs/vit_finetune.py's);
your own images: `--config.data.name=jaxlm_image_captions --config.data.files=train=DIR,validation=DIR`
(captions.jsonl / captions.tsv, or questions.jsonl for vqa) and `--config.data.eval_split=validation`.
"""

from jaxlm.config import default_config

MODES = ("captioning", "vqa")


def get_config(mode: str = "captioning"):
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: expected one of {list(MODES)}")
    config = default_config()
    config.task.update(dict(name=mode, beam_size=4, eval_bleu_batches=8))
    config.data.update(dict(name="jaxlm_fashion_mnist", train_split="train", eval_split="test",
                            tokenizer="sentencepiece", seq_len=32, target_len=32, image_channels=1, pad_multiple=8,
                            # at most what the distinct texts allow (sentencepiece says so): 354, 309
                            tokenizer_vocab_size={"captioning": 350, "vqa": 300}[mode]))
    config.model.update(dict(name="t5", num_layers=2, num_decoder_layers=2, num_heads=4, emb_dim=128, head_dim=32,
                             mlp_dim=256, mlp="geglu", norm="rmsnorm", norm_eps=1e-6, dropout=0.0,
                             tie_embeddings=False, init_std=0.05, scan_layers=False, max_len=32))
    config.image_model.update(dict(num_layers=4, emb_dim=128, num_heads=4, mlp_dim=256, patch_size=4, dropout=0.0,
                                   scan_layers=False))
    config.train.update(dict(steps=600, batch_size=64, log_every=50, eval_every=300, eval_batches=20))
    config.optim.update(dict(lr=1e-3, end_lr=1e-5, warmup_steps=50, b2=0.98, weight_decay=0.01))
    config.checkpoint.every = 300
    config.sample.max_new_tokens = 1  # > 0: print three predictions at the end
    return config
