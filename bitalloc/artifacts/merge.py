"""Merging a LoRA adapter into `QuantLinear`s: the result is a plain dense model.

PEFT merges an adapter by adding the scaled B·A to the base layer's weight, which a packed
layer does not have. As PEFT does for bitsandbytes 4-bit layers, the merge here dequantizes:
each merged `QuantLinear` becomes an ``nn.Linear`` holding Q + scaling·B·A in the layer's
compute dtype (the ``dtype`` the model was loaded with; bf16 for a 16-bit model), computed
with PEFT's own ``get_delta_weight`` and the same in-place add as PEFT's dense merge, so it
equals merging into ``apply --dequantized`` loaded in that dtype. A warning says the result is
no longer quantized. ``unmerge`` puts the packed layer back unchanged.

`QuantLoraLinear` reaches PEFT through `patch_peft_dispatch` (called when PEFT's LoRA model
module is imported after bitalloc, see `hf_quantizer.register_when_imported`): PEFT's
dispatcher list is fixed, so the LoRA model's ``_create_new_module`` is wrapped to build a
`QuantLoraLinear` for a `QuantLinear` target, and its ``merge_and_unload`` to drop the
``quantization_config`` once no packed layer is left.
"""

from __future__ import annotations

import types
import warnings

import torch
from torch import nn

from .nn import QuantLinear, replace_linear

NOT_QUANTIZED_WARNING = (
    "merging a LoRA adapter into bitalloc's packed QuantLinear layers dequantizes them: the merged "
    "model is dense ({dtype}) and no longer quantized"
)


def dense_linear(layer: QuantLinear, dtype: torch.dtype | None = None) -> nn.Linear:
    """An ``nn.Linear`` holding the dequantized Q (and the bias) of ``layer``, in ``dtype``
    (default: its compute dtype), on its device."""
    dtype = dtype or layer.compute_dtype
    dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                      device="meta", dtype=dtype)  # fmt: skip
    dense.weight = nn.Parameter(layer.dequantize(dtype), requires_grad=False)
    if layer.bias is not None:
        dense.bias = nn.Parameter(layer.bias.detach().to(dtype).clone(), requires_grad=False)
    return dense


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every `QuantLinear` of ``model`` by its dense `dense_linear` (in place)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            replace_linear(model, name, dense_linear(module, dtype))
    return model


_QUANT_LORA: type | None = None


def quant_lora_class() -> type:
    """PEFT's LoRA ``Linear`` for a `QuantLinear` base: merge dequantizes, unmerge restores."""
    global _QUANT_LORA
    if _QUANT_LORA is not None:
        return _QUANT_LORA
    from peft.tuners.lora.layer import Linear
    from peft.tuners.tuners_utils import check_adapters_to_merge

    class QuantLoraLinear(Linear):
        def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
            adapter_names = check_adapters_to_merge(self, adapter_names)
            if not adapter_names:
                return
            base = self.get_base_layer()
            packed = base if isinstance(base, QuantLinear) else None
            if packed is not None:
                message = NOT_QUANTIZED_WARNING.format(dtype=packed.compute_dtype)
                warnings.warn(message, UserWarning, stacklevel=2)
                self._packed_base = packed
                self.base_layer = dense_linear(packed)
            super().merge(safe_merge=safe_merge, adapter_names=adapter_names)

        def unmerge(self) -> None:
            super().unmerge()
            packed = getattr(self, "_packed_base", None)
            if not self.merged and packed is not None:
                self.base_layer = packed
                del self._packed_base

    _QUANT_LORA = QuantLoraLinear
    return QuantLoraLinear


def patch_peft_dispatch(module: types.ModuleType) -> None:
    """Wrap ``peft.tuners.lora.model.LoraModel`` (``module``) as the module docstring says."""
    lora_model = module.LoraModel
    if getattr(lora_model, "_bitalloc", False):
        return
    create = lora_model._create_new_module
    unload = lora_model._unload_and_optionally_merge

    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        base = target.get_base_layer() if hasattr(target, "get_base_layer") else target
        plain = not (lora_config.use_dora or lora_config.alora_invocation_tokens is not None)
        if isinstance(base, QuantLinear) and plain and getattr(lora_config, "arrow_config", None) is None:
            kwargs = {k: v for k, v in kwargs.items() if k not in ("loaded_in_8bit", "loaded_in_4bit")}
            return quant_lora_class()(target, adapter_name, config=lora_config, **kwargs)
        return create(lora_config, adapter_name, target, **kwargs)

    def _unload_and_optionally_merge(self, *args, **kwargs):
        model = unload(self, *args, **kwargs)
        quantizer = getattr(model, "hf_quantizer", None)
        method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
        if method == "bitalloc" and not any(isinstance(m, QuantLinear) for m in model.modules()):
            quantizer.remove_quantization_config(model)  # a plain dense model now
            saver = model.__dict__.get("save_pretrained")
            if getattr(getattr(saver, "__func__", None), "_bitalloc", False):
                del model.save_pretrained  # transformers' own again
        return model

    lora_model._create_new_module = staticmethod(_create_new_module)
    lora_model._unload_and_optionally_merge = _unload_and_optionally_merge
    lora_model._bitalloc = True
