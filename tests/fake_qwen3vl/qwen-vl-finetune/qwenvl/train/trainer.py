"""Fake ``qwenvl/train/trainer.py``, the sibling ``train_qwen.py`` imports as ``from trainer import ...``.

Like upstream's, it imports flash-attn at module level (so a clone environment without flash-attn
needs the launcher's import-only stand-in) and patches attention for flattened batches; the fake's
patch refuses to run (tests have no CUDA).
"""

from flash_attn.flash_attn_interface import flash_attn_varlen_func  # noqa: F401 - upstream's import


def replace_qwen2_vl_attention_class() -> None:
    raise RuntimeError("fake clone: flattened batches need flash attention, which tests do not have")
