"""Split PubMedVision into per-site training shards for federated Qwen3-VL fine-tuning.

    git lfs install && git clone https://huggingface.co/datasets/FreedomIntelligence/PubMedVision
    python prepare_data.py                                   # 3 IID sites under ./data
    python prepare_data.py --split modality --num_sites 4  # each site holds whole modalities
    python prepare_data.py --split dirichlet --alpha 0.3 --subset_size 5000

Writes ``<output_dir>/site-N/train.json`` and ``site-N/val.json`` (JSON arrays in the source format,
one ``<image>`` placeholder per image), a global held-out ``test.json`` and ``manifest.json`` (the
config, counts per site by modality and body part, skipped records by reason, sha256 of each file).
Image archives ``images_*.zip`` next to the data file are extracted into ``images/`` first.
Pass ``--data_file ''`` to download ``--split_name`` from the Hugging Face Hub instead.

Exact duplicate records are dropped (the first is kept), records sharing an image or an id stay on
one side of every split, ``--val_fraction 0`` / ``--test_fraction 0`` write no ``val.json`` /
``test.json``; the manifest counts all of it (keys: :mod:`qwen3vl_sft.data.prepare`).  Exit codes: 0 done,
2 bad data or flag (one line on stderr), 130 interrupted (nothing published).
"""

from __future__ import annotations

import sys

from qwen3vl_sft.config import PrepareDataConfig, parse
from qwen3vl_sft.data.prepare import prepare_shards, report
from qwen3vl_sft.data.sharding import InterruptedAfterPublish
from qwen3vl_sft.errors import DataError


def main(argv: list[str] | None = None) -> int:
    try:
        (cfg,) = parse((PrepareDataConfig,), argv, description=__doc__)
        manifest = prepare_shards(cfg)
    except DataError as e:
        print(f"prepare_data.py: error: {e}", file=sys.stderr)
        return 2
    except InterruptedAfterPublish:
        print("prepare_data.py: interrupted after the new shards were completely in place", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # shards are staged and published last: the output folder is as it was
        print(
            "prepare_data.py: interrupted; --output_dir is unchanged (nothing was published)", file=sys.stderr
        )
        return 130
    try:
        report(cfg, manifest)
    except KeyboardInterrupt:  # the shards are in place; only the summary was cut short
        print("prepare_data.py: interrupted after the new shards were completely in place", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
