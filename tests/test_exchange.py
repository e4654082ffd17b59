"""The update exchange on literal tensors with NVFlare's own pieces: what each side holds, sends and
applies, and that small updates survive where bf16 weights lose them."""

from __future__ import annotations

import pytest
import torch
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.aggregators.weighted_aggregation_helper import WeightedAggregationHelper
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.utils.fl_model_utils import FLModelUtils

from qwen3vl_sft.fl.compression import Header, decode, encode, fidelity
from qwen3vl_sft.fl.exchange import GlobalEncoder, SiteExchange, UpdateDecoder
from qwen3vl_sft.model.weights import WeightsError

SHAPE = (128, 256)


def qwen_like(seed: int, scale: float = 0.02) -> dict[str, torch.Tensor]:
    """A 2-D weight like a Qwen3-VL projection (bf16-exact values) and a 1-D norm."""
    gen = torch.Generator().manual_seed(seed)
    return {"proj.weight": (torch.randn(SHAPE, generator=gen) * scale).bfloat16().float(),
            "norm.weight": torch.ones(SHAPE[1])}  # fmt: skip


def small_update(seed: int, size: float = 2e-5) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"proj.weight": torch.randn(SHAPE, generator=gen) * size, "norm.weight": torch.randn(SHAPE[1], generator=gen) * size}  # fmt: skip


def task_data(global_model: dict, current_round: int) -> Shareable:
    shareable = DXO(DataKind.WEIGHTS, data=global_model).to_shareable()
    shareable.set_header(AppConstants.CURRENT_ROUND, current_round)
    return shareable


def add(a: dict, b: dict) -> dict:
    return {n: a[n] + b[n] for n in a}


def test_error_feedback_carries_what_int8_lost_into_the_next_update():
    site = SiteExchange("int8", error_feedback=True)
    held = site.receive(encode(qwen_like(0), Header(kind="full", codec="none")), 0)[0]
    trained1, trained2 = add(held, small_update(1)), add(held, small_update(2))
    u1 = {n: trained1[n] - held[n] for n in held}  # the true updates, as fp32 computes them
    u2 = {n: trained2[n] - held[n] for n in held}
    first, kind, metrics = site.send(trained1, 0)
    applied1, header = decode(first)
    assert kind == "DIFF" and header.kind == "delta" and header.base_round == 0
    residual = site.residual
    assert all(torch.equal(residual[n], u1[n] - applied1[n]) for n in u1)
    assert float(residual["proj.weight"].abs().max()) > 0  # int8 lost something ...
    assert metrics["update_cosine"] > 0.999 and 0 < metrics["update_rel_error"] < 0.01
    second, _, _ = site.send(trained2, 1)
    applied2, _ = decode(second)
    # ... and the second packet codes u2 plus that residual, so over two rounds only the last residual is lost
    total_error = (applied1["proj.weight"] + applied2["proj.weight"]) - (
        u1["proj.weight"] + u2["proj.weight"]
    )
    torch.testing.assert_close(total_error, -site.residual["proj.weight"], atol=1e-10, rtol=0)

    plain = SiteExchange("int8", error_feedback=False)
    plain.receive(encode(qwen_like(0), Header(kind="full", codec="none")), 0)
    plain.send(trained1, 0)
    assert plain.residual == {}


def test_the_server_sends_weights_first_then_changes_and_sites_rebuild_exactly_what_it_tracks():
    encoder, site = GlobalEncoder("int8"), SiteExchange("int8")
    g0 = qwen_like(0)
    first = from_shareable(encoder.process(task_data(g0, 0), None)).data
    assert decode(first)[1].kind == "full" and decode(first)[1].codec == "bf16"
    held, _ = site.receive(first, 0)
    assert all(torch.equal(held[n], encoder.sites_hold[n]) for n in g0)
    g1 = add(g0, small_update(3, size=1e-3))
    request = task_data(g1, 1)
    for _ in range(2):  # one filter call per site; the input is never changed
        packet = from_shareable(encoder.process(request, None)).data
        assert torch.equal(from_shareable(request).data["proj.weight"], g1["proj.weight"])
    assert decode(packet)[1].kind == "delta" and decode(packet)[1].base_round == 0
    held, received_mib = site.receive(packet, 1)
    assert all(torch.equal(held[n], encoder.sites_hold[n]) for n in g0)
    assert received_mib < 0.6 * (g1["proj.weight"].numel() * 2) / 2**20  # int8: about half of bf16
    error1 = float((held["proj.weight"] - g1["proj.weight"]).abs().max())
    held, _ = site.receive(from_shareable(encoder.process(task_data(g1, 2), None)).data, 2)
    error2 = float((held["proj.weight"] - g1["proj.weight"]).abs().max())
    assert 0 < error2 < error1 / 50  # what int8 lost downstream arrives with the next delta


def test_a_site_that_missed_the_previous_global_refuses_the_change():
    encoder = GlobalEncoder("int8")
    encoder.process(task_data(qwen_like(0), 0), None)
    delta = from_shareable(encoder.process(task_data(qwen_like(1), 1), None)).data
    with pytest.raises(WeightsError, match="change to the global model of round 0, but this site holds none"):
        SiteExchange("int8").receive(delta, 1)
    late = SiteExchange("int8")
    late.receive(encode(qwen_like(0), Header(kind="full", codec="bf16", round=5)), 5)
    with pytest.raises(WeightsError, match="holds round 5's"):
        late.receive(delta, 6)


def aggregate(updates: dict[str, tuple[dict, int]], compression: str, g0: dict) -> dict[str, torch.Tensor]:
    """Sites' coded updates through the server's decoder, NVFlare's weighted mean and its FedAvg update."""
    helper = WeightedAggregationHelper()
    for name, (update, samples) in updates.items():
        site = SiteExchange(compression, error_feedback=False)
        held, _ = site.receive(encode(g0, Header(kind="full", codec="none")), 0)
        params, params_type, _ = site.send(add(held, update), 0)
        result = FLModelUtils.to_shareable(FLModel(params=params, params_type=params_type))
        dxo = from_shareable(UpdateDecoder().process(result, None))
        assert dxo.data_kind == DataKind.WEIGHT_DIFF
        # decoded only as NVFlare's helper adds each tensor up: no whole fp32 update on the server
        assert all(callable(getattr(v, "materialize", None)) for v in dxo.data.values())
        helper.add(dxo.data, weight=samples, contributor_name=name, contribution_round=0)
    mean = FLModel(params=helper.get_result(), params_type=ParamsType.DIFF)
    return FLModelUtils.update_model(FLModel(params=dict(g0), params_type=ParamsType.FULL), mean).params


def test_the_fp32_master_is_the_initial_global_plus_the_sample_weighted_mean_update():
    g0 = qwen_like(0)
    updates = {"site-1": (small_update(1), 30), "site-2": (small_update(2), 10)}
    master = aggregate(updates, "none", g0)
    for name in g0:
        mean = (updates["site-1"][0][name] * 30 + updates["site-2"][0][name] * 10) / 40
        assert master[name].dtype == torch.float32
        # exact to fp32 arithmetic on the weights themselves: two ulps of the largest one
        ulps = 2 * torch.finfo(torch.float32).eps * float(g0[name].abs().max())
        torch.testing.assert_close(master[name] - g0[name], mean, atol=ulps, rtol=0)


def test_small_updates_survive_the_update_exchange_but_not_bf16_weights():
    """The measurement the exchange was built for: N(0, 0.02) weights, updates of 2e-5 per element."""
    g0 = qwen_like(0)
    updates = {"site-1": (small_update(1), 1), "site-2": (small_update(2), 1)}
    true = {n: (updates["site-1"][0][n] + updates["site-2"][0][n]) / 2 for n in g0}
    update = updates["site-1"][0]["proj.weight"]
    sent_as_bf16_weights = (g0["proj.weight"] + update).bfloat16().float() - g0["proj.weight"]
    lost = fidelity({"w": sent_as_bf16_weights}, {"w": update})
    assert lost["update_rel_error"] > 0.7  # bf16 weights: most of the update is rounded away ...
    assert float((sent_as_bf16_weights == 0).float().mean()) > 0.7  # ... most elements' entirely (78 %)
    # none: fp32 arithmetic on 0.02 weights is exact to ~1e-4 of a 2e-5 update
    for codec, worst in {"none": 1e-4, "bf16": 0.01, "int8": 0.02, "nf4": 0.15}.items():
        master = aggregate(updates, codec, g0)
        applied = {"w": master["proj.weight"] - g0["proj.weight"]}
        kept = fidelity(applied, {"w": true["proj.weight"]})
        assert kept["update_rel_error"] < worst, codec
