"""Memory arithmetic for Qwen3-VL-2B: per-GPU training memory, the server's RAM, disk per round.

    .venv/bin/python bench/memory_budget.py                       # Qwen3-VL-2B-Instruct's exact config
    .venv/bin/python bench/memory_budget.py --model_name_or_path DIR --tokens 4096 --json out.json

Every parameter count comes from the meta-device model (``weights.meta_model``, as bench_exchange.py
counts messages: no weights, no download); sizes in bytes follow from the dtypes the meta model holds
(bf16, as ``--dtype auto`` loads on CUDA; PEFT keeps LoRA adapters in fp32) and from the rules below.
Defaults (tokens, tune flags, LoRA rank and targets, sites) come from qwen3vl_sft.config.

GPU, one sample of ``--tokens`` tokens (batch 1), one GPU, no sharding:

* states: weights + gradients of trained weights + AdamW's two moments (torch keeps them in the
  parameter's dtype). Two regimes for full SFT: ``bf16 weights`` (what ``--dtype auto`` trains on CUDA
  here: 2+2+4 bytes per trained parameter) and ``fp32 master`` (trained weights in fp32 with bf16
  compute copies, as under torch autocast, whose cast of each weight lives until backward: 4+2+4+8).
* activations per decoder layer and token (bf16 unless said): what autograd keeps for backward in
  HF's Qwen3-VL text layer, counted after Korthikanti et al. 2022 ("Reducing Activation Recomputation
  in Large Transformer Models", sec. 4.1) for this layer: no dropout (attention_dropout 0), flash/SDPA
  attention (no T x T score matrix), GQA, q/k RMSNorm, SwiGLU MLP:
  ``2*(2h + 3*a*d + 3*kv*d)`` attention (norm in/out, q and k before and after their norm, v, output)
  ``+ 2*(2h + 4*i)`` MLP (norm in/out, gate, up, silu(gate), their product)
  ``+ 4*(2h + a*d + kv*d)`` fp32 copies (HF's RMSNorm upcasts its input to fp32 and keeps it).
* gradient checkpointing (HF's, per decoder layer): each layer's input (2h) is kept, and one layer's
  activations are rebuilt at a time during backward.
* loss head, per token: bf16 logits (2V) + fp32 log-softmax the loss keeps (4V) + the fp32 gradients
  in and out of log-softmax at the start of backward (8V): 14V, with or without checkpointing.
* LoRA: the same activations (the gradient must reach the first layer's adapters, so every layer keeps
  what its backward needs; an upper bound) plus, per wrapped module and token, PEFT's dropout output and
  mask (3 bytes x in_features) and the fp32 rank-r product (4r).
* left out: the frozen vision tower (no grad: nothing kept), the merger over one image's tokens,
  CUDA context and allocator slack (measure with bench/gpu_check.py).

Server RAM with the update exchange (the default; docs/exchange.md): the fp32 master global, the fp32
copy of what the sites hold (the base of the next delta), FedAvg's fp32 running sum of updates (in-time
aggregation) and one site's int8 packet, decoded one tensor at a time as it is added: 3 fp32 copies of
the exchanged tensors plus one packet, whatever the sites. With ``--exchange weights`` one message is the exchanged
tensors in bf16; the server holds the global until every site has downloaded it, and FedAvg's running sum,
while results stream to disk and are added a tensor at a time (the disk offload): 2 messages at most, 1 when
every site has the global before the first result arrives. Without the offload each result arriving while
another is added is one message more. Measured: bench/bench_real_exchange.py (NVFlare's own transfers, plus
the serialisation of the largest tensor in flight, which this count leaves out).

Disk per round (the persistor, overwritten each round): ``global_model_hf/`` (the full model: base
shards with the global tensors swapped in, in the base checkpoint's dtype: bf16 for Qwen3-VL; LoRA: the adapters) +
``FL_global_model.pt`` (the exchanged tensors: the fp32 master) + the same two again as ``best_*`` once validation
picks a best model; an atomic write holds the old and new copy of one file or directory at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run as a script from anywhere: the package lives at the repo root
sys.path.insert(0, os.path.join(REPO, "bench"))  # bench_exchange's exact 2B config

from qwen3vl_sft.config import DataConfig, JobConfig, ModelConfig  # noqa: E402

GIB, MIB = 2**30, 2**20
BF16, FP32 = 2, 4


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_name_or_path", default="", help="Config dir (default: exact 2B config).")
    parser.add_argument("--tokens", type=int, default=DataConfig.model_max_length, help="Tokens per sample.")
    parser.add_argument("--sites", type=int, default=JobConfig.num_sites, help="Sites sending results.")
    parser.add_argument("--json", default="", help="Also write the figures to this JSON file.")
    args = parser.parse_args(argv)
    if args.tokens < 1:
        parser.error(f"--tokens must be >= 1, got {args.tokens}")
    if args.sites < 1:
        parser.error(f"--sites must be >= 1, got {args.sites}")
    if args.model_name_or_path and not (Path(args.model_name_or_path) / "config.json").is_file():
        parser.error(f"--model_name_or_path {args.model_name_or_path}: no config.json there")
    return args


def meta_models(model_dir: str) -> dict:
    """The full-SFT (recipe tune flags) and LoRA (ModelConfig's defaults) models on the meta device."""
    from qwen3vl_sft.model.weights import meta_model

    return {
        "full": meta_model(ModelConfig(model_name_or_path=model_dir)),
        "lora": meta_model(ModelConfig(model_name_or_path=model_dir, lora=True)),
    }


def parameter_stats(model) -> dict[str, int]:
    """Counts and bytes as the meta model holds them; parameters() yields the tied lm_head once."""
    params = list(model.parameters())
    trained = [p for p in params if p.requires_grad]
    return {
        "total": sum(p.numel() for p in params),
        "trained": sum(p.numel() for p in trained),
        "frozen": sum(p.numel() for p in params if not p.requires_grad),
        "weight_bytes": sum(p.numel() * p.element_size() for p in params),
        "trained_bytes": sum(p.numel() * p.element_size() for p in trained),
    }


def state_bytes(stats: dict[str, int], fp32_master: bool = False) -> dict[str, int]:
    """Weights, gradients and AdamW moments (module docstring: the two regimes)."""
    if fp32_master:
        return {
            "weights": stats["frozen"] * BF16 + stats["trained"] * FP32,
            "bf16 compute copies": stats["trained"] * BF16,
            "gradients": stats["trained"] * FP32,
            "AdamW moments": 2 * stats["trained"] * FP32,
        }
    return {
        "weights": stats["weight_bytes"],
        "gradients": stats["trained_bytes"],
        "AdamW moments": 2 * stats["trained_bytes"],  # torch's AdamW: exp_avg, exp_avg_sq like the param
    }


def text_dims(config) -> dict[str, int]:
    text = config.text_config
    return {"h": text.hidden_size, "ad": text.num_attention_heads * text.head_dim,
            "kvd": text.num_key_value_heads * text.head_dim, "i": text.intermediate_size,
            "L": text.num_hidden_layers, "V": text.vocab_size}  # fmt: skip


def layer_bytes_per_token(dims: dict[str, int], lora_r: int = 0, lora_targets: tuple[str, ...] = ()) -> int:
    """Bytes autograd keeps per token in one decoder layer (module docstring; per tensor below).

    Full SFT (lora_r 0): each RMSNorm keeps its fp32 input (4n) and its bf16 normalised value for the
    weight's gradient (2n); a trained linear keeps its input; q/k/v after RoPE and the attention output
    are kept by the attention kernel. LoRA: frozen weights need no input kept, norms keep only the fp32
    input, and each wrapped module keeps PEFT's fp32 dropout output + its bool mask (5 x in) and the fp32
    rank-r product (4r).
    """
    h, ad, kvd, i = dims["h"], dims["ad"], dims["kvd"], dims["i"]
    if not lora_r:
        norms = 2 * (FP32 * h + BF16 * h + BF16 * h)  # input and post-attention norm: fp32 in, bf16 y, out
        q = FP32 * ad + BF16 * ad + BF16 * ad + BF16 * ad  # q_norm fp32 in + y, after RoPE, attention out
        kv = FP32 * kvd + BF16 * kvd + BF16 * kvd + BF16 * kvd  # k_norm fp32 in + y, after RoPE; v
        mlp = 4 * BF16 * i  # gate, up, silu(gate), their product (down_proj's input)
        return norms + q + kv + mlp
    norms = 2 * FP32 * h
    q = FP32 * ad + BF16 * ad + BF16 * ad  # q_norm fp32 in, after RoPE, attention out
    kv = FP32 * kvd + BF16 * kvd + BF16 * kvd
    mlp = 3 * BF16 * i  # gate (silu's input), up and silu(gate) (the product's inputs); down_proj frozen
    in_features = {"q_proj": h, "k_proj": h, "v_proj": h, "o_proj": ad, "gate_proj": h, "up_proj": h,
                   "down_proj": i}  # fmt: skip
    unknown = sorted(set(lora_targets) - set(in_features))
    if unknown:
        raise ValueError(f"--lora_target_modules: no activation rule for {unknown}")
    adapters = sum((FP32 + 1) * in_features[t] + FP32 * lora_r for t in lora_targets)
    return norms + q + kv + mlp + adapters


def head_bytes_per_token(dims: dict[str, int], trained_head: bool) -> int:
    """Final norm + lm_head input, and the loss: bf16 logits, fp32 log-softmax, its two fp32 gradients."""
    h, vocab = dims["h"], dims["V"]
    norm = FP32 * h + (2 * BF16 * h if trained_head else 0)  # y and lm_head's input when the head trains
    return norm + (BF16 + FP32 + 2 * FP32) * vocab


def activation_bytes(dims: dict[str, int], tokens: int, layer: int, head: int, checkpointing: bool) -> dict:
    """Decoder layers (all kept, or layer inputs + one layer rebuilt) and the loss head, for ``tokens``."""
    layers = dims["L"] * layer if not checkpointing else dims["L"] * BF16 * dims["h"] + layer
    return {"activations (decoder layers)": layers * tokens, "activations (loss head)": head * tokens}


def gpu_budgets(models: dict, dims: dict[str, int], tokens: int) -> dict[str, dict[str, int]]:
    """Per-GPU bytes by part for full SFT (both regimes) and LoRA, with and without checkpointing."""
    lora_cfg = ModelConfig()
    cases = {
        "full SFT, bf16 weights": (models["full"], False, 0),
        "full SFT, fp32 master": (models["full"], True, 0),
        f"LoRA r{lora_cfg.lora_r} {'/'.join(lora_cfg.lora_targets())}": (
            models["lora"],
            False,
            lora_cfg.lora_r,
        ),
    }
    budgets = {}
    for name, (model, fp32_master, rank) in cases.items():
        states = state_bytes(parameter_stats(model), fp32_master)
        layer = layer_bytes_per_token(dims, rank, tuple(lora_cfg.lora_targets()) if rank else ())
        head = head_bytes_per_token(dims, trained_head=not rank)
        for checkpointing in (False, True):
            parts = {**states, **activation_bytes(dims, tokens, layer, head, checkpointing)}
            parts["total"] = sum(parts.values())
            budgets[f"{name}, {'with' if checkpointing else 'no'} grad. checkpointing"] = parts
    return budgets


def checkpoint_element_size(config) -> int:
    """Bytes per element of the base checkpoint's tensors (its config's ``dtype``, not the meta model's,
    which is built in bf16; unset: bf16, as Qwen3-VL-2B-Instruct ships)."""
    import torch

    dtype = getattr(config, "dtype", None) or getattr(config.text_config, "dtype", None) or torch.bfloat16
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    return torch.empty((), dtype=dtype).element_size()


def server_and_disk(models: dict, sites: int, base_element_size: int) -> dict[str, dict[str, int]]:
    """Message sizes, the server's RAM (in-time vs held results) and disk per round (module docstring)."""
    import torch

    from qwen3vl_sft.fl.compression import coded_bytes
    from qwen3vl_sft.model.weights import exchanged_tensors, message_bytes

    out = {}
    for kind, model in models.items():
        sent = exchanged_tensors(model)
        shapes = {name: tuple(t.shape) for name, t in sent.items()}
        message, master = message_bytes(sent), message_bytes(sent, torch.float32)
        int8 = coded_bytes(shapes, "int8")
        full_model = parameter_stats(models["full"])["total"] * base_element_size
        hf_dir = full_model if kind == "full" else message
        out[kind] = {
            "message (bf16)": message,
            "message (fp32)": master,
            "message: int8 update (the default)": int8,
            "message: nf4 update": coded_bytes(shapes, "nf4"),
            "server RAM, update exchange (3 fp32 copies + packet)": 3 * master + int8,
            "server RAM, --exchange weights (global + running sum)": 2 * message,
            "server RAM, --exchange weights, all downloaded first": message,
            f"server RAM, --exchange weights, no offload, {sites} results": (2 + sites) * message,
            "disk: global_model_hf/": hf_dir,
            "disk: FL_global_model.pt (fp32 master)": master,
            "disk per round, latest only": hf_dir + master,
            "disk per round, latest + best_*": 2 * (hf_dir + master),
            "disk peak while writing (+ one atomic copy)": 2 * (hf_dir + master) + max(hf_dir, master),
        }
    return out


def print_table(title: str, rows: dict[str, int]) -> None:
    print(f"\n{title}")
    for name, size in rows.items():
        print(f"  {name:<52} {size / GIB:>9.2f} GiB {size / MIB:>11.1f} MiB")


def print_report(figures: dict) -> None:
    p = figures["parameters"]
    print(f"model: {figures['model']}; {figures['tokens']} tokens per sample, batch 1, one GPU")
    for kind, stats in p.items():
        print(f"  {kind:<5} parameters: {stats['total']:,} total, {stats['trained']:,} trained, "
              f"{stats['frozen']:,} frozen (meta device)")  # fmt: skip
    d = figures["dims"]
    print(f"  text dims: h {d['h']}, q heads x head_dim {d['ad']}, kv {d['kvd']}, MLP {d['i']}, "
          f"{d['L']} layers, vocab {d['V']}; activation bytes per token: layer {figures['layer_bytes']['full']:,} "
          f"(LoRA {figures['layer_bytes']['lora']:,}), loss head {figures['head_bytes']['full']:,}")  # fmt: skip
    for name, parts in figures["gpu"].items():
        print_table(f"GPU memory: {name}", parts)
    for kind, rows in figures["server_and_disk"].items():
        print_table(f"Server and disk ({kind})", rows)


def budget(model_dir: str, tokens: int, sites: int, label: str) -> dict:
    """Every figure, from the meta-device models of ``model_dir``."""
    from qwen3vl_sft.model.modeling import checkpoint_config

    models = meta_models(model_dir)
    dims = text_dims(models["full"].config)
    rank = ModelConfig().lora_r
    return {
        "model": label, "tokens": tokens, "sites": sites, "dims": dims,
        "parameters": {kind: parameter_stats(m) for kind, m in models.items()},
        "layer_bytes": {"full": layer_bytes_per_token(dims),
                        "lora": layer_bytes_per_token(dims, rank, tuple(ModelConfig().lora_targets()))},
        "head_bytes": {"full": head_bytes_per_token(dims, True), "lora": head_bytes_per_token(dims, False)},
        "gpu": gpu_budgets(models, dims, tokens),
        "server_and_disk": server_and_disk(models, sites, checkpoint_element_size(checkpoint_config(model_dir))),
    }  # fmt: skip


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, label = args.model_name_or_path, args.model_name_or_path
        if not model_dir:
            from bench_exchange import write_config_dir

            model_dir = str(write_config_dir(Path(tmp) / "qwen3-vl-2b-config-only"))
            label = "Qwen3-VL-2B-Instruct config (tiny.qwen3vl_2b_config)"
        figures = budget(model_dir, args.tokens, args.sites, label)
    print_report(figures)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
