"""Data: readers per file format -> TFDS builders -> pipelines -> one batching module -> Grain.

  readers          the file formats: text, aligned lines, TSV, CoNLL, IDX (no TFDS)
  builders         the jaxlm_* TFDS builders over local files, from one table of formats;
                   get_source / get_pairs (text documents and pairs of any TFDS data set)
  tokenizers       char, byte, sentencepiece, WordPiece, Hugging Face; a run's tokenizer
  batching         training epochs, evaluation batches (one padding rule), per-process
                   split, checkpointable iterators: what every pipeline below uses
  lm               causal-LM token streams cut into windows
  mlm              BERT masked-LM and next-sentence-prediction examples
  span_corruption  T5 span corruption of a token stream
  text_pairs       (source, target) text pairs, e.g. translation
  encoder_decoder  the batch rows that span_corruption and text_pairs share
  labeled          sentence classification and token tagging (fine-tuning, multitask)
  images           image classification (MNIST, Fashion-MNIST, TFDS image data sets)
"""
