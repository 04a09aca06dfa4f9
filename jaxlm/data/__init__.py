"""Data: tokenizers, TFDS builders for local files (no TensorFlow) and Grain pipelines.

  tokenizers  char, byte, sentencepiece and WordPiece (a Hugging Face BERT vocab.txt)
  builders    Tiny Shakespeare, your text files, Multi30k and parallel text files
  images      MNIST and Fashion-MNIST from IDX files
  pipeline    causal-LM token streams; mlm (BERT pairs and masking); seq2seq (T5 span
              corruption and source/target pairs)
"""
