"""Bytes per federated message at Qwen3-VL-2B-Instruct's dimensions, counted on the meta device.

    .venv/bin/python bench/bench_exchange.py

No hub access is needed: the script writes only a ``config.json`` with Qwen3-VL-2B-Instruct's
dimensions (text hidden 2048, 28 layers, 16 / 8 heads, head_dim 128, MLP 6144, vocab 151936, tied
embeddings; vision depth 24, hidden 1024, MLP 4096, out 2048, deepstack [5, 11, 17]) into a temp dir,
and counts, through the package's own ``weights.meta_model`` / ``exchanged_tensors`` /
``message_bytes`` (bf16), what one message carries for:

* the full ``state_dict()``: what NVFlare's own Qwen3-VL example sends;
* our full-SFT exchange (recipe tune flags: vision frozen, merger + LLM trained, tied lm_head once);
* ``tune_mm_llm False`` (only the mergers train);
* LoRA r 64 / alpha 128 on q/k/v/o (adapters only).

Targets: full SFT at most 3473.8 MiB (NVFlare's example: 4651.4 MiB), LoRA r 64 at most 98 MB.

A second table counts one coded update per ``--compression`` mode (``compression.coded_bytes``: codes,
block scales and the fp32 tensors too small to quantise, exactly), against NVFlare's state dict.
Goals: int8 at most 0.40x, nf4 at most 0.21x.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run as a script from anywhere: the package lives at the repo root

MIB, MB = 2**20, 10**6
TARGET_FULL_MIB = 3473.8
NVFLARE_EXAMPLE_MIB = 4651.4
TARGET_LORA_MB = 98.0


def write_config_dir(out: Path) -> Path:
    """A checkpoint directory holding only config.json (what meta_model needs; no weights)."""
    from qwen3vl_sft.model.tiny import qwen3vl_2b_config

    qwen3vl_2b_config().save_pretrained(out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json"], "config-only dir expected"
    return out


def measure(model_dir: Path) -> list[tuple[str, int, int]]:
    """(case, tensor count, bf16 bytes) for every configuration of the message."""
    from qwen3vl_sft.config import ModelConfig
    from qwen3vl_sft.model.weights import exchanged_tensors, message_bytes, meta_model

    path = str(model_dir)
    full_sft = meta_model(ModelConfig(model_name_or_path=path))
    cases = [("state_dict (NVFlare example)", full_sft.state_dict())]
    cases.append(("full SFT (recipe flags)", exchanged_tensors(full_sft)))
    mergers = meta_model(ModelConfig(model_name_or_path=path, tune_mm_llm=False))
    cases.append(("tune_mm_llm False", exchanged_tensors(mergers)))
    lora = meta_model(ModelConfig(model_name_or_path=path, lora=True, lora_r=64, lora_alpha=128))
    cases.append(("LoRA r64 a128 q/k/v/o", exchanged_tensors(lora)))
    sanity_checks(full_sft, dict(cases))
    return [(name, len(state), message_bytes(state)) for name, state in cases]


def sanity_checks(model, states: dict) -> None:
    """Guards against measuring the wrong thing (untied lm_head, materialised weights, frozen vision)."""
    full = states["full SFT (recipe flags)"]
    assert all(t.device.type == "meta" for t in full.values()), "weights must stay on the meta device"
    assert "lm_head.weight" not in full, "tied lm_head must be exchanged once, as the embedding"
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight, "lm_head not tied"
    vision = [n for n in full if n.startswith("model.visual.") and ".merger" not in n]
    vision = [n for n in vision if "deepstack_merger_list" not in n]
    assert not vision, f"frozen vision tower exchanged: {vision[:3]}"
    lora = states["LoRA r64 a128 q/k/v/o"]
    assert all(".lora_A." in n or ".lora_B." in n for n in lora), "LoRA message must hold adapters only"


def print_table(rows: list[tuple[str, int, int]]) -> None:
    print(f"{'message (bf16)':<30} {'tensors':>8} {'bytes':>14} {'MiB':>10} {'MB':>10}")
    for name, count, size in rows:
        print(f"{name:<30} {count:>8} {size:>14,} {size / MIB:>10.1f} {size / MB:>10.1f}")
    by_name = {name: size for name, _, size in rows}
    full = by_name["full SFT (recipe flags)"] / MIB
    lora = by_name["LoRA r64 a128 q/k/v/o"] / MB
    print(
        f"\nfull SFT {full:.1f} MiB (target <= {TARGET_FULL_MIB}; NVFlare example {NVFLARE_EXAMPLE_MIB}): "
        f"{'met' if round(full, 1) <= TARGET_FULL_MIB else 'MISSED'}, "
        f"{100 * (1 - full / (by_name['state_dict (NVFlare example)'] / MIB)):.1f} % smaller than state_dict"
    )
    print(
        f"LoRA r64 {lora:.1f} MB (target <= {TARGET_LORA_MB}): {'met' if lora <= TARGET_LORA_MB else 'MISSED'}"
    )


def compression_rows(model_dir: Path) -> list[tuple[str, str, int]]:
    """(case, codec, exact bytes incl. block scales) of one coded update, per --compression mode."""
    from qwen3vl_sft.config import ModelConfig
    from qwen3vl_sft.fl.compression import CODECS, coded_bytes
    from qwen3vl_sft.model.weights import exchanged_tensors, meta_model

    rows = []
    for case, model_config in {
        "full SFT": ModelConfig(model_name_or_path=str(model_dir)),
        "LoRA r64": ModelConfig(model_name_or_path=str(model_dir), lora=True, lora_r=64, lora_alpha=128),
    }.items():
        shapes = {name: tuple(t.shape) for name, t in exchanged_tensors(meta_model(model_config)).items()}
        rows += [(case, codec, coded_bytes(shapes, codec)) for codec in CODECS]
    return rows


def print_compression(rows: list[tuple[str, str, int]], state_dict_bytes: int) -> None:
    """One row per mode, with its ratio to NVFlare's state dict (the goals: int8 <= 0.40x, nf4 <= 0.21x)."""
    goals = {"int8": 0.40, "nf4": 0.21}
    print(f"\n{'update (--compression)':<24} {'MiB':>10} {'x state_dict':>13} {'goal':>12}")
    for case, codec, size in rows:
        ratio = size / state_dict_bytes
        goal = goals.get(codec) if case == "full SFT" else None
        verdict = f"<= {goal:.2f} {'met' if ratio <= goal else 'MISSED'}" if goal else ""
        print(f"{case + ' ' + codec:<24} {size / MIB:>10.1f} {ratio:>13.3f} {verdict:>12}")


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_config_dir(Path(tmp) / "qwen3-vl-2b-config-only")
        rows = measure(model_dir)
        print_table(rows)
        print_compression(compression_rows(model_dir), rows[0][2])
    return 0


if __name__ == "__main__":
    sys.exit(main())
