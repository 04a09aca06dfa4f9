"""Chat with a trained decoder: `python -m jaxlm.chat --workdir=DIR [--system="..."]`.

A REPL that keeps the conversation, renders it with the checkpoint's chat template (the
tokenizer of the workdir, e.g. an imported or fine-tuned Llama-class model), streams the reply to
the terminal as it is decoded and stops at the template's end-of-turn tokens. `/reset` starts a
new conversation; an empty line or end of input quits. When the conversation outgrows the
model's context, its oldest turns (after the system message) are dropped.
"""

import sys

from absl import app, flags

from jaxlm.data import chat as chat_lib
from jaxlm.infer import sampling
from jaxlm.train import loop

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A jaxlm run directory whose tokenizer has a chat template.")
flags.DEFINE_string("system", "", "A system message to start every conversation with.")
flags.DEFINE_integer("max_new_tokens", 256, "The longest reply, in tokens.")
flags.DEFINE_float("temperature", 0.0, "0 means greedy.")
flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0: all).")
flags.DEFINE_float("top_p", 1.0, "Keep the smallest set of tokens with this much probability.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")


class Conversation:
    """The messages so far and the model that answers them."""

    def __init__(self, model, params, tokenizer, system: str = "", **sampling_settings):
        if not tokenizer.chat_template:
            raise ValueError("this run's tokenizer has no chat template: chat needs a Hugging Face "
                             "checkpoint's tokenizer (tokenizer_config.json or chat_template.jinja)")
        self.model, self.params, self.tokenizer = model, params, tokenizer
        self.system, self.settings = system, sampling_settings
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def prompt(self) -> list[int]:
        """The rendered conversation's ids, oldest turns dropped until a reply has room."""
        room = self.model.max_len - min(self.settings.get("max_new_tokens", 256), self.model.max_len // 2)
        while True:
            ids = self.tokenizer.encode(chat_lib.render(self.tokenizer, self.messages, add_generation_prompt=True))
            first = 1 if self.system else 0
            if len(ids) <= room or len(self.messages) - first <= 1:
                return ids.tolist()[-room:]
            del self.messages[first:first + 2]  # the oldest user turn and its reply

    def reply(self, text: str, write=None) -> str:
        """The model's answer to `text` (also kept in the conversation); `write(piece)` gets
        the answer's text as it grows."""
        self.messages.append({"role": "user", "content": text})
        ids, shown = [], ""
        for chunk in sampling.stream(self.model, self.params, [self.prompt()], stop_ids=self.tokenizer.stop_ids,
                                     pad_id=self.tokenizer.pad_id or 0, vocab_size=self.tokenizer.vocab_size,
                                     **self.settings):
            ids += [int(i) for i in chunk[0] if i >= 0]
            text_so_far = self.tokenizer.decode(ids)
            if write is not None and len(text_so_far) > len(shown):
                write(text_so_far[len(shown):])
            shown = text_so_far
        self.messages.append({"role": "assistant", "content": shown})
        return shown


def main(argv):
    del argv
    run, params, _ = loop.restore_latest(FLAGS.workdir)
    conversation = Conversation(run.task.model, params, run.tokenizer, FLAGS.system,
                                max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature,
                                top_k=FLAGS.top_k, top_p=FLAGS.top_p, seed=FLAGS.seed)
    write = lambda piece: (sys.stdout.write(piece), sys.stdout.flush())
    while True:
        sys.stdout.write("> ")
        sys.stdout.flush()
        line = sys.stdin.readline()
        if not line.strip():
            return
        if line.strip() == "/reset":
            conversation.reset()
            continue
        conversation.reply(line.rstrip("\n"), write)
        sys.stdout.write("\n")


def run():
    """The `jaxlm-chat` command."""
    flags.mark_flags_as_required(["workdir"])
    app.run(main)


if __name__ == "__main__":
    run()
