"""Objectives, kept apart from the trainer: `get(config, model)` returns the task object.

A task offers `init(rng)`, `loss(params, batch, rng, train) -> (loss_sum, metric sums)` and
`summarize(sums) -> metrics`, so one trainer serves every family and every fine-tuning task.
"""

from jaxlm.tasks import causal_lm

TASKS = {"causal_lm": lambda config, model: causal_lm.CausalLM(model, config.data.seq_len)}


def get(config, model):
    name = config.task.name
    if name not in TASKS:
        raise ValueError(f"task.name={name!r}: expected one of {sorted(TASKS)}")
    return TASKS[name](config, model)
