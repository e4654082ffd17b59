"""Tests only: NVFlare server components that inject faults into, and record, a simulated job.

Added to a job by tests/test_faults.py and tests/test_fl_job.py with ``recipe.add_server_file(__file__)``;
never part of a user's job.

* :class:`RoundRecorder` (server input filter on ``train`` results): saves what each site sent per
  round (tensors + meta), or the return code of a failed result, so a test can recompute FedAvg and
  see which sites were left out. It accepts error results too (a filter that raises on them turns a
  site's EXECUTION_EXCEPTION into TASK_RESULT_FILTER_ERROR in the server log).
* :class:`DataOutage` (server output filter on ``train`` tasks): as round ``at_round``'s task goes
  out, renames a folder (the sites' image root) away, so every site fails that round while its
  process stays alive.
* :func:`standalone_persistor` / :func:`save_round`: the job's persistor outside a job, and, run as a
  script, a process that saves round 0 and is SIGKILLed while saving round 1::

      python tests/fault_hooks.py MODEL_DIR APP_DIR checkpoint|hf_dir
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys

import torch
from nvflare.apis.dxo import from_shareable
from nvflare.apis.filter import Filter


class RoundRecorder(Filter):
    def __init__(self, out_dir: str):
        super().__init__()
        self.out_dir = out_dir

    def process(self, shareable, fl_ctx):
        from nvflare.apis.shareable import ReturnCode
        from nvflare.app_common.app_constant import AppConstants
        from safetensors.torch import save_file

        site = fl_ctx.get_peer_context().get_identity_name()
        # results carry the round in a header; error results only in the controller's cookie
        current_round = shareable.get_header(
            AppConstants.CURRENT_ROUND, shareable.get_cookie("contribution_round")
        )
        stem = os.path.join(self.out_dir, f"round{current_round}-{site}")
        os.makedirs(self.out_dir, exist_ok=True)
        record = {"rc": shareable.get_return_code(ReturnCode.OK), "n_params": 0, "meta": {}}
        if record["rc"] == ReturnCode.OK:
            dxo = from_shareable(shareable)
            record["n_params"] = len(dxo.data or {})
            record["meta"] = {k: v for k, v in (dxo.meta or {}).items() if isinstance(v, (int, float, str))}
            # tensors, or NVFlare's references to the files its disk offload wrote
            record["arrived_as"] = sorted({type(v).__name__ for v in (dxo.data or {}).values()})
            if dxo.data:
                from qwen3vl_sft.fl.exchange import materialized

                data = materialized(dxo.data)  # an update the server decodes tensor by tensor
                save_file({k: v.contiguous() for k, v in data.items()}, stem + ".safetensors")
        with open(stem + ".json", "w") as f:
            json.dump(record, f)
        return shareable


class DataOutage(Filter):
    def __init__(self, folder: str, at_round: int):
        super().__init__()
        self.folder, self.at_round = folder, at_round

    def process(self, shareable, fl_ctx):
        from nvflare.app_common.app_constant import AppConstants

        if shareable.get_header(AppConstants.CURRENT_ROUND) == self.at_round and os.path.isdir(self.folder):
            os.rename(self.folder, self.folder + ".gone")
            self.log_warning(fl_ctx, f"fault injected: {self.folder} renamed away at round {self.at_round}")
        return shareable


# --------------------------------------------------------------------------- the persistor outside a job


def standalone_persistor(model_dir: str, app_dir: str, min_sites: int = 1):
    """(persistor, fl_ctx, initial tensors): the job's persistor started as NVFlare's server starts it."""
    from nvflare.apis.event_type import EventType
    from nvflare.apis.fl_constant import FLContextKey
    from nvflare.apis.fl_context import FLContext

    from qwen3vl_sft.fl.server import GlobalModelPersistor

    config = {"model_name_or_path": model_dir}
    model = {"path": "qwen3vl_sft.fl.server.GlobalModel", "args": {"model_config": config}}
    persistor = GlobalModelPersistor(model_config=config, min_sites=min_sites, model=model)
    fl_ctx = FLContext()
    fl_ctx.set_prop(FLContextKey.APP_ROOT, app_dir, private=True, sticky=True)
    persistor.handle_event(EventType.START_RUN, fl_ctx)
    initial = {k: torch.as_tensor(v) for k, v in persistor.load_model(fl_ctx)["weights"].items()}
    return persistor, fl_ctx, initial


def round_weights(initial: dict, current_round: int) -> dict:
    """The global model "of round r" in these tests: every initial tensor + r + 1."""
    return {k: v + (current_round + 1) for k, v in initial.items()}


def save_round(persistor, fl_ctx, initial: dict, current_round: int) -> None:
    from nvflare.app_common.abstract.model import make_model_learnable
    from nvflare.app_common.app_constant import AppConstants

    fl_ctx.set_prop(AppConstants.CURRENT_ROUND, current_round, private=True, sticky=False)
    weights = round_weights(initial, current_round)
    persistor.save_model(make_model_learnable(weights, {"current_round": current_round}), fl_ctx)


def die_halfway(data: bytes, path) -> None:
    """Write half of ``data`` to ``path``, durably, then SIGKILL this process: a crash mid-write."""
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)


def kill_during(where: str) -> None:
    """Make the next save die in FL_global_model.pt's torch.save ("checkpoint") or, after that file is
    in place, in the write of global_model_hf/'s shard ("hf_dir")."""
    if where == "checkpoint":
        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            buffer = io.BytesIO()
            real_save(obj, buffer)
            die_halfway(buffer.getvalue(), f)

        torch.save = save
    else:
        from safetensors.torch import save as to_bytes

        from qwen3vl_sft.model import checkpoints

        checkpoints.save_file = lambda tensors, path, metadata=None: die_halfway(
            to_bytes(tensors, metadata), path
        )


if __name__ == "__main__":
    model_dir, app_dir, where = sys.argv[1:4]
    persistor, fl_ctx, initial = standalone_persistor(model_dir, app_dir)
    save_round(persistor, fl_ctx, initial, 0)
    kill_during(where)
    save_round(persistor, fl_ctx, initial, 1)
    sys.exit("still alive: the fault was not injected")
