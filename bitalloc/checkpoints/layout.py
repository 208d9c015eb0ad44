"""Making a transformers model built from a config carry its checkpoint's tensor names.

bitalloc names every matrix as its checkpoint does (profile rows, plans, packed tensors,
adapter targets), and runs models built from the config (`runnable`, `load_quantized`).
Recent transformers versions lay some models out differently from their checkpoints and
convert the weights while loading:

- a renamed module: Mixtral's ``block_sparse_moe`` is ``mlp`` in the model, GPT-NeoX's
  ``embed_out`` is ``lm_head``;
- fused experts: a mixture-of-experts layer keeps all its experts in two 3-D parameters,
  ``experts.gate_up_proj`` (experts, 2·ffn, hidden) and ``experts.down_proj`` (experts,
  hidden, ffn), where the checkpoint (and ``save_pretrained``) holds one Linear per expert
  and projection: ``experts.3.gate_proj``/``up_proj``/``down_proj`` (Qwen-MoE family) or
  ``experts.3.w1``/``w3``/``w2`` (Mixtral).

`match_checkpoint` undoes both on the model: it gives renamed modules their checkpoint name
(the model's code still reaches them by the old attribute) and replaces fused experts by
`ExpertLinears`, one ``nn.Linear`` per expert and projection under the checkpoint's names,
computing exactly what the fused module computes. Every matrix of every expert is then an
ordinary Linear: calibration hooks see the tokens each expert actually receives, the
profile, plan and apply treat each as one planning unit, `QuantLinear` replaces it, and
PEFT attaches LoRA to it by name.

A checkpoint that itself stores the fused 3-D tensors keeps them fused: they are not 2-D
matrices, so bitalloc does not plan them and copies them unchanged (kept in 16 bits).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from ..errors import BitallocError

# The projection names of one expert in a checkpoint: (gate, up, down), in the order of
# gate_up_proj's halves (gate rows first, as transformers concatenates them).
EXPERT_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))
_LITERAL = re.compile(r"^\^?(?:\\?\.)?([A-Za-z_][A-Za-z0-9_]*)(?:\\?\.)?$")
_TENSOR = re.compile(r"^(.*)\.weight(?:\.(?:codes|scales|scales2))?$")


def checkpoint_modules(tensor_names: Iterable[str]) -> set[str]:
    """Module names of the weights among ``tensor_names`` (plain or packed by bitalloc)."""
    modules = set()
    for name in tensor_names:
        match = _TENSOR.match(name)
        if match:
            modules.add(match.group(1))
    return modules


def match_checkpoint(net: nn.Module, tensor_names: Iterable[str]) -> nn.Module:
    """Rename and unfuse ``net``'s modules in place so that its parameter names are the
    checkpoint's ``tensor_names`` (see the module docstring); returns ``net``. A model that
    already matches is left as it is. New expert Linears are created on the device (and in
    the dtype) of the fused parameters they replace, the meta device for a skeleton."""
    names = set(tensor_names)
    modules = checkpoint_modules(names)
    prefixes = {name.rsplit(".", i)[0] for name in names for i in range(1, name.count(".") + 1)}
    for source, target in _renamings(net):
        for path, parent in list(net.named_modules()):
            if target not in parent._modules:
                continue
            old = f"{path}.{target}" if path else target
            new = f"{path}.{source}" if path else source
            if new in prefixes and old not in prefixes:
                _rename_child(parent, target, source)
    for path, experts in list(net.named_modules()):
        if not _is_fused_experts(experts) or f"{path}.gate_up_proj" in names:
            continue
        projections = next((p for p in EXPERT_NAMES if f"{path}.0.{p[0]}" in modules), None)
        if projections is None:
            continue  # neither layout found: the loader names the missing tensor
        _check_supported(path, experts)
        parent_path, _, child = path.rpartition(".")
        parent = net.get_submodule(parent_path) if parent_path else net
        parent._modules[child] = ExpertLinears.from_fused(experts, projections)
    return net


def _renamings(net: nn.Module) -> list[tuple[str, str]]:
    """(checkpoint name, model name) of the whole-module renamings transformers applies when
    loading ``net``'s checkpoints (literal names only, e.g. ("block_sparse_moe", "mlp"))."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming

        transforms = get_model_conversion_mapping(net, add_legacy=False)
    except Exception:  # another transformers version, or not a transformers model
        return []
    pairs = []
    for transform in transforms:
        if type(transform) is not WeightRenaming:
            continue
        sources = getattr(transform, "_original_source_patterns", transform.source_patterns)
        targets = getattr(transform, "_original_target_patterns", transform.target_patterns)
        if len(sources) == len(targets) == 1:
            source, target = _LITERAL.match(sources[0]), _LITERAL.match(targets[0])
            if source and target:
                pairs.append((source.group(1), target.group(1)))
    return pairs


def _rename_child(parent: nn.Module, old: str, new: str) -> None:
    """Register ``parent.old`` under ``new`` (same position), still reachable as ``parent.old``."""
    module = parent._modules[old]
    parent.__dict__["_modules"] = {(new if k == old else k): v for k, v in parent._modules.items()}
    object.__setattr__(parent, old, module)  # the model's forward reads self.<old>


def _is_fused_experts(module: nn.Module) -> bool:
    params = module._parameters
    gate_up, down = params.get("gate_up_proj"), params.get("down_proj")
    return gate_up is not None and down is not None and gate_up.dim() == 3 and down.dim() == 3


def _check_supported(path: str, experts: nn.Module) -> None:
    """BitallocError naming what `ExpertLinears` cannot reproduce."""
    flags = {
        "biases": getattr(experts, "has_bias", False),
        "transposed weights": getattr(experts, "is_transposed", False),
        "interleaved gate/up rows": not getattr(experts, "is_concatenated", True),
        "no gate": not getattr(experts, "has_gate", True),
        "a norm after each expert": getattr(experts, "has_post_expert_norm", False),
    }
    extra = sorted(set(experts._parameters) - {"gate_up_proj", "down_proj"})
    problem = next((name for name, on in flags.items() if on), None)
    if extra:
        problem = f"extra parameters {', '.join(extra)}"
    if problem is None and not hasattr(experts, "act_fn"):
        problem = "no act_fn"
    if problem is None:
        count, double_ffn, hidden = experts.gate_up_proj.shape
        if double_ffn % 2 or tuple(experts.down_proj.shape) != (count, hidden, double_ffn // 2):
            problem = f"weights of shapes {list(experts.gate_up_proj.shape)}, {list(experts.down_proj.shape)}"
    if problem is not None:
        raise BitallocError(
            f"unsupported mixture-of-experts layer {path} ({type(experts).__name__}): {problem}; "
            "bitalloc runs fused experts with gate_up_proj (experts, 2*ffn, hidden) and down_proj only"
        )


class _Expert(nn.Module):
    """One expert's three Linears, named as in the checkpoint."""

    def __init__(self, names: tuple[str, str, str], hidden: int, ffn: int, device, dtype) -> None:
        super().__init__()
        self.names = names
        gate, up, down = names
        for name, (rows, cols) in ((gate, (ffn, hidden)), (up, (ffn, hidden)), (down, (hidden, ffn))):
            self.add_module(name, nn.Linear(cols, rows, bias=False, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, act_fn) -> torch.Tensor:
        gate, up, down = (self._modules[name] for name in self.names)
        return down(act_fn(gate(x)) * up(x))


class ExpertLinears(nn.ModuleList):
    """The experts of a mixture-of-experts layer as one module per expert (``3.gate_proj``,
    ``3.up_proj``, ``3.down_proj``, or ``3.w1``, ``3.w3``, ``3.w2``), called like the fused
    module it replaces: ``(hidden_states (tokens, hidden), top_k_index, top_k_weights)``.

    Each expert runs on exactly the tokens routed to it (nothing for an expert no token
    chose), and its output, scaled by its routing weight, is added to those tokens' rows."""

    def __init__(self, experts: list[_Expert], act_fn) -> None:
        super().__init__(experts)
        self.num_experts = len(experts)
        self.__dict__["act_fn"] = act_fn  # not a submodule: the list holds experts only

    @classmethod
    def from_fused(cls, fused: nn.Module, names: tuple[str, str, str]) -> ExpertLinears:
        """Experts holding ``fused``'s weights (or meta tensors if those are on meta)."""
        count, double_ffn, hidden = fused.gate_up_proj.shape
        ffn = double_ffn // 2
        device, dtype = fused.gate_up_proj.device, fused.gate_up_proj.dtype
        experts = [_Expert(names, hidden, ffn, device, dtype) for _ in range(count)]
        if device.type != "meta":
            with torch.no_grad():
                for index, expert in enumerate(experts):
                    gate, up, down = (expert._modules[name] for name in names)
                    gate.weight.copy_(fused.gate_up_proj[index, :ffn])
                    up.weight.copy_(fused.gate_up_proj[index, ffn:])
                    down.weight.copy_(fused.down_proj[index])
        for expert in experts:
            for linear in expert.children():
                linear.weight.requires_grad_(fused.gate_up_proj.requires_grad)
        return cls(experts, fused.act_fn)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            hit = torch.unique(top_k_index[(top_k_index >= 0) & (top_k_index < self.num_experts)])
        for index in hit.tolist():
            token_idx, top_k_pos = torch.where(top_k_index == index)
            output = self[index](hidden_states[token_idx], self.act_fn)
            output = output * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, output.to(final.dtype))
        return final
