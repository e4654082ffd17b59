"""Build an offline Qwen3-VL checkpoint (real transformers classes, random weights): tiny, or real-sized.

    python -m qwen3vl_sft.model.tiny --output tiny_models/qwen3-vl-tiny
    python -m qwen3vl_sft.model.tiny --output tiny_models/qwen3-vl-tiny-qwen-ids --variant qwen-ids
    python -m qwen3vl_sft.model.tiny --output models/qwen3-vl-2b-random --variant real-dims
    python -m qwen3vl_sft.model.tiny --output models/qwen3-vl-2b-2layers --variant real-dims --text_layers 2 \
        --vision_depth 2

The directory loads with ``AutoProcessor.from_pretrained(DIR)`` and
``Qwen3VLForConditionalGeneration.from_pretrained(DIR)`` with no network. Three variants:

* ``compact`` (default): a ~1k-token byte-level BPE vocabulary; fast on CPU.  Used by the tests and the
  CPU demo.
* ``qwen-ids``: a 151,936-entry vocabulary in which the special tokens, "assistant" (77091) and "\\n"
  (198) sit at the ids of the real Qwen3-VL tokenizer, with ``vocab.json``/``merges.txt`` for slow
  tokenizers, ``tokenizer_class: Qwen2Tokenizer`` and ``rope_scaling`` beside ``rope_parameters`` for
  transformers 4.57 — for code that hard-codes Qwen's ids: the model for offline runs of the official
  Qwen3-VL fine-tuning code (``--backend official``, in the environment built for it).
* ``real-dims``: Qwen3-VL-2B-Instruct's exact configuration (:func:`qwen3vl_2b_config`: width, heads,
  151,936 vocabulary, tied embeddings, vision tower, deepstack mergers) with the ``qwen-ids`` tokenizer,
  saved in bf16 as the real checkpoint is (4.3 GB at 28 layers). ``--text_layers`` / ``--vision_depth``
  cut the depth only, so names and tensor sizes stay those of the real model at a fraction of the memory.

Same seed, same bytes: the tokenizer is trained on a fixed corpus and the weights come from a seeded
initialisation, so two builds are byte-identical.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ..fileio import atomic_dir

TEXT_HIDDEN = 128
COMPACT_VOCAB = 1024
QWEN_VOCAB_SIZE = 151936
QWEN_ASSISTANT_ID = 77091
QWEN_NEWLINE_ID = 198
# The real Qwen tokenizer's special tokens, in id order from 151643 (<|endoftext|>).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip
QWEN_FIRST_SPECIAL_ID = 151643
# Qwen2/Qwen3 pre-tokenisation pattern (published with the tokenizer): splits words, digits one by one,
# punctuation runs and whitespace runs, so our BPE cuts text where the real one does.
QWEN_PRETOKENIZE_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

# Qwen3-VL's turn format: <|im_start|>role\n...<|im_end|>\n, images as vision_start/image_pad/vision_end.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' or 'image' in item -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'video' or 'video' in item -%}{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in item -%}{{- item['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def _tokenizer_corpus() -> list[str]:
    """Fixed text the BPE is trained on: chat scaffolding plus the synthetic data set's vocabulary."""
    from ..data.synthetic import vocabulary_sentences

    scaffold = ["system", "user", "assistant", "You are a helpful assistant.", "Picture 1:", "Image 2:"]
    return scaffold * 50 + vocabulary_sentences() * 5


def train_bpe(vocab_size: int):
    """Train a byte-level BPE with Qwen's pre-tokenisation on the fixed corpus (deterministic)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_tokenizer_corpus(), trainer)
    return tok


def gpt2_byte_order() -> list[str]:
    """The 256 byte-level symbols in the order GPT-2/Qwen give them ids 0..255 (so "\\n" gets 198)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    symbols = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + shift)
            shift += 1
    return [symbols[b] for b in printable] + [symbols[b] for b in range(256) if b not in printable]


def _qwen_id_vocab(trained: dict[str, int]) -> dict[str, int]:
    """Re-number a trained vocabulary so that bytes, "assistant" and specials sit at Qwen's ids."""
    vocab = {sym: i for i, sym in enumerate(gpt2_byte_order())}
    if "assistant" not in trained:
        raise RuntimeError("the tokenizer corpus must make 'assistant' a single token")
    vocab["assistant"] = QWEN_ASSISTANT_ID
    next_id = len(vocab) - 1
    for token in sorted(trained, key=trained.__getitem__):
        if token in vocab:
            continue
        next_id += 1
        next_id += next_id == QWEN_ASSISTANT_ID
        vocab[token] = next_id
    # Fillers keep ids dense up to the first special id, as in the real tokenizer; no merge reaches them.
    filler = 0
    taken = set(vocab.values())
    for i in range(QWEN_FIRST_SPECIAL_ID):
        if i not in taken:
            vocab[f"<|reserved_{filler}|>"] = i
            filler += 1
    return vocab


def build_tokenizer(variant: str):
    """A ``PreTrainedTokenizerFast`` with Qwen3-VL's special tokens (and ids, for ``qwen-ids``)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = train_bpe(COMPACT_VOCAB)
    if variant == "qwen-ids":
        spec = json.loads(tok.to_str())
        vocab = _qwen_id_vocab(spec["model"]["vocab"])
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["model"]["merges"]]
        rebuilt = Tokenizer(models.BPE(vocab=vocab, merges=merges))
        rebuilt.normalizer, rebuilt.pre_tokenizer, rebuilt.decoder = (
            tok.normalizer,
            tok.pre_tokenizer,
            tok.decoder,
        )
        tok = rebuilt
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=8192,
        clean_up_tokenization_spaces=False,
    )


def build_processor(tokenizer, image_size: int = 64):
    """Qwen3VLProcessor with patch 16 / merge 2 and pixel bounds suited to ``image_size`` images."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    bounds = {"shortest_edge": 32 * 32, "longest_edge": (2 * image_size) ** 2}
    common = dict(patch_size=16, merge_size=2, temporal_patch_size=2, size=bounds)
    common.update(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    image_processor = Qwen2VLImageProcessor(**common)
    video_processor = Qwen3VLVideoProcessor(**common)
    return Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def build_config(tokenizer, variant: str):
    """Qwen3VLConfig at toy size, wired to the tokenizer's special ids."""
    from transformers import Qwen3VLConfig

    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in _SPECIAL_FIELDS.items()}
    vocab_size = QWEN_VOCAB_SIZE if variant == "qwen-ids" else len(tokenizer)
    text = dict(
        vocab_size=vocab_size, hidden_size=TEXT_HIDDEN, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [8, 4, 4],
                         "mrope_interleaved": True},
        pad_token_id=ids["pad"], bos_token_id=ids["pad"], eos_token_id=ids["eos"], tie_word_embeddings=True,
    )  # fmt: skip
    vision = dict(
        depth=2, hidden_size=64, intermediate_size=128, num_heads=4, patch_size=16, spatial_merge_size=2,
        temporal_patch_size=2, out_hidden_size=TEXT_HIDDEN, num_position_embeddings=64,
        deepstack_visual_indexes=[0],
    )  # fmt: skip
    return Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["image"],
        video_token_id=ids["video"],
        vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"],
        tie_word_embeddings=True,
    )


_SPECIAL_FIELDS = {
    "pad": "<|endoftext|>",
    "eos": "<|im_end|>",
    "image": "<|image_pad|>",
    "video": "<|video_pad|>",
    "vision_start": "<|vision_start|>",
    "vision_end": "<|vision_end|>",
}


def _write_slow_tokenizer_files(tokenizer, out: Path) -> None:
    """vocab.json + merges.txt, as real Qwen checkpoints ship them for slow tokenizers."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, sort_keys=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def _name_qwen2_tokenizer(out: Path) -> None:
    """``tokenizer_class: Qwen2Tokenizer``, as real Qwen3-VL checkpoints say: transformers 4.57 (the
    official code's) has no class named after transformers 5's default ``TokenizersBackend``."""
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "Qwen2Tokenizer"
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _add_legacy_rope_scaling(out: Path) -> None:
    """transformers 4.57 reads ``rope_scaling``; 5.x writes ``rope_parameters``. Ship both."""
    path = out / "config.json"
    config = json.loads(path.read_text())
    rope = dict(config["text_config"]["rope_parameters"])
    config["text_config"]["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    config["text_config"]["rope_theta"] = rope["rope_theta"]
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def qwen3vl_2b_config(text_layers: int = 28, vision_depth: int = 24):
    """Qwen3VLConfig with Qwen3-VL-2B-Instruct's published dimensions and special-token ids; fewer text
    layers / vision blocks when asked (deepstack taps past a cut vision tower move to its last block)."""
    from transformers import Qwen3VLConfig

    text = dict(
        vocab_size=QWEN_VOCAB_SIZE, hidden_size=2048, intermediate_size=6144, num_hidden_layers=text_layers,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
        rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                         "mrope_interleaved": True},
        bos_token_id=151643, eos_token_id=151645, pad_token_id=151643, tie_word_embeddings=True,
    )  # fmt: skip
    deepstack = sorted({min(i, vision_depth - 1) for i in (5, 11, 17)})
    vision = dict(
        depth=vision_depth, hidden_size=1024, intermediate_size=4096, num_heads=16, patch_size=16,
        spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=2048, num_position_embeddings=2304,
        deepstack_visual_indexes=deepstack,
    )  # fmt: skip
    return Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=151655,
        video_token_id=151656,
        vision_start_token_id=151652,
        vision_end_token_id=151653,
        tie_word_embeddings=True,
    )


def check_token_ids(tokenizer, config) -> None:
    """The tokenizer must put the special tokens at the config's ids, or every image sample fails."""
    wanted = {"<|image_pad|>": config.image_token_id, "<|video_pad|>": config.video_token_id,
              "<|vision_start|>": config.vision_start_token_id, "<|vision_end|>": config.vision_end_token_id,
              "<|im_end|>": config.text_config.eos_token_id, "<|endoftext|>": config.text_config.pad_token_id}  # fmt: skip
    wrong = {tok: (tokenizer.convert_tokens_to_ids(tok), want) for tok, want in wanted.items()
             if tokenizer.convert_tokens_to_ids(tok) != want}  # fmt: skip
    if wrong:
        raise RuntimeError(
            f"qwen-ids tokenizer and the 2B config disagree (token: (tokenizer id, config id)): {wrong}"
        )


VARIANTS = ("compact", "qwen-ids", "real-dims")


def random_model(variant: str, tokenizer, seed: int, device: str, text_layers: int, vision_depth: int):
    """The randomly initialised model of ``variant`` (real-dims: bf16, built on ``device``)."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    if variant != "real-dims":
        return Qwen3VLForConditionalGeneration(build_config(tokenizer, variant)).eval()
    config = qwen3vl_2b_config(text_layers, vision_depth)
    check_token_ids(tokenizer, config)
    with torch.device(device):  # on a GPU, random init of 2B parameters takes seconds instead of minutes
        return Qwen3VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16).eval()


def bad_arguments(variant: str, text_layers: int, vision_depth: int) -> str:
    """Why these build arguments are refused, or ''."""
    if variant not in VARIANTS:
        return f"--variant must be one of {', '.join(VARIANTS)}, not {variant!r}"
    if text_layers < 1 or vision_depth < 1:
        return f"--text_layers and --vision_depth must be >= 1, got {text_layers}, {vision_depth}"
    return ""


def is_built(output: str | os.PathLike) -> bool:
    """Whether ``output`` holds a complete checkpoint (config and weights, one file or shards)."""
    out = Path(output)
    return (out / "config.json").is_file() and any(out.glob("*.safetensors"))


def build(
    output: str | os.PathLike,
    variant: str = "compact",
    seed: int = 0,
    *,
    image_size: int = 64,
    device: str = "cpu",
    text_layers: int = 28,
    vision_depth: int = 24,
) -> Path:
    """Write the checkpoint to ``output`` (atomically: a temp dir renamed into place). ``device``,
    ``text_layers`` and ``vision_depth`` apply to ``real-dims``; ``image_size`` sets the processor's
    pixel bounds."""
    problem = bad_arguments(variant, text_layers, vision_depth)
    if problem:
        raise ValueError(problem)
    out = Path(output)
    with atomic_dir(out) as tmp_dir:
        tmp = Path(tmp_dir)
        tokenizer = build_tokenizer("compact" if variant == "compact" else "qwen-ids")
        model = random_model(variant, tokenizer, seed, device, text_layers, vision_depth)
        model.generation_config.pad_token_id = model.config.text_config.pad_token_id
        model.generation_config.eos_token_id = model.config.text_config.eos_token_id
        model.save_pretrained(tmp)
        del model
        build_processor(tokenizer, image_size).save_pretrained(tmp)
        if variant != "compact":
            _write_slow_tokenizer_files(tokenizer, tmp)
            _name_qwen2_tokenizer(tmp)
            _add_legacy_rope_scaling(tmp)
    return out


def ensure(output: str | os.PathLike, variant: str = "compact", **build_args) -> Path:
    """Build the checkpoint unless a complete one is already at ``output`` (``build_args``: see :func:`build`)."""
    return Path(output) if is_built(output) else build(output, variant, **build_args)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="Directory to write the checkpoint to.")
    parser.add_argument("--variant", choices=VARIANTS, default="compact")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random weights.")
    parser.add_argument("--text_layers", type=int, default=28, help="real-dims: decoder layers (2B: 28).")
    parser.add_argument("--vision_depth", type=int, default=24, help="real-dims: vision blocks (2B: 24).")
    args = parser.parse_args(argv)
    problem = bad_arguments(args.variant, args.text_layers, args.vision_depth)
    if problem:
        parser.error(problem)
    out = build(
        args.output, args.variant, args.seed, text_layers=args.text_layers, vision_depth=args.vision_depth
    )
    print(f"Qwen3-VL ({args.variant}) with random weights written to {out}")


if __name__ == "__main__":
    main()
