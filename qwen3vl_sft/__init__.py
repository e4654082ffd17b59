"""Federated-ready Qwen3-VL supervised fine-tuning: all the ML behind this NVFlare example.

Scripts at the top level (prepare_data.py, job.py, client.py, model.py, run_inference.py) are glue;
everything they do lives here.
"""
