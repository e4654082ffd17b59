"""Evaluation: loss and generated answers (``evaluate``), the scores (``metrics``), what a checkpoint
path holds and how it loads (``loading``), and run_inference.py's base-vs-fine-tuned comparison
(``inference``) and its report (``report``).
"""
