"""fl.server: the server's global model holds only the exchanged tensors, read from the base checkpoint's
safetensors by name without building the model (the tiny model); RoundMemoryRelease on NVFlare's own
context, shareables and learnables, fired the events FedAvg fires in a round: the result and the
replaced global are emptied once spent, with full weights the global once every site has downloaded it
(the calls NVFlare's download service makes), nothing else; the persistor keeps no model between saves;
SharedGlobalFedAvg's task is its own broadcast copy, on the attribute NVFlare's dispatcher checks, and
job.py's recipe runs it. Fast."""

from __future__ import annotations

import dataclasses
import inspect
import json

import pytest
import torch
from fault_hooks import round_weights, save_round, standalone_persistor
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.fl_context import FLContext
from nvflare.apis.impl.wf_comm_server import WFCommServer
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.abstract.model import make_model_learnable
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.fuel.f3.streaming.transfer_outcome import TransactionDoneStatus
from safetensors.torch import load_file

from qwen3vl_sft.config import ModelConfig
from qwen3vl_sft.fl.server import GlobalModel, RoundMemoryRelease, SharedGlobalFedAvg
from qwen3vl_sft.model.weights import EXCHANGE_DTYPE, exchanged_names, meta_model


def shareable(tensors: dict):
    return DXO(data_kind=DataKind.WEIGHTS, data=tensors).to_shareable()


def weights():
    return {"w": torch.ones(3), "b": torch.zeros(2)}


def send(release: RoundMemoryRelease, ctx: FLContext, task_data) -> None:
    ctx.set_prop(AppConstants.TRAIN_SHAREABLE, task_data, private=True, sticky=False)
    release.handle_event(AppEventType.BEFORE_TRAIN_TASK, ctx)


def receive(release: RoundMemoryRelease, ctx: FLContext, result, accepted: bool) -> None:
    ctx.set_prop(AppConstants.TRAINING_RESULT, result, private=True, sticky=False)
    ctx.set_prop(AppConstants.AGGREGATION_ACCEPTED, accepted, private=True, sticky=False)
    release.handle_event(AppEventType.AFTER_CONTRIBUTION_ACCEPT, ctx)


def update_global(release: RoundMemoryRelease, ctx: FLContext, new_global: dict) -> None:
    ctx.set_prop(AppConstants.GLOBAL_MODEL, make_model_learnable(new_global, {}), private=True, sticky=True)
    release.handle_event(AppEventType.AFTER_SHAREABLE_TO_LEARNABLE, ctx)


def test_an_accepted_result_is_emptied_a_refused_one_is_left_alone():
    release, ctx = RoundMemoryRelease(), FLContext()
    accepted, refused = shareable(weights()), shareable(weights())
    receive(release, ctx, accepted, accepted=True)
    receive(release, ctx, refused, accepted=False)
    assert from_shareable(accepted).data == {}
    assert set(from_shareable(refused).data) == {"w", "b"}


def test_the_sent_global_is_emptied_once_the_aggregate_replaces_it():
    release, ctx = RoundMemoryRelease(), FLContext()
    sent = weights()
    send(release, ctx, shareable(sent))
    send(release, ctx, shareable(sent))  # each site's task carries the same global
    update_global(release, ctx, weights())  # full weights: a new dict
    assert sent == {}


def test_a_global_updated_in_place_stays():
    """With --exchange update FedAvg adds the mean update into the sent dict: that dict is the new global."""
    release, ctx = RoundMemoryRelease(), FLContext()
    sent = weights()
    send(release, ctx, shareable(sent))
    sent["w"] = sent["w"] + 1
    update_global(release, ctx, sent)
    assert torch.equal(sent["w"], torch.full((3,), 2.0)) and set(sent) == {"w", "b"}


def test_a_round_without_a_task_frees_nothing():
    release, ctx = RoundMemoryRelease(), FLContext()
    kept = weights()
    update_global(release, ctx, kept)  # e.g. the first save after a resume, before any task went out
    assert set(kept) == {"w", "b"}


def served(tensors: dict) -> dict:
    """What NVFlare's download service hands DOWNLOAD_COMPLETE_CB for one site's task: the tensor dict
    its TensorDownloadable served (a dict of its own, holding the same tensor objects)."""
    return dict(tensors)


def test_with_full_weights_the_sent_global_goes_once_every_site_has_downloaded_it():
    release, ctx = RoundMemoryRelease(num_sites=2), FLContext()
    sent = weights()
    send(release, ctx, shareable(sent))
    send(release, ctx, shareable(sent))  # the second site's task: same dict, the count goes on
    release.download_done(TransactionDoneStatus.FINISHED, [served(sent)])
    assert set(sent) == {"w", "b"}  # one site still downloading: it stays
    release.download_done(TransactionDoneStatus.TIMEOUT, [served(sent)])  # may be sent again
    release.download_done(TransactionDoneStatus.FINISHED, [served(weights())])  # someone else's tensors
    assert set(sent) == {"w", "b"}
    release.download_done(TransactionDoneStatus.FINISHED, [served(sent)])
    assert sent == {}
    update_global(release, ctx, weights())  # the aggregate replaces it as before: nothing more to do


def test_each_round_counts_its_own_downloads():
    release, ctx = RoundMemoryRelease(num_sites=2), FLContext()
    first = weights()
    send(release, ctx, shareable(first))
    release.download_done(TransactionDoneStatus.FINISHED, [served(first)])
    update_global(release, ctx, weights())
    second = weights()  # round 1: one download of round 0 does not count towards it
    send(release, ctx, shareable(second))
    release.download_done(TransactionDoneStatus.FINISHED, [served(second)])
    assert set(second) == {"w", "b"}
    release.download_done(TransactionDoneStatus.FINISHED, [served(second)])
    assert second == {}


def test_without_a_site_count_a_downloaded_global_stays():
    """--exchange update: the sent dict is FedAvg's master, to which the mean update is added."""
    release, ctx = RoundMemoryRelease(), FLContext()
    sent = weights()
    send(release, ctx, shareable(sent))
    release.download_done(TransactionDoneStatus.FINISHED, [served(sent)])
    assert set(sent) == {"w", "b"}


def test_the_persistor_holds_no_model_between_saves(tiny_model_dir, tmp_path):
    """NVFlare's persistence manager would keep the last saved model for the job: one more whole model,
    and the reason a freed global would not leave the server's memory."""
    persistor, fl_ctx, initial = standalone_persistor(str(tiny_model_dir), str(tmp_path))
    assert persistor.persistence_manager.var_dict == {}
    for current_round in (0, 1):
        save_round(persistor, fl_ctx, initial, current_round)
        assert persistor.persistence_manager.var_dict == {}
        saved = torch.load(persistor._ckpt_save_path, weights_only=True)
        assert saved["meta"]["round"] == current_round and sorted(saved["model"]) == sorted(initial)
        for name, tensor in saved["model"].items():
            assert torch.equal(tensor, round_weights(initial, current_round)[name]), name


def test_the_global_model_is_the_base_checkpoints_exchanged_tensors(tiny_model_dir):
    config = ModelConfig(model_name_or_path=str(tiny_model_dir))
    state = GlobalModel(dataclasses.asdict(config)).state_dict()
    assert sorted(state) == sorted(exchanged_names(meta_model(config)))
    base = {}
    for shard in tiny_model_dir.glob("*.safetensors"):
        base.update(load_file(shard))
    for name, tensor in state.items():
        assert tensor.dtype == EXCHANGE_DTYPE
        assert torch.equal(tensor, base[name].to(EXCHANGE_DTYPE)), name


def test_a_lora_global_model_starts_as_a_no_op_adapter(tiny_model_dir):
    config = ModelConfig(model_name_or_path=str(tiny_model_dir), lora=True, lora_r=4)
    model = GlobalModel(dataclasses.asdict(config))
    state = model.state_dict()
    assert all(t.abs().sum() == 0 for n, t in state.items() if ".lora_B." in n)  # B = 0: no change yet
    assert any(t.abs().sum() > 0 for n, t in state.items() if ".lora_A." in n)
    model.load_state_dict({"x": torch.ones(1)})
    assert list(model.state_dict()) == ["x"]  # what FedAvg hands back replaces the tensors


def test_the_broadcast_task_is_its_own_copy_on_the_attribute_nvflares_dispatcher_checks():
    controller = SharedGlobalFedAvg(num_clients=2, num_rounds=1)
    task = controller._prepare_task(data=FLModel(params=weights()), task_name="train", timeout=0,
                                    callback=lambda result: None)  # fmt: skip
    assert task._broadcast_data is task.data
    # NVFlare deep-copies a broadcast task's data unless this attribute exists, then sends what it holds:
    # if a new NVFlare renames it, this fails instead of the server quietly holding the copy again.
    dispatch = inspect.getsource(inspect.getmodule(WFCommServer))
    assert 'hasattr(task, "_broadcast_data")' in dispatch
    assert 'getattr(task, "_broadcast_data", task.data)' in dispatch


def test_job_recipes_run_the_shared_global_fedavg_with_the_recipes_settings(tiny_model_dir, shards, tmp_path):
    from sim_jobs import job_configs

    from qwen3vl_sft.fl import job as fl_job

    job, model, data, train = job_configs(tmp_path / "ws", tiny_model_dir, shards, num_sites=2, num_rounds=4)
    fl_job.build_recipe(job, model, data, train).export(str(tmp_path / "export"))
    (config,) = (tmp_path / "export").rglob("config_fed_server.json")
    (controller,) = [w for w in json.loads(config.read_text())["workflows"] if w["id"] == "controller"]
    assert controller["path"] == "qwen3vl_sft.fl.server.SharedGlobalFedAvg"  # what NVFlare instantiates
    args = controller["args"]
    assert (args["num_rounds"], args["num_clients"], args["ignore_result_error"]) == (4, 2, True)


@pytest.mark.parametrize("exchange, freed_after", [("weights", 2), ("update", 0)])
def test_the_job_frees_the_sent_global_after_downloads_only_with_full_weights(
    exchange, freed_after, tiny_model_dir, shards, tmp_path
):
    from sim_jobs import job_configs

    from qwen3vl_sft.config import ExchangeConfig
    from qwen3vl_sft.fl import job as fl_job

    job, model, data, train = job_configs(tmp_path / "ws", tiny_model_dir, shards, num_sites=2)
    recipe = fl_job.build_recipe(job, model, data, train, exchange=ExchangeConfig(exchange=exchange))
    recipe.export(str(tmp_path / "export"))
    (server,) = (tmp_path / "export").rglob("config_fed_server.json")
    server_config = json.loads(server.read_text())
    (release,) = [c for c in server_config["components"] if c["id"] == "round_memory_release"]
    assert release["path"] == "qwen3vl_sft.fl.server.RoundMemoryRelease"
    assert release["args"].get("num_sites", 0) == freed_after
