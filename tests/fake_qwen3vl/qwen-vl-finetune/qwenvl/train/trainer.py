"""Fake ``qwenvl/train/trainer.py``, the sibling ``train_qwen.py`` imports as ``from trainer import ...``.

Upstream's module imports flash-attn at module level and patches attention for flattened batches.
The fake imports nothing heavy (tests run without CUDA); the patch refuses to run.
"""


def replace_qwen2_vl_attention_class() -> None:
    raise RuntimeError("fake clone: flattened batches need flash attention, which tests do not have")
