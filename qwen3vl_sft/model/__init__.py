"""The model: loading, freezing and LoRA (``modeling``), the one weight-name mapping (``weights``),
the server's files (``checkpoints``) and the offline tiny Qwen3-VL (``tiny``).
"""
