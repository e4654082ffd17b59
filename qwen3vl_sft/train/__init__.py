"""A site's training round: this example's engine on HF Trainer (``engine``), or the official Qwen3-VL
code (``official``, which runs ``official_launch`` by path in the clone's own Python).
"""
