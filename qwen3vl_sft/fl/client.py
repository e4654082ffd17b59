"""Client side of the federated job: the NVFlare Client API loop around the SFT engine.

Launched by NVFlare (through client.py) on each site as ``torchrun --nproc_per_node=K --master_port P
client.py <flags>``; rank 0 talks to NVFlare and broadcasts to the other ranks.  Per round:

1. receive the global model (rank 0): a packet, rebuilt into the fp32 global by
   :class:`~qwen3vl_sft.fl.exchange.SiteExchange` (the first round's weights, then changes to the global
   the site holds), and broadcast it;
2. load it into the local model, strictly by name (frozen tensors stay local);
3. validate it on the site's ``val.json`` (rank 0) -> ``val_loss``, ``val_accuracy`` (short answers),
   ``val_rouge_l`` / ``val_token_f1`` (generated answers), ``val_skipped_images``;
4. train one round in-process (``--backend official``: in the clone's ``train()``, after the received
   model was validated here, with the same evaluator, and freed);
5. send the update (trained - received, fp32 arithmetic, coded by ``--compression``, params_type DIFF)
   with metrics, incl. MiB each way and the fidelity of the coded update (``update_cosine``,
   ``update_rel_error``); ``NUM_STEPS_CURRENT_ROUND`` = samples trained, so FedAvg weights each site by
   the work it did. (``--exchange weights``: the trained tensors in bf16, params_type FULL.)

A failed round sends ``FLModel(params={})`` with the error in ``meta``: NVFlare skips empty results,
so the site is left out of that round's average instead of averaging stale weights in.  An empty
*received* model is fatal (every site failed and the server lost its model).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import math
import os
import time

import torch

from ..config import BackendConfig, DataConfig, ExchangeConfig, site_local_paths
from ..model.weights import WeightsError
from ..train.engine import RoundResult, RunConfig, SFTEngine, rank_and_world
from .exchange import SiteExchange

logger = logging.getLogger("qwen3vl_sft.client")


CLIENT_LOG = "qwen3vl_client.log"


def setup_logging() -> None:
    """Log to the console (NVFlare relays it) and to ``qwen3vl_client.log`` in the site's app folder.

    The console lines carry no timestamp on purpose: NVFlare prints a trainer's line that starts with a
    date straight to the terminal, and logs any other line into the site's log.txt, with its own
    timestamp, where job.py's console settings (the live view, or --verbose) decide whether it shows.
    """
    rank, _ = rank_and_world()
    stream = logging.StreamHandler()
    stream.setFormatter(logging.Formatter("%(name)s %(levelname)s: %(message)s"))
    handlers = [stream]
    if rank == 0:
        handlers.append(logging.FileHandler(CLIENT_LOG))
        handlers[-1].setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=handlers)


def init_process_group(world_size: int) -> None:
    """One process group per site (gloo on CPU, nccl on GPU); HF Trainer reuses it for DDP."""
    if world_size > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        torch.distributed.init_process_group(backend=backend)


def broadcast(obj, world_size: int):
    """rank 0's object on every rank (tensors travel pickled between our own processes only)."""
    if world_size == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def validate(model, processor, data: DataConfig) -> dict[str, float]:
    """Loss and accuracy of the received global model on the site's validation file (if any)."""
    if not data.eval_data_path:
        return {}
    from ..eval.evaluate import evaluate_file

    start = time.monotonic()
    scores = evaluate_file(model, processor, data, data.eval_data_path)
    metrics = {
        f"val_{k}": float(v) for k, v in scores.items() if isinstance(v, (int, float)) and math.isfinite(v)
    }
    metrics["val_seconds"] = time.monotonic() - start
    return metrics


def validate_weights(config: RunConfig, weights: dict[str, torch.Tensor]) -> dict[str, float]:
    """:func:`validate` of the base checkpoint with ``weights`` loaded, for a backend whose rounds run
    elsewhere (the official one); the model is freed before returning, so training gets the memory."""
    if not config.data.eval_data_path:
        return {}
    from ..model.modeling import load_model, load_processor
    from ..model.weights import load_exchanged

    model = load_model(config.model)
    try:
        load_exchanged(model, weights)
        if torch.cuda.is_available():
            model.to("cuda")
        processor = load_processor(
            config.model.model_name_or_path, config.data, config.model.trust_remote_code
        )
        return validate(model, processor, config.data)
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def check_site_paths(data: DataConfig) -> DataConfig:
    """``data`` as this site can use it; refuse to start when its training data does not exist here.

    Paths in the job config are absolute; a job exported or submitted elsewhere may still name
    folders this machine lacks. Every round would fail on them, so the site stops at start-up. A
    missing validation file only means no validation: job.py could not look on this machine for it.
    """
    from pathlib import Path

    from ..data.samples import resolve_image_root

    if not os.path.exists(data.data_path):
        raise FileNotFoundError(f"--data_path {data.data_path} does not exist on this site; copy the site's data "
                                "there or build the job with this site's paths")  # fmt: skip
    if data.eval_data_path and not os.path.exists(data.eval_data_path):
        logger.warning(
            "--eval_data_path %s does not exist on this site: no validation here", data.eval_data_path
        )
        data = dataclasses.replace(data, eval_data_path="")
    resolve_image_root(data, Path(data.data_path))  # --image_root or the manifest's: DataError naming it
    return data


def log_metrics(writer, metrics: dict[str, float], step: int) -> None:
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and math.isfinite(value):
            writer.add_scalar(key, value, global_step=step)


class SiteRunner:
    """Runs rounds for one site; only rank 0 holds the NVFlare connection."""

    def __init__(
        self,
        config: RunConfig,
        site: str,
        rank: int,
        backend: BackendConfig | None = None,
        exchange: ExchangeConfig | None = None,
    ):
        self.config, self.site, self.rank = config, site, rank
        self.backend = backend or BackendConfig()
        ex = exchange or ExchangeConfig()
        self.exchange = SiteExchange(ex.compression, ex.error_feedback, ex.exchange)
        self.engine: SFTEngine | None = None
        self.official = None
        self.progress = None  # fl.console's progress reporter (rank 0)

    def round(self, received: dict[str, torch.Tensor], current_round: int, total_rounds: int) -> RoundResult:
        if not received:
            raise WeightsError(
                f"{self.site} received an empty global model in round {current_round}: every site failed the "
                "previous round. Fix the sites (see their logs) and restart with --resume."
            )
        if self.backend.backend == "official":
            return self._official_round(received, current_round, total_rounds)
        if self.engine is None or not self.config.train.keep_model_between_rounds:
            self.engine = SFTEngine(self.config, callbacks=[self.progress] if self.progress else ())
        engine = self.engine
        engine.apply(received)  # before validating: val_* must score the received global model
        if self.progress:
            self.progress.start_round(current_round)
        val = validate(engine.model, engine.processor, self.config.data) if self.rank == 0 else {}
        result = engine.train_round(round_index=current_round, num_rounds=total_rounds)
        result.metrics.update(val)
        return result

    def _official_round(self, received, current_round: int, total_rounds: int) -> RoundResult:
        """The clone's train() does the round; the received global is scored first by our evaluator."""
        from ..train.official import from_config

        if self.official is None:
            self.official = from_config(self.config, self.backend, site=self.site)
        val = validate_weights(self.config, received)  # its memory is released before training starts
        result = self.official.train_round(received, round_index=current_round, num_rounds=total_rounds)
        result.metrics.update(val)
        return result


def run_site(
    config: RunConfig, backend: BackendConfig | None = None, exchange: ExchangeConfig | None = None
) -> None:
    """The client loop (numbered steps in the module docstring)."""
    import nvflare.client as flare
    from nvflare.client.tracking import SummaryWriter

    from .console import site_progress

    # $VAR and ~ in the job's paths are this site's (--env prod: the job was built on the admin's machine).
    backend = site_local_paths(backend) if backend else None
    # Before the handshake: a site that cannot start ends the job with this reason (fl.watch).
    data = check_site_paths(site_local_paths(config.data))
    config = dataclasses.replace(config, model=site_local_paths(config.model), data=data)
    rank, world_size = rank_and_world()
    init_process_group(world_size)
    flare.init(rank=str(rank))  # before the slow model load: NVFlare's launch timeout is running
    site = flare.get_site_name() if rank == 0 else f"rank-{rank}"
    runner = SiteRunner(config, site, rank, backend, exchange)
    writer = SummaryWriter() if rank == 0 else None
    runner.progress = site_progress(writer) if writer else None
    while True:
        running = broadcast(flare.is_running() if rank == 0 else None, world_size)
        if not running:
            break
        start = time.monotonic()
        model = flare.receive() if rank == 0 else None
        rounds = broadcast((model.current_round, (model.start_round or 0) + model.total_rounds) if rank == 0 else None,
                           world_size)  # fmt: skip
        current_round, total_rounds = rounds
        # A packet this site cannot rebuild the global from (WeightsError) ends it: nothing to train on.
        received, received_mib = (
            runner.exchange.receive(model.params, current_round) if rank == 0 else (None, 0.0)
        )
        received = broadcast(received, world_size)
        logger.info("%s round %s: received %.1f MiB", site, current_round, received_mib)
        try:
            result = runner.round(received, current_round, total_rounds)
        except WeightsError:
            raise  # an empty or mismatched global model: nothing sensible to train on
        except Exception as err:  # noqa: BLE001 - any failure (OOM, bad data) is reported, the federation goes on
            logger.error("Qwen SFT failed on %s in round %s: %s", site, current_round, err)
            if rank == 0:
                error = " ".join(f"{type(err).__name__}: {err}".split())  # one line in the server's report
                meta = {"error": error, "site": site, "round": current_round}
                flare.send(flare.FLModel(params={}, params_type="FULL", meta=meta))
            continue
        if rank == 0:
            params, params_type, sent = runner.exchange.send(result.weights, current_round, result.start)
            metrics = {**result.metrics, **sent, "received_mib": received_mib}
            metrics["overhead_seconds"] = (
                time.monotonic() - start - metrics["seconds"] - metrics.get("val_seconds", 0.0)
            )
            send_result(flare, writer, site, current_round, params, params_type, metrics)


def send_result(
    flare, writer, site: str, current_round: int, params, params_type: str, metrics: dict
) -> None:
    """Step 5: metrics to the tracker and the log, the coded update + metrics to the server."""
    from nvflare.app_common.abstract.fl_model import FLMetaKey

    log_metrics(writer, metrics, current_round)
    logger.info("%s round %s: %s", site, current_round, {k: round(v, 4) for k, v in metrics.items()})
    meta = {
        FLMetaKey.NUM_STEPS_CURRENT_ROUND: max(int(metrics["samples"]), 1),
        "site": site,
        "round": current_round,
    }
    flare.send(flare.FLModel(params=params, params_type=params_type, metrics=metrics, meta=meta))
