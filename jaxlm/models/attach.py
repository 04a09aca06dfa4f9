"""Behaviour attached to a built model from outside its code, by flax method interception.

Fine-tuning methods (`jaxlm.peft`), quantization and distillation (`jaxlm.compress`) change what
a few layer methods do without the model code naming them. The methods they attach to:

  `Dense.project`        the product with the kernel (LoRA, quantized weights)
  `Embed` (setup, __call__, attend)   the token table (quantized embeddings)
  `Attention.attend`     queries, keys, values and bias in (attention prefixes, attention maps)
  `Block.branch_output`  a residual branch's output (adapters)
  `Stack.__call__`       a layer stack's input and output (soft prompts)

An interceptor is `(next_fun, args, kwargs, context) -> output` as for
`flax.linen.intercept_methods`; it runs inside the intercepted module's scope, so it may create
parameters and submodules there, which then sit in the parameter tree beside the module's own.
"""

import flax.linen as nn


def attach(model: nn.Module, interceptor) -> nn.Module:
    """`model` (same fields, same parameter tree) whose `init` and `apply` run `interceptor` on
    every module method call. Attaching several times nests them: the last attached runs first.
    (`Module.init` goes through `init_with_output`, so that and `apply` are the entry points.)"""
    base = type(model)

    def intercepted(method):
        def run(self, *args, **kwargs):
            with nn.intercept_methods(interceptor):
                return method(self, *args, **kwargs)
        return nn.nowrap(run)

    methods = {name: intercepted(getattr(base, name)) for name in ("init_with_output", "apply")}
    attached = model.clone()
    attached.__class__ = type(base.__name__, (base,), methods)
    return attached


def calls(context, module_type, method_name: str) -> bool:
    """Whether an interceptor's `context` is a call of `module_type.method_name`."""
    return context.method_name == method_name and isinstance(context.module, module_type)
