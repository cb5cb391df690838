"""Run a model over the probe text one decoder layer at a time, in float32, with bounded memory.

transformers loads the model with one decoder layer (a *skeleton*: embeddings, final norm, LM
head and rotary tables, read as transformers reads them), and a stub takes each layer's place.
One pass of the skeleton over a chunk of texts records what the model hands each layer (the
hidden states entering layer 0, the masks and position embeddings per layer): the model's own
code decides, for any family. Then each layer is built on the meta device, its weights read from
the checkpoint onto ``device`` in float32 and put in its place (so module paths, and hooks on
them, are the whole model's), run over every chunk, and freed. The logits come from the skeleton
once more, its first stub handing on the last layer's output. The arithmetic is the whole
model's, op for op: the activations and log-likelihoods equal a whole-model forward's (tested),
at the memory of one layer, the skeleton and the chunks' hidden states.

A family whose layers hold tensors under other names than its checkpoint's (transformers fuses
the experts of Mixtral and Qwen MoE at load time), or buffers, cannot be built this way:
``runner`` loads it whole (``Whole``), behind the same interface.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from torch import nn

from crosslora.arch.layout import Layout
from crosslora.errors import CrossLoraError
from crosslora.io.pretrained import load_model

log = logging.getLogger("crosslora")

Chunk = tuple[torch.Tensor, torch.Tensor]  # token ids (B, T), attention mask (B, T)


class _Stub(nn.Module):
    """A decoder layer's stand-in: records its arguments in ``calls[i]`` and hands its input on
    (or ``feed``, when set: the last layer's output, for the head)."""

    def __init__(self, index: int, calls: list) -> None:
        super().__init__()
        self.index, self.calls = index, calls
        self.feed: torch.Tensor | None = None

    def forward(self, hidden_states, *args, **kwargs):
        self.calls[self.index] = (args, kwargs)
        return hidden_states if self.feed is None else self.feed


@contextmanager
def _shallow(config) -> Iterator[None]:
    """The config cut, while held, to one decoder layer of each layer type it has (Gemma's
    sliding and full attention: the model builds masks and rotary tables per type present)."""
    text = config.get_text_config()
    count, types = text.num_hidden_layers, getattr(text, "layer_types", None)
    kinds = list(dict.fromkeys(types)) if types is not None else [None]
    text.num_hidden_layers = len(kinds)
    if types is not None:
        text.layer_types = kinds
    try:
        yield
    finally:
        text.num_hidden_layers = count
        if types is not None:
            text.layer_types = types


@contextmanager
def _quiet() -> Iterator[None]:
    """transformers' report of the checkpoint's unused tensors (every layer but the first) off."""
    from transformers.utils import logging as tf_logging

    level, bars = tf_logging.get_verbosity(), tf_logging.is_progress_bar_enabled()
    tf_logging.set_verbosity_error()
    tf_logging.disable_progress_bar()
    try:
        yield
    finally:
        tf_logging.set_verbosity(level)
        if bars:
            tf_logging.enable_progress_bar()


def _build(config, device: torch.device | str):
    from transformers import AutoModelForCausalLM

    with _shallow(config), torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


class Streamed:
    """A model run one decoder layer at a time (module docstring): ``layer_inputs`` records a
    chunk's layer arguments, ``layer(i)`` holds layer ``i`` in place, ``logits`` applies the
    head to the last layer's output. ``skeleton`` is the model with stubs for layers."""

    def __init__(self, layout: Layout, device: torch.device, what: str,
                 dtype: torch.dtype = torch.float32) -> None:  # fmt: skip
        from crosslora.io.pretrained import load_causal_lm, load_config

        self.layout, self.device, self.what, self.dtype = layout, device, what, dtype
        config = load_config(layout.checkpoint.path, what)
        self.n = layout.num_layers
        text = config.get_text_config()
        count, types = text.num_hidden_layers, getattr(text, "layer_types", None)
        with _shallow(config), _quiet():  # the other layers' weights go unread
            skeleton = load_causal_lm(layout.checkpoint.path, what, config=config, dtype=dtype)
        self.config = skeleton.config  # its own copy, set back to every layer
        self.config.get_text_config().num_hidden_layers = count
        if types is not None:
            self.config.get_text_config().layer_types = types
        parent, _, leaf = layout.family.layers.rpartition(".")
        self.layer_type = type(skeleton.get_submodule(layout.family.layers)[0])
        self.calls: list = [None] * self.n
        self.stubs = nn.ModuleList([_Stub(i, self.calls) for i in range(self.n)])
        setattr(skeleton.get_submodule(parent), leaf, self.stubs)
        self.skeleton = skeleton.to(device).eval()

    @staticmethod
    def streamable(layout: Layout) -> bool:
        """Whether a decoder layer of this family holds no buffers and every parameter of it is
        in the checkpoint under its module path."""
        from crosslora.io.pretrained import load_config

        config = load_config(layout.checkpoint.path, layout.what)
        layer_type = type(_build(config, "meta").get_submodule(layout.family.layers)[0])
        layer = _meta_layer(layer_type, config, 0)
        if any(True for _ in layer.buffers()):
            return False
        prefix = f"{layout.family.layers}.0."
        return all(_find(layout, prefix + name) for name, _ in layer.named_parameters())

    @torch.no_grad()
    def layer_inputs(
        self, ids: torch.Tensor, mask: torch.Tensor | None, cache=None
    ) -> tuple[torch.Tensor, list]:
        """What the model hands its layers for this chunk: the hidden states entering layer 0
        (B, T, d) and, per layer, its other arguments ``(args, kwargs)``; with a key/value
        ``cache``, for the next tokens (the layers fill it as they run)."""
        first: list[torch.Tensor] = []
        hook = self.stubs[0].register_forward_pre_hook(
            lambda _m, args, kwargs: first.append(args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True,
        )
        try:
            mask = mask.to(self.device) if mask is not None else None
            self.skeleton.base_model(input_ids=ids.to(self.device), attention_mask=mask,
                                     cache=cache, use_cache=cache is not None)  # fmt: skip
        finally:
            hook.remove()
        return first[0], list(self.calls)

    @contextmanager
    def layer(self, i: int) -> Iterator[nn.Module]:
        """Layer ``i`` on ``device`` (in ``dtype``), in its place in the skeleton while held."""
        layer = _meta_layer(self.layer_type, self.config, i)
        prefix = f"{self.layout.family.layers}.{i}."
        for name, p in list(layer.named_parameters()):
            key = _find(self.layout, prefix + name)
            if key is None:
                raise CrossLoraError(f"{self.what}: {prefix + name} is not in the checkpoint")
            t = self.layout.checkpoint.get(key).to(self.device, self.dtype).reshape(p.shape)
            module, _, leaf = name.rpartition(".")
            owner = layer.get_submodule(module) if module else layer
            owner._parameters[leaf] = nn.Parameter(t, requires_grad=False)
        with self._placed(i, layer.eval()):
            yield layer

    @contextmanager
    def _placed(self, i: int, layer: nn.Module) -> Iterator[None]:
        stub = self.stubs[i]
        self.stubs[i] = layer
        try:
            yield
        finally:
            self.stubs[i] = stub

    @torch.no_grad()
    def logits(
        self, ids: torch.Tensor, mask: torch.Tensor | None, last: torch.Tensor
    ) -> torch.Tensor:
        """The model's logits (B, T, V) given its last layer's output ``last`` (B, T, d)."""
        stub = self.stubs[0]
        stub.feed = last
        mask = mask.to(self.device) if mask is not None else None
        try:
            return self.skeleton(input_ids=ids.to(self.device), attention_mask=mask,
                                 use_cache=False).logits  # fmt: skip
        finally:
            stub.feed = None


class Whole(Streamed):
    """``Streamed``'s interface over the whole model loaded in float32, its layers held aside
    and put in place one at a time: for the families ``Streamed`` cannot build."""

    def __init__(self, layout: Layout, device: torch.device, what: str) -> None:
        self.layout, self.device, self.what, self.dtype = layout, device, what, torch.float32
        self.n = layout.num_layers
        model = load_model(layout.checkpoint.path, device, what)
        parent, _, leaf = layout.family.layers.rpartition(".")
        self.real = model.get_submodule(layout.family.layers)
        self.calls = [None] * self.n
        self.stubs = nn.ModuleList([_Stub(i, self.calls) for i in range(self.n)])
        setattr(model.get_submodule(parent), leaf, self.stubs)
        self.skeleton = model

    @contextmanager
    def layer(self, i: int) -> Iterator[nn.Module]:
        with self._placed(i, self.real[i]):
            yield self.real[i]


def _meta_layer(layer_type: type, config, i: int) -> nn.Module:
    """Decoder layer ``i`` built on the meta device: no memory, no initialisation."""
    with torch.device("meta"):
        try:
            return layer_type(config.get_text_config(), layer_idx=i)
        except TypeError:
            return layer_type(config.get_text_config(), i)


def _find(layout: Layout, name: str) -> str | None:
    module, _, leaf = name.rpartition(".")
    return layout.checkpoint.find(module, leaf)


def runner(layout: Layout, device: torch.device, what: str) -> Streamed:
    """``Streamed`` where the family allows, else ``Whole`` (said in the log)."""
    if Streamed.streamable(layout):
        return Streamed(layout, device, what)
    log.info("%s: a decoder layer cannot be read on its own (weights converted at load time); "
             "the model is loaded whole", what)  # fmt: skip
    return Whole(layout, device, what)


def run_layers(
    runner: Streamed,
    chunks: Sequence[Chunk],
    variants: int = 1,
    around: Callable[[int, int, int], AbstractContextManager | None] | None = None,
    desc: str | None = None,
    bar=None,
) -> list[list[torch.Tensor]]:
    """Every chunk through every layer, one layer on the device at a time, in ``variants``
    copies from the same input; ``around(layer, variant, chunk)`` may return a context entered
    around that run (a variant's updates, hooks recording activations). Returns the last layer's
    outputs ``[variant][chunk]`` (B, T, d). A progress bar over the layers when ``desc`` (or
    ``bar``, a tqdm bar advanced once per layer)."""
    from tqdm.auto import tqdm

    firsts, calls = [], []
    for ids, mask in chunks:
        h, c = runner.layer_inputs(ids, mask)
        firsts.append(h)
        calls.append(c)
    states = [list(firsts) for _ in range(variants)]
    del firsts
    own = tqdm(total=runner.n, desc=desc, unit="layer", disable=desc is None)
    with torch.no_grad(), own:
        for i in range(runner.n):
            with runner.layer(i) as layer:
                for v in range(variants):
                    for c in range(len(chunks)):
                        args, kwargs = calls[c][i]
                        ctx = around(i, v, c) if around is not None else None
                        with ctx if ctx is not None else nullcontext():
                            out = layer(states[v][c], *args, **kwargs)
                        states[v][c] = out[0] if isinstance(out, tuple) else out
            for b in (own, bar):
                if b is not None:
                    b.update()
    return states


class Sampler:
    """A model for ``probe.sample_texts`` that holds one decoder layer at a time (``run``, in the
    checkpoint's dtype): each step runs the new tokens through every layer, loaded in turn, and
    the layers keep their keys and values in the cache. For a model larger than the memory there
    is; the numbers are the whole model's, at one layer's memory and a full read of the weights
    per token."""

    def __init__(self, run: Streamed) -> None:
        self.run = run

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.run.skeleton.parameters()

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, cache=None, use_cache: bool = True):
        from types import SimpleNamespace

        from transformers import DynamicCache

        cache = DynamicCache(config=self.run.config) if cache is None else cache
        h, calls = self.run.layer_inputs(input_ids, None, cache)
        for i in range(self.run.n):
            with self.run.layer(i) as layer:
                args, kwargs = calls[i]
                out = layer(h, *args, **kwargs)
                h = out[0] if isinstance(out, tuple) else out
        return SimpleNamespace(logits=self.run.logits(input_ids, None, h), cache=cache)
