"""Blockwise codecs on literal tensors: exact block scales, exact codes, packets and their byte counts."""

from __future__ import annotations

import pytest
import torch

from qwen3vl_sft.fl import compression as c


def test_int8_codes_and_block_scales_are_exact_on_a_literal_tensor():
    first = torch.tensor([-127.0, -1.0, 0.0, 1.0, *range(2, 62)])  # absmax 127: the codes are the values
    zeros = torch.zeros(64)
    doubled = 2 * first  # absmax 254: the same codes at twice the scale
    codes, absmax = c.quantize(torch.stack([first, zeros, doubled]), "int8")
    assert absmax.dtype == torch.float32 and absmax.tolist() == [127.0, 0.0, 254.0]
    assert codes.dtype == torch.int8 and codes[:64].tolist() == first.int().tolist()
    assert codes[64:128].tolist() == [0] * 64 and codes[128:].tolist() == first.int().tolist()
    restored = c.dequantize(codes, absmax, [3, 64], "int8")
    assert torch.equal(restored, torch.stack([first, zeros, doubled]))


def test_a_tensor_that_does_not_fill_its_last_block_is_padded_and_restored_to_its_shape():
    values = torch.arange(1.0, 101.0).view(4, 25)  # 100 elements: one full block, one of 36 + 28 zeros
    codes, absmax = c.quantize(values, "int8")
    assert codes.numel() == 128 and absmax.tolist() == [64.0, 100.0]
    restored = c.dequantize(codes, absmax, [4, 25], "int8")
    assert restored.shape == (4, 25)
    assert (restored - values).abs().max() <= 100.0 / 254 + 1e-5  # at most half a step of its block


def test_nf4_levels_are_qloras_and_round_trip_exactly_at_a_bf16_scale():
    levels = c.NF4_LEVELS
    assert levels.numel() == 16 and levels[0] == -1 and levels[15] == 1 and levels[7] == 0
    assert levels[1].item() == pytest.approx(-0.6962, abs=1e-4) and levels[14].item() == pytest.approx(
        0.7230, abs=1e-4
    )
    values = (levels.repeat(4) * 3.0).view(2, 32)  # every level, at scale 3 (exact in bf16)
    codes, absmax = c.quantize(values, "nf4")
    assert absmax.dtype == torch.bfloat16 and absmax.tolist() == [3.0]
    assert codes.dtype == torch.uint8 and codes.numel() == 32  # two 4-bit indices per byte
    assert codes[0].item() == 0 | (1 << 4) and codes[7].item() == 14 | (15 << 4)
    assert torch.equal(c.dequantize(codes, absmax, [2, 32], "nf4"), values)


def test_packet_codes_matrices_keeps_small_tensors_in_fp32_and_counts_its_bytes():
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "proj.weight": torch.randn(64, 128, generator=gen) * 1e-5,
        "norm.weight": torch.randn(64, generator=gen),
    }
    for codec, bytes_per_element in {"none": 4, "bf16": 2, "int8": 1 + 4 / 64, "nf4": 0.5 + 2 / 64}.items():
        packet = c.encode(tensors, c.Header(kind="delta", codec=codec, round=3, base_round=2))
        decoded, header = c.decode(packet)
        assert (header.kind, header.codec, header.round, header.base_round) == ("delta", codec, 3, 2)
        assert set(decoded) == set(tensors) and all(t.dtype == torch.float32 for t in decoded.values())
        quantized = codec in ("int8", "nf4")
        assert header.shapes == ({"proj.weight": [64, 128]} if quantized else {})
        assert (c.SCALE_SUFFIX.join(["proj.weight", ""]) in packet) == quantized
        raw = 2 if codec == "bf16" else 4
        assert (
            c.coded_bytes({n: tuple(t.shape) for n, t in tensors.items()}, codec)
            == 64 * 128 * bytes_per_element + 64 * raw
        )
        assert (
            c.packet_bytes(packet)
            == c.coded_bytes({n: tuple(t.shape) for n, t in tensors.items()}, codec)
            + packet[c.HEADER_KEY].numel()
        )
        assert torch.equal(decoded["norm.weight"], tensors["norm.weight"].to(c.raw_dtype(codec)).float())
        error = c.fidelity(decoded, tensors)["update_rel_error"]
        assert error <= {"none": 0.0, "bf16": 0.004, "int8": 0.01, "nf4": 0.12}[codec]


def test_a_packet_of_nvflares_disk_offload_references_decodes_as_the_packet(tmp_path):
    from nvflare.app_opt.pt.lazy_tensor_dict import LazyTensorDict
    from safetensors.torch import save_file

    tensors = {"proj.weight": torch.randn(64, 128, generator=torch.Generator().manual_seed(1)) * 1e-4,
               "norm.weight": torch.ones(64)}  # fmt: skip
    packet = c.encode(tensors, c.Header(kind="delta", codec="int8", round=1, base_round=0))
    save_file(packet, tmp_path / "received.safetensors")  # as the server's offload writes what arrives
    files = LazyTensorDict({k: (str(tmp_path / "received.safetensors"), k) for k in packet}, str(tmp_path))
    received = {k: files.make_lazy_ref(k) for k in packet}  # what FedAvg's server gets with the offload on
    assert not any(torch.is_tensor(v) for v in received.values())
    decoded, header = c.decode(received)
    assert header.shapes == {"proj.weight": [64, 128]}
    for name, tensor in c.decode(packet)[0].items():
        assert torch.equal(decoded[name], tensor)


def test_decoding_refuses_what_is_not_a_packet_and_unknown_codecs():
    with pytest.raises(c.PacketError, match=c.HEADER_KEY):
        c.decode({"w": torch.zeros(2)})
    with pytest.raises(c.PacketError, match="unknown codec 'fp8'"):
        c.encode({"w": torch.zeros(2)}, c.Header(kind="delta", codec="fp8"))
    packet = c.encode({"w": torch.ones(64, 64)}, c.Header(kind="delta", codec="int8"))
    del packet["w" + c.SCALE_SUFFIX]
    with pytest.raises(c.PacketError, match="w::absmax"):
        c.decode(packet)


def test_decoded_tensors_are_copies_so_adding_to_them_leaves_the_packet_alone():
    source = {"w": torch.ones(3)}
    packet = c.encode(source, c.Header(kind="full", codec="none"))
    decoded, _ = c.decode(packet)
    decoded["w"].add_(1.0)
    assert packet["w"].tolist() == [1.0, 1.0, 1.0] and source["w"].tolist() == [1.0, 1.0, 1.0]


def test_fidelity_of_literal_updates():
    true = {"a": torch.tensor([3.0, 4.0])}
    assert c.fidelity({"a": torch.tensor([3.0, 4.0])}, true) == {
        "update_cosine": 1.0,
        "update_rel_error": 0.0,
    }
    scores = c.fidelity({"a": torch.tensor([0.0, 4.0])}, true)
    assert scores["update_cosine"] == pytest.approx(0.8) and scores["update_rel_error"] == pytest.approx(0.6)
