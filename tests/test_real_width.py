"""Full SFT at Qwen3-VL-2B's real width and 151,936 vocabulary: the exchanged names and sizes, one site
round and the server's HF export.

The model is ``tiny.build(..., "real-dims")`` cut to 2 of 28 decoder layers and 2 of 24 vision blocks
(random bf16 weights, 982 MB): every tensor keeps the 2B model's shape, at a memory a CI machine holds
(about 9 GB while training: fp32 master, gradients and AdamW state of 511 M trained parameters). The
expected message is written out below from the published architecture, not taken from weights.py.
"""

from __future__ import annotations

import ctypes
import gc

import pytest
import torch
from safetensors import safe_open

from qwen3vl_sft.config import DataConfig, ExchangeConfig, ModelConfig, TrainConfig
from qwen3vl_sft.fl.client import SiteRunner
from qwen3vl_sft.model import tiny
from qwen3vl_sft.model.checkpoints import initial_exchanged, write_hf_directory
from qwen3vl_sft.model.weights import exchanged_tensors, message_bytes, meta_model
from qwen3vl_sft.train.engine import RunConfig

HIDDEN, VOCAB, MLP, Q_OUT, KV_OUT, HEAD_DIM = 2048, 151936, 6144, 16 * 128, 8 * 128, 128
VISION_HIDDEN, MERGED = 1024, 1024 * 4  # 2x2 patches merged into one token before the mergers
FULL_SFT_2B_BYTES = 3_642_578_944  # bench_exchange.py's full-SFT row: 3473.8 MiB in bf16


def merger(prefix: str, norm_width: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.norm.weight": (norm_width,), f"{prefix}.norm.bias": (norm_width,),
            f"{prefix}.linear_fc1.weight": (MERGED, MERGED), f"{prefix}.linear_fc1.bias": (MERGED,),
            f"{prefix}.linear_fc2.weight": (HIDDEN, MERGED), f"{prefix}.linear_fc2.bias": (HIDDEN,)}  # fmt: skip


def decoder_layer(i: int) -> dict[str, tuple[int, ...]]:
    p = f"model.language_model.layers.{i}"
    return {f"{p}.self_attn.q_proj.weight": (Q_OUT, HIDDEN), f"{p}.self_attn.k_proj.weight": (KV_OUT, HIDDEN),
            f"{p}.self_attn.v_proj.weight": (KV_OUT, HIDDEN), f"{p}.self_attn.o_proj.weight": (HIDDEN, Q_OUT),
            f"{p}.self_attn.q_norm.weight": (HEAD_DIM,), f"{p}.self_attn.k_norm.weight": (HEAD_DIM,),
            f"{p}.mlp.gate_proj.weight": (MLP, HIDDEN), f"{p}.mlp.up_proj.weight": (MLP, HIDDEN),
            f"{p}.mlp.down_proj.weight": (HIDDEN, MLP), f"{p}.input_layernorm.weight": (HIDDEN,),
            f"{p}.post_attention_layernorm.weight": (HIDDEN,)}  # fmt: skip


def expected_full_sft(text_layers: int, deepstack_taps: int) -> dict[str, tuple[int, ...]]:
    """What full SFT with the recipe's tune flags sends: the mergers and the whole LLM, the tied lm_head
    once (as the embedding); never the frozen vision blocks, patch or position embeddings."""
    shapes = merger("model.visual.merger", VISION_HIDDEN)  # its norm comes before the 2x2 merge
    for i in range(deepstack_taps):
        shapes |= merger(f"model.visual.deepstack_merger_list.{i}", MERGED)  # theirs after it
    shapes["model.language_model.embed_tokens.weight"] = (VOCAB, HIDDEN)
    for i in range(text_layers):
        shapes |= decoder_layer(i)
    shapes["model.language_model.norm.weight"] = (HIDDEN,)
    return shapes


def bf16_bytes(shapes: dict[str, tuple[int, ...]]) -> int:
    return 2 * sum(torch.Size(s).numel() for s in shapes.values())


def shapes_of(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in tensors.items()}


def test_the_2b_full_sft_message_is_the_published_architecture_at_all_28_layers(tmp_path):
    tiny.qwen3vl_2b_config().save_pretrained(tmp_path)  # config only: the model is built on the meta device
    exchanged = exchanged_tensors(meta_model(ModelConfig(model_name_or_path=str(tmp_path))))

    expected = expected_full_sft(text_layers=28, deepstack_taps=3)
    assert shapes_of(exchanged) == expected
    assert len(expected) == 334 and bf16_bytes(expected) == message_bytes(exchanged) == FULL_SFT_2B_BYTES


@pytest.fixture(scope="module", autouse=True)
def hand_memory_back():
    """After this module, the ~9 GB its round held go back to the OS, not to the next tests' heap."""
    yield
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


@pytest.fixture(scope="module")
def real_width_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "qwen3-vl-2b-width-2-layers"
    return tiny.build(out, "real-dims", text_layers=2, vision_depth=2)


def base_tensors(model_dir, names) -> dict[str, torch.Tensor]:
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        return {name: f.get_tensor(name) for name in names}


@pytest.mark.slow
def test_full_sft_round_at_real_width_sends_the_exact_tensors_and_exports_a_loadable_hf_model(
    real_width_dir, realistic_shards, tmp_path
):
    from transformers import Qwen3VLForConditionalGeneration

    model_config = ModelConfig(model_name_or_path=str(real_width_dir))
    expected = expected_full_sft(text_layers=2, deepstack_taps=1)
    initial = initial_exchanged(model_config)  # what the server sends in round 0, read from the base files
    assert shapes_of(initial) == expected and {t.dtype for t in initial.values()} == {torch.bfloat16}

    site = realistic_shards / "site-1"
    config = RunConfig(
        model_config,
        DataConfig(data_path=str(site / "train.json"), eval_data_path=str(site / "val.json"),
                   dataloader_num_workers=0, val_max_new_tokens=4),  # generating at 151,936 tokens is slow
        TrainConfig(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=1,
                    learning_rate=1e-4, warmup_ratio=0.0, disable_progress_bar=True),  # step 1 at lr 1e-4
    )  # fmt: skip
    # bf16 weights both ways (--exchange weights): the message whose names and sizes bench_exchange counts
    runner = SiteRunner(config, "site-1", rank=0, exchange=ExchangeConfig(exchange="weights"))
    result = runner.round(initial, current_round=0, total_rounds=1)
    sent, params_type, metrics = runner.exchange.send(result.weights, 0, result.start)  # what client.py sends
    assert params_type == "FULL" and shapes_of(sent) == expected
    assert {t.dtype for t in sent.values()} == {torch.bfloat16}
    assert message_bytes(sent) == bf16_bytes(expected) == 924_386_304 == round(metrics["sent_mib"] * 2**20)
    changed = [name for name in expected if not torch.equal(sent[name], initial[name])]
    assert {"model.language_model.embed_tokens.weight", "model.visual.merger.linear_fc1.weight",
            "model.language_model.layers.1.mlp.down_proj.weight"} <= set(changed)  # fmt: skip
    assert result.metrics["val_loss"] > 0  # the received (random) model scored on the site's val.json
    del initial, result, runner
    gc.collect()

    hf_dir = write_hf_directory(sent, model_config, tmp_path / "global_hf")
    model = Qwen3VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.bfloat16)
    text = model.config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.vocab_size) == (HIDDEN, 2, VOCAB)
    state = model.state_dict()
    assert [name for name in expected if not torch.equal(state[name], sent[name])] == []
    frozen = [n for n in state if n.startswith("model.visual.blocks.") or n.startswith("model.visual.patch")]
    assert frozen and all(torch.equal(state[n], t) for n, t in base_tensors(real_width_dir, frozen).items())
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
