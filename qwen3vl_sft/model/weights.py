"""The one place that maps weight names between the HF model, exchanged tensors and saved files.

    python -m qwen3vl_sft.model.weights --model_name_or_path Qwen/Qwen3-VL-2B-Instruct [--lora true]

prints how many tensors and MiB one federated message carries for a configuration, counted on the meta
device (no weights are loaded).

Names:

* Full fine-tuning: the exchanged name of a tensor is its name in ``model.state_dict()``, which is also
  its name in the checkpoint's ``*.safetensors`` (Qwen3-VL dense checkpoints are stored unconverted).
  Only trainable parameters are exchanged, and a tied ``lm_head.weight`` (the embedding) only once,
  under the embedding's name.
* LoRA: the exchanged name is PEFT's adapter-file name (``get_peft_model_state_dict``, the keys of
  ``adapter_model.safetensors``), so a global adapter saved by the server loads with
  ``PeftModel.from_pretrained`` and nobody adds or strips prefixes by hand.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

logger = logging.getLogger(__name__)
EXCHANGE_DTYPE = torch.bfloat16


class WeightsError(ValueError):
    """Received or loaded weights do not fit the model (message names the keys)."""


def is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def exchanged_tensors(model) -> dict[str, torch.Tensor]:
    """The model's own tensors that a site sends, under their exchanged names (no copy)."""
    if is_peft(model):
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(model)
    # named_parameters() yields a tied lm_head/embedding once, under the embedding's name.
    return {name: param for name, param in model.named_parameters() if param.requires_grad}


def exchanged_names(model) -> list[str]:
    """Names of the tensors a site sends: the trainable set, tied tensors once."""
    return list(exchanged_tensors(model))


def exchanged_state(model, dtype: torch.dtype | None = EXCHANGE_DTYPE) -> dict[str, torch.Tensor]:
    """A copy of the tensors a site sends, on CPU, contiguous, in ``dtype`` (None keeps the model's)."""
    return {
        name: t.detach().to("cpu", dtype=dtype or t.dtype, copy=True).contiguous()
        for name, t in exchanged_tensors(model).items()
    }


def name_differences(got, expected) -> tuple[list[str], list[str]]:
    """(names in ``got`` that ``expected`` lacks, names of ``expected`` that ``got`` lacks), sorted."""
    got, expected = set(got), set(expected)
    return sorted(got - expected), sorted(expected - got)


def require_weights(weights: Mapping[str, torch.Tensor]) -> None:
    """Refuse an empty received model: FedAvg's aggregate of a round that every site failed."""
    if not weights:
        raise WeightsError(
            "received an empty model: every site failed the previous round or the server lost its model"
        )


def load_exchanged(model, weights: Mapping[str, torch.Tensor]) -> None:
    """Copy received tensors into the model, strictly by name: every key must be one the model exchanges."""
    require_weights(weights)
    unknown, missing = name_differences(weights, exchanged_names(model))
    if unknown or missing:
        raise WeightsError(
            f"weights do not match the model's exchanged tensors: {len(unknown)} unknown "
            f"(e.g. {unknown[:3]}), {len(missing)} missing (e.g. {missing[:3]}). "
            "Were they produced with the same --lora / tune flags and model?"
        )
    if is_peft(model):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, dict(weights))
        return
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in weights.items():
            target = params[name]
            if target.shape != tensor.shape:
                raise WeightsError(
                    f"{name}: received shape {tuple(tensor.shape)}, model has {tuple(target.shape)}"
                )
            target.copy_(tensor.to(device=target.device, dtype=target.dtype))


def is_lora_state(weights: Mapping[str, torch.Tensor]) -> bool:
    """Whether saved tensors are PEFT LoRA adapters (adapter-file names hold ``lora_A`` / ``lora_B``)."""
    return any(".lora_A." in name or ".lora_B." in name for name in weights)


def lora_layout(weights: Mapping[str, torch.Tensor]) -> tuple[int, list[str]]:
    """Rank and target module names of saved LoRA adapters, read from their names and shapes.

    ``...self_attn.q_proj.lora_A.weight`` of shape (r, in_features) -> r and target ``q_proj``.
    """
    ranks, targets = set(), set()
    for name, tensor in weights.items():
        if ".lora_A." in name:
            module = name.split(".lora_A.")[0]
            targets.add(module.rsplit(".", 1)[-1])
            ranks.add(int(tensor.shape[0]))
    if len(ranks) != 1:
        raise WeightsError(f"LoRA adapters must share one rank; found lora_A ranks {sorted(ranks)}")
    return ranks.pop(), sorted(targets)


def load_state_subset(model, weights: Mapping[str, torch.Tensor]) -> int:
    """Copy a saved subset of ``model.state_dict()`` (a full-model global checkpoint) into ``model``.

    Saved names are state_dict names (= safetensors names = exchanged names); tensors the file lacks
    keep the base model's values (the frozen remainder). Refuses a file in which no name, or not
    every name, is one of the model's. Returns how many tensors were applied.
    """
    state = model.state_dict()
    unknown = sorted(set(weights) - set(state))
    if len(unknown) == len(weights):
        raise WeightsError(
            f"none of the {len(weights)} saved tensors is a tensor of this model (saved e.g. "
            f"{unknown[:3]}, model has e.g. {sorted(state)[:3]}): is it a Qwen3-VL global model for this base?"
        )
    if unknown:
        raise WeightsError(
            f"{len(unknown)} of {len(weights)} saved tensors are not in this model (e.g. {unknown[:3]}): "
            "wrong --base_model?"
        )
    for name, tensor in weights.items():
        if state[name].shape != tensor.shape:
            raise WeightsError(
                f"{name}: saved shape {tuple(tensor.shape)}, model has {tuple(state[name].shape)}: "
                "wrong --base_model?"
            )
    model.load_state_dict(dict(weights), strict=False)  # copy_ casts bf16 to the model's dtype
    return len(weights)


def as_tensors(params: Mapping | None) -> dict[str, torch.Tensor]:
    """Received parameters as CPU tensors (NVFlare may deliver numpy arrays)."""
    return {name: torch.as_tensor(value) for name, value in (params or {}).items()}


def checkpoint_name(exchanged_name: str) -> str:
    """Name of an exchanged (full fine-tuning) tensor in the model's safetensors files."""
    return exchanged_name


def message_bytes(state: Mapping[str, torch.Tensor], dtype: torch.dtype = EXCHANGE_DTYPE) -> int:
    """Bytes of the tensors in one message when sent in ``dtype``."""
    size = torch.empty((), dtype=dtype).element_size()
    return sum(t.numel() * size for t in state.values())


def meta_model(model_config):
    """The configured model on the meta device (shapes and names, no memory), with trainability applied."""
    from accelerate import init_empty_weights

    from .modeling import checkpoint_config, class_for, set_trainable

    config = checkpoint_config(model_config.model_name_or_path, model_config.trust_remote_code)
    with init_empty_weights():
        model = class_for(config)._from_config(config, dtype=torch.bfloat16)
    model.tie_weights()  # not done on the meta device by default; untied, lm_head would be exchanged twice
    return set_trainable(model, model_config)


def main(argv: list[str] | None = None) -> None:
    from ..config import ModelConfig, parse

    (model_config,) = parse((ModelConfig,), argv, description="Bytes per federated message (meta device).")
    model = meta_model(model_config)
    full, sent = model.state_dict(), exchanged_tensors(model)
    mib = 2**20
    print(f"state_dict (bf16): {len(full)} tensors, {message_bytes(full) / mib:.1f} MiB")
    print(f"exchanged  (bf16): {len(sent)} tensors, {message_bytes(sent) / mib:.1f} MiB")


if __name__ == "__main__":
    main()
