"""Federated Qwen3-VL fine-tuning with FedAvg on NVIDIA FLARE.

    python job.py --demo                                  # CPU demo: tiny model + synthetic data, minutes
    python job.py --num_sites 3 --num_rounds 3 --data_dir ./data --max_steps 100 --gpu "[0],[1],[2]"
    python job.py --env poc ...                           # real server + clients as processes
    python job.py --env prod --startup_kit <admin kit> ...  # a provisioned deployment (docs/production.md)
    python job.py --export_dir ./fl_job ...               # job folder for `nvflare job submit`
    python job.py --resume ...                            # continue a stopped job at its next round

Every flag's default comes from qwen3vl_sft.config (see `python job.py --help`).
"""

import sys

from qwen3vl_sft.config import JOB_CONFIGS, parse
from qwen3vl_sft.errors import DataError


def main(argv=None):
    job, model, data, train, backend, exchange = parse(JOB_CONFIGS, argv, description=__doc__)
    import torch

    from qwen3vl_sft.demo import prepare_demo, report_demo
    from qwen3vl_sft.fl import job as fl_job

    try:
        if job.demo:
            job, model, data, train = prepare_demo(job, model, data, train)
        recipe = fl_job.build_recipe(job, model, data, train, backend, exchange)
        if job.export_dir:
            recipe.export(job.export_dir)
            print(
                f"Job exported to {fl_job.exported_job_folder(job)}; submit it with: {fl_job.submit_command(job)}"
            )
            return
        summary = fl_job.run_job(job, recipe, torch.cuda.device_count(), data.image_root)
        print(summary.text)
        if job.demo:
            report_demo(job, model, data, summary)
    except (DataError, fl_job.JobFailed) as err:
        sys.exit(f"error: {err}")
    except KeyboardInterrupt as err:
        print(f"\n{err}" if isinstance(err, fl_job.JobDetached) else
              "\njob.py: interrupted; continue the job later with: python job.py --resume <same flags>",
              file=sys.stderr)  # fmt: skip
        sys.exit(130)


if __name__ == "__main__":
    main()
