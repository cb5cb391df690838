"""How much of an adapter's effect on the development task is a constant per module (not a test).

Each adapted module's update `B A x` is replaced by its mean `b = mean(B A x)` over the model's own
sampled text (32 texts from `matched`'s sampler, seed `SEED + 11`; every position but the first,
which holds the start token's outliers), added to the module's output as a fixed bias with the
adapter switched off. Prints the development task's mean gold-answer NLL for each group of roles
(module names `<role>_proj`, as in Llama, Qwen2 and Gemma 3) so replaced, and the share of the
adapter's own gain that it keeps, `(base − biased) / (base − adapter)`:

    .venv/bin/python bench/dev/bias_share.py smollm2-135m adapters/smollm2-135m-commonsense \\
        q,k,v,o,gate,up,down o,down v gate,up

The adapter may be a transferred one, on its target model. One model in float32 on the CPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from peft import PeftModel

import crosslora.methods.matched as mm
from crosslora.anchor.probe import load_model
from crosslora.anchor.vocab import load_tokenizer
from crosslora.eval import evaluate
from crosslora.zoo.models import model_path

DEV = str(Path(__file__).with_name("arc_dev.json"))
MAX_TOKENS = 128


def lora_modules(model: PeftModel) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if "default" in getattr(m, "lora_A", {})}


def mean_updates(model: PeftModel, tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    """Per adapted module (named as in ``lora_modules``), the mean of its update
    `B A x · scaling` (out,) over ``texts``."""
    modules = lora_modules(model)
    sums: dict[str, torch.Tensor] = {}
    count = 0

    def hook_for(name, m):
        def hook(_module, args, _out):
            d = m.lora_B["default"](m.lora_A["default"](args[0])) * m.scaling["default"]
            sums[name] = sums.get(name, 0) + d[0, 1:].double().sum(0)

        return hook

    hooks = [m.register_forward_hook(hook_for(n, m)) for n, m in modules.items()]
    for text in texts:
        ids = tokenizer(text, return_tensors="pt").input_ids[:, :MAX_TOKENS]
        model(input_ids=ids)
        count += ids.shape[1] - 1
    for h in hooks:
        h.remove()
    return {n: (s / count).float() for n, s in sums.items()}


def dev_nll(model, tokenizer) -> float:
    result = evaluate(model, tokenizer, DEV, progress=False)
    (task,) = result["tasks"].values()
    return task["metrics"]["nll"]["value"]


def main(name: str, adapter: str, *groups: str) -> None:
    torch.set_grad_enabled(False)
    path = model_path(name, must_exist=True)
    tokenizer = load_tokenizer(path, "model")
    model = load_model(path, torch.device("cpu"), "model")
    texts = mm.probe_texts(model, tokenizer, model, tokenizer, 32, mm.SEED + 11)
    model = PeftModel.from_pretrained(model, adapter)
    modules, means = lora_modules(model), mean_updates(model, tokenizer, texts)
    with_adapter = dev_nll(model, tokenizer)
    with model.disable_adapter():
        base = dev_nll(model, tokenizer)
        print(f"base {base:.3f}  adapter {with_adapter:.3f}  ({len(means)} modules)")
        for group in groups:
            roles = {r + "_proj" for r in group.split(",")}
            hooks = [m.register_forward_hook(lambda _m, _a, out, b=means[n]: out + b)
                     for n, m in modules.items() if n.split(".")[-1] in roles]  # fmt: skip
            try:
                biased = dev_nll(model, tokenizer)
            finally:
                for h in hooks:
                    h.remove()
            share = (base - biased) / (base - with_adapter)
            print(f"{group}: constant {biased:.3f}, share of the adapter's gain {share:.3f}")


if __name__ == "__main__":
    main(*sys.argv[1:])
