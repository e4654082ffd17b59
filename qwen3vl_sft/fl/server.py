"""Server side of the federated job: the lean global model and its persistor.

    python -m qwen3vl_sft.fl.server --model_name_or_path tiny_models/qwen3-vl-tiny

prints the global model the server would hold (tensor count, MiB) for a configuration.

:class:`GlobalModel` holds only the exchanged tensors (trainable, de-duplicated), read from the
base checkpoint's safetensors — the server never builds the 2B model. With ``--exchange update`` the
persistor hands FedAvg an fp32 master copy of them, to which each round's mean update is added.
:class:`GlobalModelPersistor` extends NVFlare's ``PTFileModelPersistor``: besides ``FL_global_model.pt`` it writes, every round and
atomically, ``global_model_hf/`` (an HF directory, or a PEFT adapter directory with LoRA) and keeps
``best_global_model_hf/`` (+ ``best_FL_global_model.pt``) for the model with the best site validation
score (``val_loss`` by default: it exists for every data set, long answers included).  Sites validate the global model they *receive*, so round r's score belongs to the model saved in
round r-1: the persistor promotes that one.  An empty aggregate (every site failed) is refused: the job
stops with the previous global model on disk instead of sending an empty model on.
:class:`SharedGlobalFedAvg` sends the global without NVFlare's per-task copy of it.
:class:`RoundMemoryRelease` frees each round's spent messages (a site's result once it is in FedAvg's sum,
the sent global once the aggregate replaces it, with full weights once every site has downloaded it),
applies the tensor disk offload on the simulator's job cell too, and has the server return large freed
buffers to the OS.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import os
import shutil
import threading
from pathlib import Path

import torch
from nvflare.apis.fl_component import FLComponent
from nvflare.app_common.workflows.fedavg import FedAvg

from ..config import ModelConfig, site_local_paths
from ..fileio import atomic_dir, atomic_path, atomic_write_json
from ..model.checkpoints import fl_record, initial_exchanged, write_hf_directory

logger = logging.getLogger(__name__)
LATEST_HF_DIR = "global_model_hf"
BEST_HF_DIR = "best_global_model_hf"
STATE_FILE = "fl_state.json"
RESUME_HINT = "fix the failing sites (see their logs) and continue with: python job.py --resume <same flags>"


class GlobalModel(torch.nn.Module):
    """The server's model: just the exchanged tensors, under their exchanged names."""

    def __init__(self, model_config: dict | None = None, seed: int = 0):
        super().__init__()
        # $VAR / ~ in the model path are the server's to expand (--env prod builds jobs elsewhere).
        self.model_config = site_local_paths(ModelConfig(**(model_config or {})))
        self._tensors = initial_exchanged(self.model_config, seed)

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:  # noqa: ARG002 - nn.Module signature
        return dict(self._tensors)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # noqa: ARG002
        self._tensors = dict(state_dict)


class SharedGlobalFedAvg(FedAvg):
    """NVFlare's FedAvg, sending the round's global to every site without a private copy of it.

    NVFlare 2.9's task dispatcher deep-copies a broadcast task's data before its first send, in case a
    callback changes it while sites download it, and keeps the copy until the task ends: one more whole
    message on the server through the round's downloads and uploads. Here nothing changes the sent global
    while the task runs: the per-site output filter (``GlobalEncoder``) builds a new Shareable, the
    aggregate goes into a dict of its own, and with ``--exchange update`` FedAvg adds the mean update
    into the global only after the task has ended. So the task's data is marked as its own broadcast copy.
    bench_real_exchange.py (1 site, 2 of 28 layers, bf16 weights): the server's peak went from 4.2-5.3x
    the message to 3.0-3.9x, in the simulator and in PoC.
    """

    def _prepare_task(self, *args, **kwargs):
        task = super()._prepare_task(*args, **kwargs)
        # The dispatcher (nvflare.apis.impl.wf_comm_server) copies only when this attribute is missing.
        task._broadcast_data = task.data
        return task


class RoundMemoryRelease(FLComponent):
    """Frees each round's tensors on the server as soon as nothing needs them any more.

    NVFlare 2.9 keeps two references it no longer needs, each to a whole message: the FLContext of the
    last submission holds that site's result after FedAvg's in-time aggregation has added it to the
    running sum, and the round's task holds the global it sent after FedAvg has replaced it with the
    aggregate. bench/bench_real_exchange.py counted the live tensors at each round's start: 3x the
    message from round 1 on, 1x with this component. Every holder shares one tensor dict, so emptying
    that dict in place, once NVFlare's own events say it is consumed, frees the tensors for all of them.

    With ``num_sites`` (full weights both ways only), the sent global goes as soon as every site has
    downloaded it, before the results come in: FedAvg then replaces it with the aggregate, and the
    persistor has it on disk. Otherwise the server holds the old global and the new sum at once, 2x the
    message. NVFlare has no event for a finished download; the download service calls the cell's
    ``DOWNLOAD_COMPLETE_CB`` with the objects each transaction served, which says whose tensors went.
    With ``--exchange update`` the sent dict is FedAvg's master, to which the mean update is added: it stays.
    """

    def __init__(self, num_sites: int = 0):
        super().__init__()
        self.num_sites = num_sites  # 0: keep the sent global until the aggregate replaces it
        self._sent: dict | None = None
        self._sent_ids: set[int] = set()
        self._downloads = 0
        self._lock = threading.Lock()  # download callbacks run on NVFlare's transfer threads

    def handle_event(self, event_type: str, fl_ctx) -> None:
        from nvflare.apis.dxo import from_shareable
        from nvflare.apis.event_type import EventType
        from nvflare.app_common.app_constant import AppConstants
        from nvflare.app_common.app_event_type import AppEventType

        if event_type == EventType.START_RUN:
            self.log_info(fl_ctx, f"large buffers go back to the OS when freed: {release_large_frees()}")
            if self.num_sites:
                self._watch_downloads(fl_ctx)
        elif event_type == AppEventType.BEFORE_TRAIN_TASK:  # one task (one global) per round, for every site
            self._new_task(from_shareable(fl_ctx.get_prop(AppConstants.TRAIN_SHAREABLE)).data)
            _offload_on_every_cell(fl_ctx.get_engine())
        elif event_type == AppEventType.AFTER_CONTRIBUTION_ACCEPT:
            result = fl_ctx.get_prop(AppConstants.TRAINING_RESULT)
            # Accepted means FedAvg's callback has added it to its sum (a copy): the result is spent.
            if result is not None and fl_ctx.get_prop(AppConstants.AGGREGATION_ACCEPTED):
                from_shareable(result).data.clear()
        elif event_type == AppEventType.AFTER_SHAREABLE_TO_LEARNABLE:
            self._replaced(fl_ctx)

    def _new_task(self, sent: dict) -> None:
        with self._lock:
            if sent is not self._sent:  # every site's task of a round carries the same dict
                self._sent, self._downloads = sent, 0
                self._sent_ids = {id(t) for t in sent.values() if torch.is_tensor(t)}

    def _replaced(self, fl_ctx) -> None:
        from nvflare.app_common.abstract.model import ModelLearnableKey
        from nvflare.app_common.app_constant import AppConstants

        learnable = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
        new_global = learnable.get(ModelLearnableKey.WEIGHTS) if learnable else None
        with self._lock:
            # With full weights the aggregate replaces the sent dict; with updates (DIFF) FedAvg adds
            # them into the sent dict itself, which then is the new global and stays.
            if self._sent is not None and self._sent is not new_global:
                self._sent.clear()
            self._sent, self._sent_ids = None, set()

    def _watch_downloads(self, fl_ctx) -> None:
        from nvflare.fuel.utils.fobs import FOBSContextKey

        for cell in _server_cells(fl_ctx.get_engine()):
            previous = cell.get_fobs_context().get(FOBSContextKey.DOWNLOAD_COMPLETE_CB)

            def on_done(tx_id, status, objects, *args, _previous=previous, **kwargs):
                if _previous is not None:  # someone else's callback keeps working
                    _previous(tx_id, status, objects, *args, **kwargs)
                self.download_done(status, objects)

            cell.update_fobs_context({FOBSContextKey.DOWNLOAD_COMPLETE_CB: on_done})

    def download_done(self, status: str, objects: list) -> None:
        """One download transaction ended; ``objects``: what it served (tensor dicts for tensors)."""
        from nvflare.fuel.f3.streaming.transfer_outcome import TransactionDoneStatus

        with self._lock:
            sent = self._sent
            if (
                not self.num_sites
                or status != TransactionDoneStatus.FINISHED
                or not sent
                or not any(self._holds_sent(o) for o in objects)
            ):
                return  # a failed or timed-out download may be retried: the global stays
            self._downloads += 1
            if self._downloads < self.num_sites:
                return
            count = len(sent)
            sent.clear()
        logger.info("every site (%d) has downloaded the global: its %d tensors are freed on the server "
                    "(the persistor has it on disk)", self.num_sites, count)  # fmt: skip

    def _holds_sent(self, obj) -> bool:
        return isinstance(obj, dict) and any(id(v) in self._sent_ids for v in obj.values())


def _server_cells(engine) -> list:
    """The server's cells that may serve this job's messages: NVFlare 2.9's simulator sends and receives a
    job's messages on the job cell it keeps as ``server.job_cell``, and sets the engine's cell (where
    FedAvg configures the tensor disk offload) to the parent; in PoC and production they are one."""
    run_manager = getattr(engine, "run_manager", None)
    candidates = [getattr(run_manager, "cell", None), engine.get_cell() if engine else None,
                  getattr(getattr(engine, "server", None), "job_cell", None)]  # fmt: skip
    cells = []
    for cell in candidates:
        if cell is not None and all(cell is not c for c in cells):
            cells.append(cell)
    return cells


def _offload_on_every_cell(engine) -> None:
    """Apply the tensor disk offload FedAvg set on the engine's cell to the job cell too (the simulator's
    results arrive there, see _server_cells), so the simulator offloads as PoC and production do."""
    from nvflare.app_common.utils import tensor_disk_offload_context as offload

    cells = _server_cells(engine)
    if len(cells) < 2:
        return
    source = cells[0].get_fobs_context()
    # The two keys are module constants of NVFlare's offload helper, which has no call for a second cell.
    props = {
        key: source.get(key)
        for key in (offload._ENABLE_TENSOR_DISK_OFFLOAD, offload._TENSOR_DISK_OFFLOAD_ROOT_DIR)
    }
    if props[offload._ENABLE_TENSOR_DISK_OFFLOAD]:
        for cell in cells[1:]:
            cell.update_fobs_context(props)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
MMAP_THRESHOLD_BYTES = 1 << 20


def release_large_frees() -> str:
    """Serve every allocation of 1 MiB or more with its own mmap, in this process, so that freeing it hands
    the memory straight back to the OS.

    glibc's default threshold adapts upward (to 32 MiB) after the first large free, after which the
    serialised copies of a message NVFlare makes on each send and receive come from the heap and stay
    in RSS until FedAvg's end-of-round malloc_trim: bench_real_exchange measured the server at ~2 GiB
    of retained buffers on top of the live tensors. A fixed threshold turns the adaption off. Only the
    server does this: training processes allocate many short-lived tensors, where mmap per allocation
    would cost page faults.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    except (OSError, AttributeError) as err:  # not glibc (macOS, musl): the allocator's default stays
        return f"not available here ({err})"
    return "yes (mmap for allocations >= 1 MiB)" if ok else "no (mallopt refused)"


def _persistor_base():
    from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor

    return PTFileModelPersistor


class GlobalModelPersistor(_persistor_base()):
    """PTFileModelPersistor that also writes HF directories and keeps the best model by site validation."""

    def __init__(
        self,
        model_config: dict,
        fp32_master: bool = True,
        min_sites: int = 1,
        model: dict | None = None,
        source_ckpt_file_full_name: str | None = None,
        key_metric: str = "val_loss",
        key_mode: str = "min",
    ):
        # Arguments are named, not **kwargs: NVFlare writes constructor arguments into the job config.
        # allow_numpy_conversion off: bf16 has no numpy dtype, and clients train on tensors anyway.
        super().__init__(
            model=model, source_ckpt_file_full_name=source_ckpt_file_full_name, allow_numpy_conversion=False
        )
        self.model_config = (
            model_config  # kept as given: NVFlare serialises constructor arguments into the job
        )
        ModelConfig(**model_config)  # a config this package can read, checked where the job is built
        self.fp32_master = fp32_master
        self.min_sites = min_sites
        self._refused = False
        self.key_metric, self.key_mode = key_metric, key_mode
        self.best_value: float | None = None
        self._round_metrics: dict | None = None

    @property
    def base_config(self) -> ModelConfig:
        """The model config with $VAR / ~ expanded here, on the server (the job may be built elsewhere)."""
        return site_local_paths(ModelConfig(**self.model_config))

    def load_model(self, fl_ctx):
        """The initial global model; then drop the GlobalModel's own copy of it (bench_server_memory:
        it was a whole extra model held for the job, 4x instead of 3x the exchanged bytes at the peak)."""
        from nvflare.app_common.abstract.model import ModelLearnableKey

        learnable = super().load_model(fl_ctx)
        if isinstance(self.model, GlobalModel):
            self.model.load_state_dict({})
        self._forget_saved_tensors()
        if self.fp32_master:  # FedAvg adds each round's mean update to these: fp32 keeps small ones
            weights = learnable[ModelLearnableKey.WEIGHTS]
            for name, tensor in weights.items():
                if torch.is_tensor(tensor) and tensor.is_floating_point():
                    weights[name] = tensor.float()
        return learnable

    def handle_event(self, event: str, fl_ctx) -> None:
        from nvflare.app_common.app_constant import AppConstants
        from nvflare.app_common.app_event_type import AppEventType

        if event == AppEventType.AFTER_AGGREGATION:
            result = fl_ctx.get_prop(AppConstants.AGGREGATION_RESULT)
            self._round_metrics = dict(result.metrics or {}) if result is not None else None
            self._log_contributions(fl_ctx)
            self._check_enough_sites(result, fl_ctx)
        elif event == AppEventType.GLOBAL_BEST_MODEL_AVAILABLE:
            return  # NVFlare would call the *new* model best; validation scored the previous one (see save_model)
        super().handle_event(event, fl_ctx)

    def _log_contributions(self, fl_ctx) -> None:
        """One line per round naming the sites averaged in and the sites left out (failed, died, sent
        nothing): NVFlare's own warning names a dead site but says "at round None"."""
        from nvflare.app_common.aggregators.weighted_aggregation_helper import AggregationStatsKey
        from nvflare.app_common.app_constant import AppConstants

        stats = fl_ctx.get_prop(AppConstants.AGGREGATION_STATS) or {}
        averaged = sorted(stats.get(AggregationStatsKey.CONTRIBUTORS) or [])
        engine = fl_ctx.get_engine()
        sites = sorted(client.name for client in engine.get_clients()) if engine else averaged
        left_out = [site for site in sites if site not in averaged]
        line = f"round {fl_ctx.get_prop(AppConstants.CURRENT_ROUND)}: averaged {len(averaged)} of {len(sites)} sites {averaged}"
        if left_out:
            self.log_warning(fl_ctx, f"{line}; left out (failed, died or sent no model): {left_out}; see "
                                     "<workspace>/<job>/<site>/log.txt and <site>/**/qwen3vl_client.log")  # fmt: skip
        else:
            self.log_info(fl_ctx, line)

    def _check_enough_sites(self, result, fl_ctx) -> None:
        aggregated = int((result.meta or {}).get("nr_aggregated", 0)) if result is not None else 0
        self._refused = 0 < aggregated < self.min_sites
        if self._refused:
            self.system_panic(
                f"only {aggregated} site(s) returned a model this round, fewer than --min_sites {self.min_sites}; "
                f"the job stops and keeps the last global model in {self.log_dir}; {RESUME_HINT}",
                fl_ctx,
            )

    def save_model(self, ml, fl_ctx) -> None:
        from nvflare.app_common.abstract.model import ModelLearnableKey
        from nvflare.app_common.app_constant import AppConstants

        weights = ml.get(ModelLearnableKey.WEIGHTS) or {}
        current_round = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        if self._refused:
            return  # too few sites this round (see _check_enough_sites): the last global model stays
        if not weights:
            self.system_panic(
                f"round {current_round}: every site failed, the aggregate is empty; the job stops and keeps the "
                f"last global model in {self.log_dir}; {RESUME_HINT}",
                fl_ctx,
            )
            return
        self._maybe_promote_previous(current_round)
        self._current_round = current_round
        super().save_model(ml, fl_ctx)
        tensors = {k: torch.as_tensor(v) for k, v in weights.items()}
        write_hf_directory(tensors, self.base_config, Path(self.log_dir) / LATEST_HF_DIR)
        del tensors
        self._forget_saved_tensors()
        atomic_write_json(Path(self.log_dir) / STATE_FILE, self._state(current_round))
        self.log_info(fl_ctx, f"Global model of round {current_round} saved to {self._ckpt_save_path} and "
                              f"{Path(self.log_dir) / LATEST_HF_DIR}")  # fmt: skip

    def _forget_saved_tensors(self) -> None:
        """Drop NVFlare's persistence manager's references to the model it last loaded or saved.

        PTFileModelPersistor keeps them (``var_dict``) only to write the next checkpoint, which save_model
        refills it for; held, they are one more whole model on the server for the whole job, and they keep
        the sent global alive after RoundMemoryRelease has let it go. Every save here writes a whole model
        (sites send every exchanged tensor), so nothing of an earlier one is needed."""
        if self.persistence_manager is not None:
            self.persistence_manager.var_dict.clear()

    def save_model_file(self, save_path: str) -> None:
        """NVFlare's checkpoint dict plus ``meta`` (base model, LoRA settings, round), which lets
        run_inference.py rebuild the model from the .pt alone; written atomically."""
        data = self.persistence_manager.to_persistence_dict()
        data["meta"] = self._file_meta()
        with atomic_path(save_path) as tmp:
            torch.save(data, tmp)

    def _file_meta(self) -> dict:
        record = fl_record(self.base_config)  # the same base and LoRA record as global_model_hf/ carries
        return {"base_model": record["base_model"], "base_model_id": record["base_model_id"], "lora": record["lora"],
                "round": getattr(self, "_current_round", None)}  # fmt: skip

    def _state(self, current_round) -> dict:
        return {
            "last_round": current_round,
            "metrics": self._round_metrics,
            "best_value": self.best_value,
            "key_metric": self.key_metric,
            "model_config": self.model_config,
        }

    def _maybe_promote_previous(self, current_round) -> None:
        """Round r's validation scored the model saved in round r-1 (still on disk): promote it if best."""
        value = (self._round_metrics or {}).get(self.key_metric)
        latest_dir = Path(self.log_dir) / LATEST_HF_DIR
        if value is None or not latest_dir.is_dir() or not os.path.isfile(self._ckpt_save_path):
            return
        better = self.best_value is None or (
            value > self.best_value if self.key_mode == "max" else value < self.best_value
        )
        if not better:
            return
        self.best_value = value
        with atomic_dir(Path(self.log_dir) / BEST_HF_DIR) as tmp_dir:
            shutil.copytree(latest_dir, tmp_dir, dirs_exist_ok=True)
        with atomic_path(self._best_ckpt_save_path) as tmp:
            shutil.copy2(self._ckpt_save_path, tmp)
        logger.info("Round %s: %s=%.4f is the best so far; model of round %s kept as best", current_round,
                    self.key_metric, value, int(current_round) - 1)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    from ..config import parse

    (model_config,) = parse(
        (ModelConfig,), argv, description="The server's global model for a configuration."
    )
    model = GlobalModel(model_config.__dict__)
    state = model.state_dict()
    size = sum(t.numel() * t.element_size() for t in state.values())
    print(json.dumps({"tensors": len(state), "MiB": round(size / 2**20, 2)}))


if __name__ == "__main__":
    main()
