"""Parameter-efficient fine-tuning: what a method adds to a built model (LoRA, adapters, soft
prompts, prefixes) and which parameters train.

`config.peft.method` picks the method; `attach(model, peft)` adds its few parameters from outside
the model code (`jaxlm.models.attach`): `lora_a`/`lora_b` in matching Dense layers, `adapter_*`
after residual branches, a `prompt` before encoder stacks, `prefix_key`/`prefix_value` in
self-attention. `trainable(name)` then decides, by parameter name, what the optimizer sees: the
trainer splits the parameters into a trainable tree (in the train state, with optimizer state,
in checkpoints) and a frozen tree (loaded from `init_from`, never differentiated, never saved by
the run).
"""

import dataclasses
import functools
import logging
import re

from jaxlm.models import attach as attach_lib
from jaxlm.peft import adapters, lora, prompts

METHODS = ("full", "lora", "adapter", "prompt", "prefix", "bitfit", "head")

# method -> parameters it trains besides the task's heads (regex searched in "a/b/c" names)
METHOD_PARAMS = {
    "full": None,  # everything
    "lora": r"(^|/)lora_[ab]$",
    "adapter": r"(^|/)adapter_",
    "prompt": r"(^|/)prompt$",
    "prefix": r"(^|/)prefix_(key|value)$",
    "bitfit": r"(^|/)bias$",
    "head": None,  # only the heads
}

# method -> a peak learning rate that suits it for fine-tuning a BERT-size model with AdamW (few
# parameters train better at higher rates; soft prompts need the highest). Configs start here.
LEARNING_RATES = {"full": 1e-4, "lora": 1e-3, "adapter": 1e-3, "prompt": 3e-2, "prefix": 1e-2,
                  "bitfit": 2e-3, "head": 3e-3}


AUTO_LR = -1.0  # optim.lr: the usual rate of peft.method, resolved when the run is set up

log = logging.getLogger(__name__)


def learning_rate(method: str) -> float:
    if method not in LEARNING_RATES:
        raise ValueError(f"unknown fine-tuning method {method!r}: expected one of {list(METHODS)}")
    return LEARNING_RATES[method]


def resolve_learning_rate(config) -> None:
    """`optim.lr = -1` (auto) becomes the usual rate of `peft.method`, after the command line
    had its say: `--config.peft.method=lora` on a config with auto takes LoRA's rate, an
    explicit `--config.optim.lr` wins. The run logs which rate it took and why."""
    if config.optim.lr == AUTO_LR:
        config.optim.lr = learning_rate(config.peft.method)
        log.info("optim.lr=%g: the usual rate of peft.method=%r (optim.lr=-1 asks for it)",
                 config.optim.lr, config.peft.method)


@dataclasses.dataclass(frozen=True)
class Peft:
    """The `config.peft` settings the layers need (hashable: it lives in BlockConfig)."""

    method: str = "full"
    rank: int = 8  # lora
    alpha: float = 16.0  # lora: the update is scaled by alpha / rank
    dropout: float = 0.0  # lora: dropout on the adapter's input
    targets: str = "query|value"  # lora: regex searched in Dense paths (e.g. "attn/(query|value)")
    adapter: str = "houlsby"  # adapter: houlsby (after attention and MLP) | pfeiffer (after MLP)
    adapter_dim: int = 64  # adapter bottleneck width
    num_tokens: int = 20  # prompt: soft tokens before the input; prefix: keys/values per layer

    def lora_applies(self, path) -> bool:
        return self.method == "lora" and re.search(self.targets, "/".join(path)) is not None

    def adapter_applies(self, branch: str) -> bool:
        """Adapters follow the attention and MLP branches (Houlsby) or the MLP only (Pfeiffer)."""
        if self.method != "adapter":
            return False
        return branch == "mlp" or (self.adapter == "houlsby" and branch == "attn")


def attach(model, peft: Peft):
    """`model` with what `peft.method` adds to it (the model itself for methods that add nothing)."""
    interceptors = {"lora": lora.intercept, "adapter": adapters.intercept, "prompt": prompts.intercept_stack,
                    "prefix": prompts.intercept_attention}
    if peft.method not in interceptors:
        return model
    return attach_lib.attach(model, functools.partial(interceptors[peft.method], peft))


def from_config(config) -> Peft:
    """The `Peft` of `config.peft`, checked."""
    p = config.peft
    if p.method not in METHODS:
        raise ValueError(f"peft.method={p.method!r}: expected one of {list(METHODS)}")
    if p.method == "lora" and (p.rank <= 0 or not p.targets):
        raise ValueError(f"peft.method='lora' needs peft.rank > 0 and peft.targets (got {p.rank}, {p.targets!r})")
    if p.method == "lora":
        re.compile(p.targets)
    if p.method == "adapter" and p.adapter not in ("houlsby", "pfeiffer"):
        raise ValueError(f"peft.adapter={p.adapter!r}: expected 'houlsby' or 'pfeiffer'")
    if p.method in ("prompt", "prefix") and p.num_tokens <= 0:
        raise ValueError(f"peft.method={p.method!r} needs peft.num_tokens > 0")
    if p.method == "prompt" and config.model.name in ("gpt", "cnn"):
        raise ValueError("peft.method='prompt' prepends soft tokens to an encoder (bert, t5, vit); "
                         f"model.name={config.model.name!r} has none: use peft.method='prefix'")
    if p.method != "full" and config.model.name == "cnn":
        raise ValueError(f"peft.method={p.method!r} needs a Transformer (model.name='cnn' has no layers for it)")
    if p.method != "full" and not config.init_from:
        raise ValueError(f"peft.method={p.method!r} freezes a base model: set init_from (a jaxlm "
                         "workdir or a Hugging Face checkpoint)")
    return Peft(method=p.method, rank=p.rank, alpha=p.alpha, dropout=p.dropout, targets=p.targets,
                adapter=p.adapter, adapter_dim=p.adapter_dim, num_tokens=p.num_tokens)


def trainable_fn(config, heads: tuple[str, ...]):
    """`name -> bool` for "a/b/c" parameter names: the method's parameters, the task's `heads`
    (regexes of new task-specific layers) and `peft.trainable`, minus `peft.frozen`."""
    p = config.peft
    patterns = [METHOD_PARAMS[p.method], *heads, p.trainable]
    train = re.compile("|".join(f"(?:{q})" for q in patterns if q)) if any(patterns) else None
    frozen = re.compile(p.frozen) if p.frozen else None

    def trainable(name: str) -> bool:
        if frozen is not None and frozen.search(name):
            return False
        return p.method == "full" or (train is not None and train.search(name) is not None)

    return trainable
