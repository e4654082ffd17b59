"""bench_real_exchange.py's site: each round receive the global, perturb every tensor, send it back.

NVFlare starts it as it starts client.py (torchrun, client.py's flags, parsed by the same dataclasses);
it trains nothing, so a round costs what the exchange costs: NVFlare's transfer both ways and the
product's coding of the message (``qwen3vl_sft.fl.exchange.SiteExchange``, as ``fl.client.run_site`` uses
it). Each round appends one JSON line to ``exchange_site.jsonl`` in its working folder: seconds spent
waiting for the task (in ``flare.is_running``) / decoding / encoding / in ``flare.send``, MiB each way, the process's peak RSS.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import torch

from qwen3vl_sft.config import BackendConfig, DataConfig, ExchangeConfig, ModelConfig, TrainConfig, parse
from qwen3vl_sft.fl.exchange import SiteExchange

STEP = 2.0**-7  # one bf16 step at 1.0: a relative change no tensor of either dtype rounds away


@torch.no_grad()
def perturb(weights: dict[str, torch.Tensor]) -> None:
    """Change every element in place (no second copy of the model)."""
    for tensor in weights.values():
        tensor.mul_(1 + STEP).add_(STEP * 1e-2)


def main(argv=None) -> None:
    import nvflare.client as flare
    from nvflare.app_common.abstract.fl_model import FLMetaKey

    *_, exchange = parse((ModelConfig, DataConfig, TrainConfig, BackendConfig, ExchangeConfig), argv)
    flare.init()
    site = flare.get_site_name()
    coder = SiteExchange(exchange.compression, exchange.error_feedback, exchange.exchange)
    report = Path("exchange_site.jsonl")
    while True:
        start = time.monotonic()
        if not flare.is_running():  # blocks until the next task (or the end) arrives
            break
        model = flare.receive()
        if model is None:
            break
        received_at = time.monotonic()
        weights, received_mib = coder.receive(model.params, model.current_round)
        if coder.exchange == "update":  # receive returns the global the coder holds: train a copy of it,
            weights = {name: t.clone() for name, t in weights.items()}  # as a site's model is one
        decoded_at = time.monotonic()
        perturb(weights)
        params, params_type, sent = coder.send(weights, model.current_round)
        del weights
        encoded_at = time.monotonic()
        meta = {FLMetaKey.NUM_STEPS_CURRENT_ROUND: 1, "site": site, "round": model.current_round}
        flare.send(flare.FLModel(params=params, params_type=params_type, meta=meta))
        sent_at = time.monotonic()
        line = {"site": site, "round": model.current_round, "receive_wait_s": received_at - start,
                "decode_s": decoded_at - received_at, "encode_s": encoded_at - decoded_at,
                "send_s": sent_at - encoded_at, "received_mib": received_mib, "sent_mib": sent["sent_mib"],
                "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # fmt: skip
        with report.open("a") as out:
            out.write(json.dumps(line) + "\n")
        del params, model


if __name__ == "__main__":
    main()
