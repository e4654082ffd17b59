"""NVFlare client: Qwen3-VL SFT on this site's shard, one round per FedAvg task.

NVFlare starts it on each site (see job.py) as

    torchrun --nproc_per_node=1 --master_port 29500 custom/client.py \
        --model_name_or_path Qwen/Qwen3-VL-2B-Instruct --data_path /data/site-1/train.json \
        --eval_data_path /data/site-1/val.json

The flags are the engine's config dataclasses (qwen3vl_sft.config); the loop itself is
qwen3vl_sft.fl.client.run_site: receive -> load -> validate -> train -> send. With
--backend official a QwenLM/Qwen3-VL clone's train() does the training (docs/official_backend.md).
"""

from qwen3vl_sft.config import SITE_CONFIGS, parse
from qwen3vl_sft.fl.client import run_site, setup_logging
from qwen3vl_sft.train.engine import RunConfig


def main(argv=None):
    model, data, train, backend, exchange = parse(SITE_CONFIGS, argv, description=__doc__)
    setup_logging()
    run_site(RunConfig(model=model, data=data, train=train), backend, exchange)


if __name__ == "__main__":
    main()
