"""Server-side model for the FedAvg job: the exchanged Qwen3-VL tensors only.

    python model.py --model_name_or_path tiny_models/qwen3-vl-tiny

NVFlare instantiates ``Qwen3VLGlobalModel`` on the server from the recipe's
``{"class_path": "model.Qwen3VLGlobalModel", "args": {"model_config": {...}}}``. It reads the trainable
tensors (bf16, tied embeddings once, no frozen vision tower; LoRA: adapters only) from the base
checkpoint's safetensors, so the server never builds the 2B model.
"""

from qwen3vl_sft.fl.server import GlobalModel, main


class Qwen3VLGlobalModel(GlobalModel):
    """The global model NVFlare persists and sends each round (see qwen3vl_sft.fl.server)."""


if __name__ == "__main__":
    main()
