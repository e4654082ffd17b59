"""Evaluation: loss and generated answers (``evaluate``), the scores (``metrics``) and run_inference.py's
base-vs-fine-tuned comparison (``inference``).
"""
