"""Running a checkpoint's transformers model block by block, so that a large model never
sits whole in memory.

`run_blocks` runs a model (usually the meta-device skeleton of `skeleton.runnable`) over
token ids GPTQ-style: a "catcher" records the inputs of block 0, then each transformer
block is materialized from the checkpoint, run on the cached hidden states (with the
caller's hooks on it), and released. `run_model` runs the whole model that way, once per
variant of it, up to its usual output.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..errors import BitallocError

# The skeleton and its checks live in `skeleton`; these names stay importable from here.
from .skeleton import (  # noqa: F401
    HARMLESS_EXTRAS,
    TOKENIZER_FILES,
    build_skeleton,
    can_run,
    check_linears,
    load_tokenizer,
    model_class,
    parameters_on_meta,
    runnable,
    unexpected_tensors,
)

BATCH_TOKENS = 2048  # tokens per forward pass through a block


def run_blocks(
    net: nn.Module,
    input_ids: torch.Tensor,
    modules: Sequence[str],
    on_block: Callable[[str, nn.Module], list],
    *,
    load: Callable[[str], torch.Tensor] | None = None,
    batch_tokens: int = BATCH_TOKENS,
    quiet: bool = True,
    after_block: Callable[[str], None] | None = None,
) -> None:
    """Run ``net`` over ``input_ids`` (n, context) one transformer block at a time, up to the
    last block holding one of ``modules``. Before each block runs, ``on_block(prefix, block)``
    registers hooks and returns their handles (removed after the block). Parameters on the
    meta device are read with ``load(name)`` when their module runs and released after it;
    then ``after_block(prefix)``, if given, is called (the block's memory already freed)."""
    runner = BlockRunner(net, input_ids, modules, load=load, batch_tokens=batch_tokens)
    last = runner.last_block(modules)
    for index in range(last + 1):
        prefix = runner.prefix(index)
        runner.step(index, lambda block, prefix=prefix: on_block(prefix, block))
        if not quiet:
            print(f"ran block {index + 1}/{last + 1}", flush=True)
        if after_block is not None:
            after_block(prefix)


class BlockRunner:
    """Token ids' hidden states moved through a model's transformer blocks one block at a
    time (GPTQ-style): the inputs of block 0 are caught once (embeddings read from ``load``
    when they run, then released), and `step` runs one block on them. Memory: the hidden
    states (tokens x hidden x 4 bytes) plus the block being run."""

    def __init__(self, net: nn.Module, input_ids: torch.Tensor, modules: Sequence[str], *,
                 load: Callable[[str], torch.Tensor] | None = None,
                 batch_tokens: int = BATCH_TOKENS) -> None:  # fmt: skip
        self.net, self.load = net, load
        self.blocks_name, self.blocks = find_blocks(net, modules)
        device = next((p.device for p in net.parameters() if not p.is_meta), torch.device("cpu"))
        input_ids = input_ids.to(device)
        if input_ids.dim() != 2 or input_ids.numel() == 0:
            shape = tuple(input_ids.shape)
            raise BitallocError(f"no tokens to run the model on (token ids of shape {shape})")
        batch = max(1, batch_tokens // input_ids.shape[1])
        # (hidden states, [(args, kwargs) of each block]) per batch: blocks get their own arguments
        batches = [input_ids[i : i + batch] for i in range(0, len(input_ids), batch)]
        self.states = _catch_inputs(net, self.blocks, batches, load)
        self.next = 0  # the block the states are the inputs of

    def prefix(self, index: int) -> str:
        return f"{self.blocks_name}.{index}."

    def block_of(self, module: str) -> int:
        return int(module[len(self.blocks_name) + 1 :].split(".", 1)[0])

    def last_block(self, modules: Sequence[str]) -> int:
        return max(self.block_of(m) for m in modules)

    def step(self, index: int, on_block: Callable[[nn.Module], list] | None = None,
             materialized: bool = False) -> None:  # fmt: skip
        """Run block ``index`` (the next one) on the states; ``on_block(block)`` registers
        hooks first and returns their handles. The block's meta parameters are read from
        ``load`` and released after (unless ``materialized``: the caller holds them)."""
        if index != self.next:
            raise BitallocError(f"block {index} cannot run before block {self.next}")  # a bug if reached
        block = self.blocks[index]
        loaded: list[tuple[nn.Module, str, nn.Parameter]] = []
        if not materialized:
            _materialize(block, self.prefix(index), self.load, loaded)
        try:
            device = next((p.device for p in block.parameters() if not p.is_meta), None)
            if device is not None:
                self.states = [_to_device(state, device) for state in self.states]
            hooks = on_block(block) if on_block is not None else []
            try:
                with torch.inference_mode():
                    self.states = [
                        (_hidden(block(hidden, *per_block[index][0], **per_block[index][1])), per_block)
                        for hidden, per_block in self.states
                    ]
            finally:
                for hook in hooks:
                    hook.remove()
        finally:
            _release(loaded)
        self.next = index + 1


def _to_device(value, device: torch.device):
    """``value`` with every tensor inside (tuples, lists, dicts) on ``device``."""
    if isinstance(value, torch.Tensor):
        return value if value.device == device else value.to(device)
    if isinstance(value, tuple):
        return tuple(_to_device(v, device) for v in value)
    if isinstance(value, list):
        return [_to_device(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


class _Caught(Exception):
    def __init__(self):
        super().__init__("caught the inputs of every block")


class _Catcher(nn.Module):
    """Stands in for a block: records its inputs and passes the hidden states on unchanged;
    the last one stops the forward pass. Each block's own arguments are kept, since models
    give blocks of different kinds different ones (Gemma: masks and rotary embeddings of
    sliding-window and of full-attention layers)."""

    def __init__(self, block: nn.Module, last: bool):
        super().__init__()
        self.block, self.last = block, last
        self.inputs = None

    def forward(self, hidden, *args, **kwargs):
        self.inputs = (hidden, args, kwargs)
        if self.last:
            raise _Caught()
        return hidden

    def __getattr__(self, name: str):  # models read attributes such as `attention_type`
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)


def _catch(net: nn.Module, blocks: nn.ModuleList, ids: torch.Tensor):
    """(hidden states entering block 0, [(args, kwargs) of each block]) for ``ids``: the
    arguments other than the hidden states do not depend on the blocks' weights."""
    originals = list(blocks)
    catchers = [_Catcher(block, i == len(originals) - 1) for i, block in enumerate(originals)]
    for i, catcher in enumerate(catchers):
        blocks[i] = catcher
    try:
        kwargs = {"use_cache": False} if "use_cache" in inspect.signature(net.forward).parameters else {}
        with torch.inference_mode():
            net(ids, **kwargs)
    except _Caught:
        pass
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
    if any(catcher.inputs is None for catcher in catchers):
        raise BitallocError(f"the model never called all its blocks ({type(originals[0]).__name__})")
    return catchers[0].inputs[0], [catcher.inputs[1:] for catcher in catchers]


def _catch_inputs(net: nn.Module, blocks: nn.ModuleList, batches: Sequence[torch.Tensor], load) -> list:
    """`_catch` for each of ``batches``; the meta parameters outside the blocks (embeddings)
    are read with ``load`` when they run and released after."""
    loaded: list[tuple[nn.Module, str, nn.Parameter]] = []
    inside = {id(m) for m in blocks.modules()}
    outside = [m for m in net.modules() if id(m) not in inside and _has_meta(m)]
    hooks = [m.register_forward_pre_hook(_materializer(net, load, loaded)) for m in outside]
    try:
        return [_catch(net, blocks, ids) for ids in batches]
    finally:
        for hook in hooks:
            hook.remove()
        _release(loaded)


def _hidden(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def find_blocks(net: nn.Module, modules: Sequence[str]) -> tuple[str, nn.ModuleList]:
    """The ModuleList of transformer blocks that holds every selected module."""
    best = None
    for name, child in net.named_modules():
        if isinstance(child, nn.ModuleList) and len(child) and name:
            covered = sum(m.startswith(name + ".") for m in modules)
            if covered and (best is None or covered > best[0]):
                best = (covered, name, child)
    if best is None or best[0] < len(modules):
        outside = [m for m in modules if best is None or not m.startswith(best[1] + ".")]
        raise BitallocError(
            f"calibration runs the transformer blocks; {outside[0]} is not inside one "
            "(exclude it, or use --objective weight)"
        )
    return best[1], best[2]


def _has_meta(module: nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters(recurse=False))


def _materialize(module: nn.Module, prefix: str, load, loaded: list) -> None:
    """Read every meta parameter of ``module`` (named ``prefix``...) as float32."""
    for child_name, child in module.named_modules():
        for name, param in list(child._parameters.items()):
            if param is None or not param.is_meta:
                continue
            key = f"{prefix}{child_name + '.' if child_name else ''}{name}"
            _load_into(child, name, key, load, loaded)


def _load_into(module: nn.Module, name: str, key: str, load, loaded: list) -> None:
    if load is None:
        raise BitallocError(f"parameter {key} has no values (meta device) and nothing to load it from")
    try:
        tensor = load(key)
    except KeyError:
        raise BitallocError(
            f"the checkpoint has no tensor {key} for the model built from its config"
        ) from None
    param = module._parameters[name]
    if tuple(tensor.shape) != tuple(param.shape):
        raise BitallocError(
            f"checkpoint tensor {key} has shape {tuple(tensor.shape)}, the model {tuple(param.shape)}"
        )
    loaded.append((module, name, param))  # the meta parameter, put back on release
    module._parameters[name] = nn.Parameter(tensor.to(torch.float32), requires_grad=False)


def _materializer(net: nn.Module, load, loaded: list):
    names = {id(m): n for n, m in net.named_modules()}

    def hook(module, args):
        prefix = names[id(module)]
        for name, param in list(module._parameters.items()):
            if param is not None and param.is_meta:
                _load_into(module, name, f"{prefix}.{name}" if prefix else name, load, loaded)

    return hook


def _release(loaded: list) -> None:
    """Put parameters read from the checkpoint back on the meta device (frees their memory)."""
    for module, name, meta in loaded:  # the same meta object: tied parameters stay tied
        module._parameters[name] = meta
    loaded.clear()


# shape: one entry point whose keyword options are the callers' hooks (eval, layer weights)
def run_model(
    net: nn.Module,
    batches: Sequence[torch.Tensor],
    modules: Sequence[str],
    on_output: Callable[[int, int, str, object], None],
    *,
    variants: Sequence[str] = ("model",),
    prepare: Callable[[str, str, nn.Module], Callable[[], None] | None] | None = None,
    load: Callable[[str], torch.Tensor] | None = None,
    device: torch.device | str | None = None,
    progress: Callable[[], None] | None = None,
    start: Callable[[str], int] | None = None,
) -> None:
    """Run the whole of ``net`` (embeddings, every transformer block, what follows the blocks)
    over token id ``batches`` one block at a time, once for each of ``variants`` of the model.

    ``batches`` are (rows, length) id tensors; lengths may differ between batches. ``modules``
    names matrices inside the blocks (they locate the block list). The inputs of block 0 are
    caught once (they do not depend on the blocks). Each block is then read from ``load``
    once and, for every variant in turn, ``prepare(variant, prefix, block)`` may change it
    (swap weights) and returns a function that undoes the change (or None), before that
    variant's hidden states run through it. Last, for every row of every batch and every
    variant, ``net`` runs on the row with its blocks standing in for the variant's final
    hidden states, so the final norm and head give the model's usual output (logits,
    last_hidden_state), which goes to ``on_output(batch, row, variant, output)``.

    Memory: one block, the hidden states of every variant (variants x tokens x hidden) and
    one row's output. Parameters on the meta device are read with ``load(name)`` (a tied
    parameter missing from the checkpoint is read under its twin's name) onto ``device``
    (a skeleton's buffers are moved there too); an in-memory model runs where it is.
    ``progress()`` is called after each (block, variant) and each (row, variant).

    ``start(variant)``, when given, is the index of the first block at which a variant can
    differ from ``variants[0]`` (which starts at 0; ``len(blocks)``: at none). Before that
    block the variant is not run (no ``prepare``, no ``progress``): its hidden states are
    those of ``variants[0]``, copied when its first block is reached. So a variant that only
    changes late blocks costs only those blocks, and holds no hidden states before them.
    """
    blocks_name, blocks = find_blocks(net, modules)
    device, load, head_load = _run_loaders(net, load, device)
    batches = [ids.to(device) for ids in batches]
    variants = list(variants)
    caught = _catch_inputs(net, blocks, batches, load)
    first = _first_blocks(variants, start, len(blocks))
    states = _VariantStates(
        variants, first, {v: [h for h, _ in caught] for v in variants if first[v] == 0},
        [per_block for _, per_block in caught], prepare, progress,
    )  # fmt: skip
    del caught
    for index, block in enumerate(blocks):
        states.start_at(index)
        loaded: list[tuple[nn.Module, str, nn.Parameter]] = []
        _materialize(block, f"{blocks_name}.{index}.", load, loaded)
        try:
            states.run_block(index, f"{blocks_name}.{index}.", block)
        finally:
            _release(loaded)
    for variant in variants:  # differs at no block: the first variant's final states
        states.hidden.setdefault(variant, states.hidden[variants[0]])
    _run_heads(net, blocks, batches, states, on_output, head_load)


def _run_loaders(net: nn.Module, load, device) -> tuple[torch.device, Callable | None, Callable | None]:
    """(device to run on, loader for the blocks, loader for what is outside them) for
    `run_model`. A skeleton (meta parameters) runs on ``device``, its buffers moved there; its
    loaders read a tied parameter absent from the checkpoint under its twin's name, and the
    head's loader gives the names of one parameter the same tensor. A real model runs where
    it is, with ``load`` as given."""
    if not any(p.is_meta for p in net.parameters()):
        return next((p.device for p in net.parameters()), torch.device("cpu")), load, load
    device = torch.device(device or "cpu")
    for module in net.modules():
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and not buffer.is_meta and buffer.device != device:
                module._buffers[name] = buffer.to(device)
    if load is None:
        return device, None, None
    base = _device_loader(load, device)
    twins = _twin_groups(net)
    return device, _twin_loader(twins, base), _twin_loader(twins, base, cache={})


@dataclasses.dataclass
class _VariantStates:
    """Each variant's hidden states of every batch, moved through the blocks by `run_model`."""

    variants: list[str]
    first: dict[str, int]  # the first block each variant runs
    hidden: dict[str, list[torch.Tensor]]  # variant -> hidden states per batch
    extras: list[list[tuple[tuple, dict]]]  # per batch: the (args, kwargs) of each block
    prepare: Callable[[str, str, nn.Module], Callable[[], None] | None] | None
    progress: Callable[[], None] | None
    as_tuple: bool = False  # the blocks return tuples

    def start_at(self, index: int) -> None:
        """The variants that first differ at block ``index`` start from the first's states."""
        for variant in self.variants:
            if self.first[variant] == index and variant not in self.hidden:
                self.hidden[variant] = [h.clone() for h in self.hidden[self.variants[0]]]

    def run_block(self, index: int, prefix: str, block: nn.Module) -> None:
        for variant in self.variants:
            if self.first[variant] > index:
                continue
            undo = self.prepare(variant, prefix, block) if self.prepare is not None else None
            try:
                with torch.inference_mode():
                    for i, per_block in enumerate(self.extras):
                        args, kwargs = per_block[index]
                        output = block(self.hidden[variant][i], *args, **kwargs)
                        self.as_tuple = isinstance(output, (tuple, list))
                        self.hidden[variant][i] = _hidden(output)
            finally:
                if undo is not None:
                    undo()
            if self.progress is not None:
                self.progress()


def _first_blocks(variants: list[str], start: Callable[[str], int] | None, blocks: int) -> dict[str, int]:
    """The first block each variant runs (`run_model`'s ``start``), checked."""
    if start is None:
        return dict.fromkeys(variants, 0)
    first = {variant: int(start(variant)) for variant in variants}
    if first[variants[0]] != 0:
        raise BitallocError(f"the first variant ({variants[0]}) must start at block 0")
    for variant, index in first.items():
        if not 0 <= index <= blocks:
            raise BitallocError(f"variant {variant} starts at block {index}: the model has {blocks}")
    return first


def _run_heads(net, blocks, batches, states: _VariantStates, on_output, load) -> None:
    """``net`` on each row with its blocks replaced by `_Replay`: the parts after the blocks."""
    originals = list(blocks)
    replays = [_Replay(block, first=i == 0, as_tuple=states.as_tuple) for i, block in enumerate(originals)]
    loaded: list[tuple[nn.Module, str, nn.Parameter]] = []
    inside = {id(m) for m in blocks.modules()}
    outside = [m for m in net.modules() if id(m) not in inside and _has_meta(m)]
    hooks = [m.register_forward_pre_hook(_materializer(net, load, loaded)) for m in outside]
    kwargs = {"use_cache": False} if "use_cache" in inspect.signature(net.forward).parameters else {}
    try:
        for i, replay in enumerate(replays):
            blocks[i] = replay
        for b, ids in enumerate(batches):
            for row in range(ids.shape[0]):
                for variant in states.variants:
                    replays[0].value = states.hidden[variant][b][row : row + 1]
                    with torch.inference_mode():
                        output = net(ids[row : row + 1], **kwargs)
                    replays[0].value = None
                    on_output(b, row, variant, output)
                    del output
                    if states.progress is not None:
                        states.progress()
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
        for hook in hooks:
            hook.remove()
        _release(loaded)


class _Replay(nn.Module):
    """Stands in for a block: the first returns the stored final hidden states, the others
    pass their input on, in the output type of the real blocks."""

    def __init__(self, block: nn.Module, first: bool, as_tuple: bool):
        super().__init__()
        self.__dict__["_block"] = block  # not a submodule: the real block stays out of `net.modules()`
        self.first, self.as_tuple = first, as_tuple
        self.value: torch.Tensor | None = None

    def forward(self, hidden, *args, **kwargs):
        out = self.value if self.first else hidden
        return (out,) if self.as_tuple else out

    def __getattr__(self, name: str):  # models read attributes such as `attention_type`
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_block"], name)


def _twin_groups(net: nn.Module) -> dict[str, tuple[str, ...]]:
    """Parameter name -> every name of that parameter, for parameters shared under several
    names (tied embeddings: ``lm_head.weight`` is ``model.embed_tokens.weight``)."""
    groups: dict[int, list[str]] = {}
    for name, param in net.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return {name: tuple(names) for names in groups.values() if len(names) > 1 for name in names}


def _twin_loader(
    twins: dict[str, tuple[str, ...]], load: Callable[[str], torch.Tensor], cache: dict | None = None
) -> Callable[[str], torch.Tensor]:
    """``load`` that reads a tied parameter absent from the checkpoint (``lm_head.weight`` of a
    model with tied embeddings) under another of its names; with ``cache``, the names of one
    parameter get the same float32 tensor, so they share its memory again."""

    def read(key: str) -> torch.Tensor:
        group = twins.get(key)
        if cache is not None and group in cache:
            return cache[group]
        try:
            tensor = load(key)
        except KeyError:
            for twin in group or ():
                try:
                    tensor = load(twin)
                    break
                except KeyError:
                    continue
            else:
                raise
        if cache is not None and group is not None:
            tensor = cache[group] = tensor.to(torch.float32)
        return tensor

    return read


def _device_loader(
    load: Callable[[str], torch.Tensor], device: torch.device
) -> Callable[[str], torch.Tensor]:
    return lambda key: load(key).to(device)
