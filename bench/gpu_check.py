"""GPU check: Qwen3-VL-2B at real dims (random init, no download) on one GPU, figures to one JSON file.

    bash bench/gpu_check.sh                                   # on a lent H100/H200: <= 8 minutes
    .venv/bin/python bench/gpu_check.py --mode cpu --out gpu_check_cpu.json   # CPU fallback, tiny dims

``--mode gpu`` (``auto`` picks it when CUDA is present):

1. writes a checkpoint with Qwen3-VL-2B-Instruct's exact config (``tiny.qwen3vl_2b_config``,
   real 151,936 vocabulary, the qwen-ids tokenizer of ``qwen3vl_sft.model.tiny``), random weights, bf16;
2. full SFT (recipe tune flags) and LoRA (ModelConfig's defaults), ``--steps`` optimizer steps each on one
   synthetic sample of ``--seq_len`` tokens (default DataConfig.model_max_length) holding one 224x224
   image: loaded through ``modeling.load_model`` (bf16 on CUDA; flash_attention_2 when flash-attn is
   installed, else sdpa), torch AdamW, a plain loop (the product's Trainer runs in step 3).
   Reports tokens/s over the steps after ``--warmup`` steps, peak GPU memory (allocated and reserved)
   and MFU;
3. one federated round through ``job.py`` in NVFlare's simulator, 2 sites sharing GPU 0
   (``--gpu "[0],[0]"``) on synthetic PubMedVision-format data: wall time, rc, per-site metrics, the
   device's peak used memory (sampled), and the global model directory written.

MFU (PaLM's convention, Chowdhery et al. 2022, appendix B; recomputation not counted):
``FLOPs per token = 2*N_fwd + 2*N_fwd + 2*N_trainable_matmul + 12*L*H*Q*T``; ``N_fwd`` are the language
model's matmul weights (decoder linears + the lm_head, tied to the embedding, counted once: an embedding
lookup costs no FLOPs), forward 2 FLOPs per weight, backward 2 for the input gradient (needed through
every layer, also with LoRA) and 2 for the weight gradient of trained weights only. For full SFT this is
PaLM's 6N; for LoRA it is 4N + 6*N_lora. ``12*L*H*Q*T``: attention scores and values (L layers, H heads,
head dim Q, T tokens), forward and backward, causal mask not halved (PaLM). The frozen vision tower
(forward only, 196 patches of 8192 tokens) is left out. MFU = FLOPs per token x tokens/s / peak dense
bf16 FLOP/s of the GPU (:data:`PEAK_BF16_TFLOPS`, NVIDIA's data sheets, dense, no sparsity).

``--mode cpu``: the same three parts at the tiny dims of ``qwen3vl_sft.model.tiny`` (compact vocabulary), few
steps, so the script is known to work without a GPU; MFU is null (no peak is assumed for a CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run as a script from anywhere: the package lives at the repo root

import torch  # noqa: E402

from qwen3vl_sft.config import DataConfig, ModelConfig  # noqa: E402

GIB = 2**30
IMAGE_SIDE = 224  # DataConfig.max_pixels (50176) = 224 x 224: the recipe's largest image
# Dense bf16 tensor-core peak per GPU (NVIDIA data sheets, without sparsity), matched on the device name.
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100 SXM": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.4,
                    "GH200": 989.4, "H20": 148.0, "A100": 312.0, "B200": 2250.0, "L40S": 362.0}  # fmt: skip
CPU_DEFAULTS = {"steps": 3, "warmup": 1, "seq_len": 128, "fl_steps": 2, "fl_records": 60}
GPU_DEFAULTS = {"steps": 20, "warmup": 2, "seq_len": DataConfig.model_max_length, "fl_steps": 10,
                "fl_records": 200}  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["auto", "gpu", "cpu"], default="auto", help="auto: gpu if CUDA")
    parser.add_argument("--out", default="gpu_check.json", help="The JSON file the figures go to.")
    parser.add_argument("--work_dir", default="/tmp/qwen3vl_gpu_check", help="Checkpoint, data, workspace.")
    for name in ("steps", "warmup", "seq_len", "fl_steps", "fl_records"):
        parser.add_argument(f"--{name}", type=int, default=None, help="Default: per mode (see the module).")
    parser.add_argument("--skip_fl", action="store_true", help="Leave out the federated round.")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if args.mode == "gpu" and not cuda:
        parser.error("--mode gpu: no CUDA device is visible (use --mode cpu for the tiny fallback)")
    args.mode = ("gpu" if cuda else "cpu") if args.mode == "auto" else args.mode
    for name, value in (GPU_DEFAULTS if args.mode == "gpu" else CPU_DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.steps <= args.warmup or args.warmup < 0:
        parser.error(
            f"--steps {args.steps} must exceed --warmup {args.warmup} (>= 0): nothing would be timed"
        )
    if args.seq_len < 64:
        parser.error(f"--seq_len {args.seq_len} must be >= 64 (one image takes 51 tokens)")
    return args


def build_checkpoint(out: Path, mode: str) -> Path:
    """The model directory: real 2B dims + qwen-ids tokenizer (gpu), or the tiny compact one (cpu)."""
    from qwen3vl_sft.model import tiny

    # tiny.ensure: a rerun reuses the 4 GB checkpoint of the previous one
    if mode == "cpu":
        return tiny.ensure(out, "compact")
    tiny.ensure(out, "real-dims", image_size=IMAGE_SIDE, device="cuda")
    torch.cuda.empty_cache()
    return out


def synthetic_batch(config, seq_len: int, device) -> dict[str, torch.Tensor]:
    """One sample: a 224x224 image (its merged tokens framed by vision start/end), then random text."""
    vision = config.vision_config
    grid = IMAGE_SIDE // vision.patch_size
    image_tokens = grid * grid // vision.spatial_merge_size**2
    specials = (config.image_token_id, config.video_token_id, config.vision_start_token_id)
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(0, min(specials), (seq_len - image_tokens - 2,), generator=generator)
    head = (
        [config.vision_start_token_id] + [config.image_token_id] * image_tokens + [config.vision_end_token_id]
    )
    ids = torch.cat([torch.tensor(head), text]).unsqueeze(0)
    labels = ids.clone()
    labels[:, : len(head)] = -100
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    batch = {
        "input_ids": ids,
        "labels": labels,
        "attention_mask": torch.ones_like(ids),
        "mm_token_type_ids": (ids == config.image_token_id).long(),  # 1 = image, as the processor marks
        "pixel_values": torch.randn(grid * grid, patch_dim, generator=generator),
        "image_grid_thw": torch.tensor([[1, grid, grid]]),
    }
    return {k: v.to(device) for k, v in batch.items()}


def flop_counts(model, text_config) -> dict[str, int]:
    """Matmul weights of the language model (N_fwd), those whose weight gradient is computed, LoRA's."""
    counts = {"n_fwd": 0, "n_trained_matmul": 0, "n_lora": 0}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if ".lora_A." in name + "." or ".lora_B." in name + ".":
            counts["n_lora"] += module.weight.numel()
        elif "language_model." in name or name.endswith("lm_head"):
            counts["n_fwd"] += module.weight.numel()
            counts["n_trained_matmul"] += module.weight.numel() * module.weight.requires_grad
    counts["attn_per_token_per_T"] = (
        12 * text_config.num_hidden_layers * text_config.num_attention_heads * text_config.head_dim
    )
    return counts


def flops_per_token(counts: dict[str, int], seq_len: int) -> float:
    """PaLM-style training FLOPs per token (module docstring)."""
    dense = 4 * counts["n_fwd"] + 2 * counts["n_trained_matmul"] + 6 * counts["n_lora"]
    return float(dense + counts["attn_per_token_per_T"] * seq_len)


def peak_tflops(device_name: str) -> float | None:
    """The data-sheet peak of the first table entry found in the device name (longest names first)."""
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in device_name:
            return PEAK_BF16_TFLOPS[key]
    return None


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_steps(model, batch, steps: int, device) -> list[float]:
    """Optimizer steps on one batch (AdamW, clipping as TrainConfig); seconds of each step."""
    from qwen3vl_sft.config import TrainConfig

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=TrainConfig.learning_rate, weight_decay=TrainConfig.weight_decay)
    seconds = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, TrainConfig.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        seconds.append(time.perf_counter() - start)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"training loss is {loss.item()} after {steps} steps")
    return seconds


def train_case(model_dir: Path, lora: bool, args, device) -> dict:
    """One configuration (full SFT or LoRA): throughput, peak memory, MFU."""
    from qwen3vl_sft.model.modeling import checkpoint_config, count_parameters, load_model

    config = checkpoint_config(str(model_dir))
    model = load_model(ModelConfig(model_name_or_path=str(model_dir), lora=lora)).to(device).train()
    batch = synthetic_batch(config, args.seq_len, device)
    counts = flop_counts(model, config.text_config)
    trainable, total = count_parameters(model)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    seconds = run_steps(model, batch, args.steps, device)
    timed = seconds[args.warmup :]
    tokens_per_s = args.seq_len * len(timed) / sum(timed)
    per_token = flops_per_token(counts, args.seq_len)
    peak = peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    result = {
        "params_trainable": trainable, "params_total": total, **counts,
        "flops_per_token": per_token, "step_seconds": [round(s, 4) for s in seconds],
        "tokens_per_s": round(tokens_per_s, 1),
        "achieved_tflops": round(per_token * tokens_per_s / 1e12, 6),
        "mfu": round(per_token * tokens_per_s / (peak * 1e12), 4) if peak else None,
        "attention": model.config._attn_implementation, "dtype": str(next(model.parameters()).dtype),
    }  # fmt: skip
    result.update(memory_peaks(device))
    del model, batch
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def memory_peaks(device) -> dict:
    if device.type == "cuda":
        return {
            "peak_gpu_allocated_gib": round(torch.cuda.max_memory_allocated(device) / GIB, 3),
            "peak_gpu_reserved_gib": round(torch.cuda.max_memory_reserved(device) / GIB, 3),
        }
    # ru_maxrss is KiB on Linux and covers the whole process so far (both cases, the imports).
    return {"peak_process_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}


class DeviceMemorySampler(threading.Thread):
    """Peak used memory of GPU 0 over all processes (the 2 sites and the server), sampled every 0.5 s."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.done = 0, threading.Event()

    def run(self):
        while not self.done.wait(0.5):
            free, total = torch.cuda.mem_get_info(0)
            self.peak = max(self.peak, total - free)


def federated_data(work: Path, records: int) -> Path:
    """Synthetic PubMedVision-format records sharded over 2 sites (train + val each, a test.json)."""
    from qwen3vl_sft.config import PrepareDataConfig
    from qwen3vl_sft.data import synthetic
    from qwen3vl_sft.data.prepare import prepare_shards

    data_file = synthetic.ensure(work / "synth", synthetic.SyntheticSpec(num_records=records))
    out = work / "data"
    prepare_shards(PrepareDataConfig(data_file=str(data_file), output_dir=str(out), num_sites=2))
    return out


def job_command(model_dir: Path, data_dir: Path, work: Path, args) -> list[str]:
    """job.py flags: 1 round, 2 sites; on the GPU both on GPU 0; validation answers kept short."""
    cmd = [sys.executable, os.path.join(REPO, "job.py"), "--num_sites", "2", "--num_rounds", "1",
           "--max_steps", str(args.fl_steps), "--model_name_or_path", str(model_dir),
           "--data_dir", str(data_dir), "--workspace", str(work / "workspace"), "--job_name", "gpu-check",
           "--disable_progress_bar", "true", "--val_max_new_tokens", "16", "--logging_steps", "1"]  # fmt: skip
    if args.mode == "gpu":
        return cmd + ["--gpu", "[0],[0]"]
    return cmd + ["--per_device_train_batch_size", "2", "--dataloader_num_workers", "0"]


def federated_round(model_dir: Path, work: Path, args) -> dict:
    """One FedAvg round through job.py; what it printed goes to <work_dir>/federated_round.log."""
    from qwen3vl_sft.fl.summary import read_site_metrics

    cmd = job_command(model_dir, federated_data(work, args.fl_records), work, args)
    sampler = DeviceMemorySampler() if args.mode == "gpu" else None
    if sampler:
        sampler.start()
    start = time.monotonic()
    log = work / "federated_round.log"
    with open(log, "w") as out:
        rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO).returncode
    wall = time.monotonic() - start
    if sampler:
        sampler.done.set()
        sampler.join()
    text = log.read_text(errors="replace")
    found = re.search(r"^Job finished\. Results: (.+)$", text, re.MULTILINE)
    result_dir = Path(found.group(1)) if found else None
    result = {"rc": rc, "wall_s": round(wall, 1), "log": str(log), "command": cmd[1:],
              "largest_process_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 3),
              "device_peak_used_gib": round(sampler.peak / GIB, 3) if sampler else None}  # fmt: skip
    if rc != 0 or result_dir is None:
        lines = [line for line in text.splitlines() if line.strip()]
        result["error"] = lines[-1] if lines else f"job.py exited {rc} and printed nothing"
        return result
    result["sites"] = read_site_metrics(str(result_dir))
    result["server_files_mib"] = server_files(result_dir)
    return result


def server_files(result_dir: Path) -> dict[str, float]:
    """MiB on disk of what the persistor wrote (global and best models, HF directories and .pt files)."""
    sizes = {}
    for pattern in ("**/global_model_hf", "**/best_global_model_hf", "**/FL_global_model.pt",
                    "**/best_FL_global_model.pt"):  # fmt: skip
        for path in result_dir.glob(pattern):
            files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
            sizes[path.name] = round(sum(p.stat().st_size for p in files) / 2**20, 1)
    return sizes


def environment(mode: str, device) -> dict:
    import transformers

    from qwen3vl_sft.train.official_launch import flash_attn_available

    return {
        "mode": mode,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "peak_bf16_tflops": peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "flash_attn_installed": flash_attn_available(),
        "flop_formula": "per token: 4*n_fwd + 2*n_trained_matmul + 6*n_lora + attn_per_token_per_T*seq_len "
                        "(PaLM app. B; attn_per_token_per_T = 12*L*H*Q; causal mask not halved)",
    }  # fmt: skip


def write(path: Path, figures: dict) -> None:
    """Rewritten after every part, so a run cut short still leaves the parts it finished."""
    path.write_text(json.dumps(figures, indent=2) + "\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    device = torch.device("cuda" if args.mode == "gpu" else "cpu")
    work, out = Path(args.work_dir), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    figures = {**environment(args.mode, device), "seq_len": args.seq_len, "steps": args.steps,
               "warmup_steps_not_timed": args.warmup, "batch_size": 1}  # fmt: skip
    model_dir = build_checkpoint(
        work / f"qwen3-vl-{'2b-random' if args.mode == 'gpu' else 'tiny'}", args.mode
    )
    figures["model_dir"] = str(model_dir)
    for name, lora in (("full_sft", False), ("lora", True)):
        figures[name] = train_case(model_dir, lora, args, device)
        write(out, figures)
        print(f"{name}: {json.dumps({k: figures[name][k] for k in ('tokens_per_s', 'mfu')})}", flush=True)
    if not args.skip_fl:
        figures["federated_round"] = federated_round(model_dir, work, args)
    figures["wall_s"] = round(time.monotonic() - start, 1)
    write(out, figures)
    print(f"figures written to {out}")
    failed = figures.get("federated_round", {}).get("rc", 0) != 0
    if failed:
        print(f"error: the federated round failed: {figures['federated_round']['error']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
