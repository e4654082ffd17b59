"""Compare checkpoints on held-out PubMedVision samples: answers side by side, then a metrics table.

    # base vs the federated global model (full fine-tuning or LoRA; base from the .pt's meta or --base_model)
    python run_inference.py --model_path workspace/qwen3-vl-fedavg/server/simulate_job/app_server/FL_global_model.pt

    # several checkpoints in one run: base, federated global, a site's local-only model
    python run_inference.py --base_model Qwen/Qwen3-VL-2B-Instruct \\
        --model global=workspace/.../FL_global_model.pt --model site-1-local=outputs/site-1 \\
        --data_file data/test.json --max_samples 100 --batch_size 16

    # offline on CPU: tiny model, synthetic data, one short training run
    python -m qwen3vl_sft.model.tiny --output tiny_models/qwen3-vl-tiny
    python -m qwen3vl_sft.data.synthetic --output PubMedVision_synth --num_records 600
    python -m qwen3vl_sft.train.engine --model_name_or_path tiny_models/qwen3-vl-tiny \\
        --data_path PubMedVision_synth/PubMedVision_InstructionTuning_VQA.json --max_steps 300 \\
        --learning_rate 1e-3 --per_device_train_batch_size 16 --output_dir outputs/tiny-sft
    python run_inference.py --base_model tiny_models/qwen3-vl-tiny --model_path outputs/tiny-sft \\
        --data_file PubMedVision_synth/PubMedVision_InstructionTuning_VQA.json --max_samples 64 \\
        --max_new_tokens 8

    # the seed's commands: one model alone (it records no base), or the server's HF directory (its base
    # is recorded in fl_checkpoint.json), or the .pt with the base named
    python run_inference.py --model_path Qwen/Qwen3-VL-2B-Instruct \
        --data_file ./data/site-1/train.json --image_root ./PubMedVision --max_samples 1

A checkpoint is an HF id or directory, an NVFlare ``FL_global_model.pt`` (full or LoRA), or a LoRA adapter
directory; the kind is detected (see qwen3vl_sft/eval/loading.py). The "base" row is --base_model or the base
the checkpoint records, never a default hub id. Per checkpoint the table shows the mean teacher-forced
loss on the ground-truth answers, ROUGE-L, token F1 and exact-match accuracy on short answers, and the
records skipped for a defective image (the same for every checkpoint); report.json / report.csv /
report.png / answers.jsonl go to --output_dir. Flags that cannot work are refused before any model loads
(exit code 2); Ctrl-C stops with exit code 130.
"""

from __future__ import annotations

import logging
import sys


def main(argv: list[str] | None = None) -> int:
    try:
        return _run(argv)
    except KeyboardInterrupt:  # one line instead of a traceback from wherever generation was
        print("interrupted (Ctrl-C): stopped, no report written", file=sys.stderr)
        return 130


def _run(argv: list[str] | None) -> int:
    # Imported here so that Ctrl-C during the slow torch/transformers import also ends in one line.
    from qwen3vl_sft.config import InferenceConfig, parse
    from qwen3vl_sft.eval import inference, report

    (cfg,) = parse((InferenceConfig,), argv, description=__doc__)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        inference.check_flags(cfg)
        report.ensure_output_dir(cfg.output_dir)
        checkpoints = inference.requested_checkpoints(cfg)
        for ckpt in checkpoints:
            print(ckpt.describe())
        dataset, results = inference.evaluate_checkpoints(checkpoints, cfg)
    except inference.USER_ERRORS as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr)  # one line, even for HF's messages
        return 2

    # 1. answers, sample by sample, in the seed's layout
    shown = len(dataset.records) if cfg.show_samples < 0 else cfg.show_samples
    skipped = (
        f" ({len(dataset.image_skips)} skipped: defective images, see the log)" if dataset.image_skips else ""
    )
    print(f"\nRunning inference on {len(dataset.records)} sample(s){skipped}\n")
    for i, record in enumerate(dataset.records[:shown]):
        answers = {r.checkpoint.label: r.answers[i] for r in results}
        print(report.format_sample(i + 1, record, dataset.builder.image_paths(record), answers))

    # 2. metrics over all samples, then the report files
    print(report.format_table(results))
    paths = report.write_report(cfg.output_dir, dataset, results, cfg)
    print("\nReport: " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
