"""Loss of a nanoGPT checkpoint on a whole validation split, windowed the way jaxlm evaluates.

    TORCH_PYTHON tools/nanogpt_val_loss.py NANOGPT_DIR CKPT_PT VAL_BIN [--seq_len=64 --batch_size=12]

Non-overlapping windows of seq_len + 1 tokens, full batches only, the mean over every token:
the figure `python -m jaxlm.evaluate` prints for a jaxlm run, so the two compare directly.
Run it with a Python that has torch (see tools/bench_nanogpt.sh); that Python need not have
absl, so unlike the other tools it parses its arguments with argparse.
"""

import argparse
import sys

import numpy as np
import torch


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("nanogpt_dir")
    parser.add_argument("ckpt")
    parser.add_argument("val_bin")
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=12)
    args = parser.parse_args()
    sys.path.insert(0, args.nanogpt_dir)
    from model import GPT, GPTConfig  # nanoGPT's model.py

    checkpoint = torch.load(args.ckpt, map_location="cpu")
    model = GPT(GPTConfig(**checkpoint["model_args"]))
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in checkpoint["model"].items()})
    model.eval()
    tokens = np.fromfile(args.val_bin, dtype=np.uint16).astype(np.int64)
    window = args.seq_len + 1
    count = len(tokens) // window // args.batch_size * args.batch_size
    windows = torch.from_numpy(tokens[:count * window].reshape(count, window))
    total = 0.0
    with torch.no_grad():
        for batch in windows.split(args.batch_size):
            _, loss = model(batch[:, :-1].contiguous(), batch[:, 1:].contiguous())
            total += float(loss) * batch.shape[0]
    print(f"iter={checkpoint['iter_num']} val_loss_full_split={total / count:.4f}")


if __name__ == "__main__":
    main()
