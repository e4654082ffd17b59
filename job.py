"""Federated Qwen3-VL fine-tuning with FedAvg on NVIDIA FLARE.

    python job.py --demo                                  # CPU demo: tiny model + synthetic data, minutes
    python job.py --n_clients 3 --num_rounds 3 --data_dir ./data --max_steps 100 --gpu "[0],[1],[2]"
    python job.py --env poc ...                           # real server + clients as processes
    python job.py --export_dir ./fl_job ...               # job folder for `nvflare job submit`
    python job.py --resume ...                            # continue a stopped job at its next round

Every flag's default comes from qwen3vl_sft.config (see `python job.py --help`).
"""

import sys

from qwen3vl_sft.config import BackendConfig, DataConfig, JobConfig, ModelConfig, TrainConfig, parse
from qwen3vl_sft.records import DataError


def main(argv=None):
    import torch

    from qwen3vl_sft import fl_job
    from qwen3vl_sft.demo import prepare_demo, report_demo

    configs = (JobConfig, ModelConfig, DataConfig, TrainConfig, BackendConfig)
    job, model, data, train, backend = parse(configs, argv, description=__doc__)
    try:
        if job.demo:
            job, model, data, train = prepare_demo(job, model, data, train)
        recipe = fl_job.build_recipe(job, model, data, train, backend)
        if job.export_dir:
            recipe.export(job.export_dir)
            print(f"Job exported to {job.export_dir}; submit it with: nvflare job submit -j {job.export_dir}")
            return
        run = recipe.run(fl_job.execution_env(job, torch.cuda.device_count()))
        # PoC: keep its workspace (server and site logs, the job's result folder) for the user to inspect.
        summary = fl_job.summarize(job, run.get_result(clean_up=job.env != "poc"))
    except DataError as err:
        sys.exit(f"error: {err}")
    print(summary.text)
    if job.demo:
        report_demo(job, model, data, summary)


if __name__ == "__main__":
    main()
