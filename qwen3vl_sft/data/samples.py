"""PubMedVision records -> Qwen3-VL training tensors (messages, labels, pixels) and batches.

    python -m qwen3vl_sft.data.samples --model tiny_models/qwen3-vl-tiny --data data/site-1/train.json --show 2

The path is one-way: record -> chat messages (images in the order of their ``<image>`` placeholders)
-> ``input_ids`` / ``labels`` (-100 everywhere but the assistant answers and their ``<|im_end|>``)
/ ``pixel_values`` / ``image_grid_thw`` -> padded batch.  Every token id is read from the processor;
nothing is hard-coded, so the real Qwen3-VL tokenizer and the tiny offline one behave the same.

Images are opened lazily inside DataLoader workers, under one rule shared by every path that opens
them (training samples, evaluation prompts, run_inference): :meth:`SampleBuilder.load_images`. A
defective image (missing, not a regular file, 0 bytes, not an image, over --max_image_side or
--max_image_pixels or beyond the processor's 200:1 aspect ratio -- all three read from the header,
before decoding --, a decompression bomb, truncated or corrupt, outside the image root) makes its
record a :class:`SkipSample` of kind "image" with a one-line reason naming the record and the file.
The collator counts skips so the trainer can report them and abort when too many fail; evaluation
drops the same records for every checkpoint and counts them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import stat
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ..config import DataConfig
from ..errors import DataError
from . import records as rec
from .json_scan import load_records

logger = logging.getLogger(__name__)
IGNORE_INDEX = -100
ROLES = {"human": "user", "gpt": "assistant"}


class SkipSample(Exception):
    """A sample that cannot be trained on (reason in the message); it is counted, never trained.

    ``kind`` is "image" (missing/corrupt image: counts toward max_bad_sample_fraction) or "no_answer"
    (nothing left to supervise after truncation).
    """

    def __init__(self, message: str, kind: str = "image"):
        super().__init__(message)
        self.kind = kind


def to_messages(record: dict, system_prompt: str = "") -> list[dict]:
    """Chat messages for a record; ``<image>`` placeholders become image items, in order."""
    record = rec.ensure_image_placeholders(record)
    messages = (
        [{"role": "system", "content": [{"type": "text", "text": system_prompt}]}] if system_prompt else []
    )
    for turn in record["conversations"]:
        role = ROLES.get(turn["from"], turn["from"])
        content = []
        for i, piece in enumerate(turn["value"].split(rec.PLACEHOLDER)):
            if i:
                content.append({"type": "image"})
            text = piece.strip("\n") if role == "user" else piece.strip()
            if text:
                content.append({"type": "text", "text": text})
        messages.append({"role": role, "content": content})
    return messages


def count_images(messages: list[dict]) -> int:
    return sum(item["type"] == "image" for m in messages for item in m["content"])


# transformers' Qwen2-VL/Qwen3-VL ``smart_resize`` raises ValueError beyond this width:height ratio (either
# way); it handles any small side (a 1x1 image is upscaled), so the aspect ratio is its only image limit.
QWEN_MAX_ASPECT_RATIO = 200
# PIL decoders raise all of these for damaged files (a truncated PNG: SyntaxError or zlib.error, a cut
# JPEG: OSError, a bad header field: struct.error or ValueError ...).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error)


class ImageDefect(DataError):
    """An image file the shared image rule refuses (message: the file and why, one line)."""


def _refusal_from_header(size: tuple[int, int], config: DataConfig) -> str | None:
    """Why an image of ``size`` pixels is refused before decoding, or None."""
    width, height = size
    if max(width, height) > config.max_image_side:
        return f"{width}x{height} pixels exceeds max_image_side {config.max_image_side}"
    if width * height > config.max_image_pixels:
        return f"{width}x{height} = {width * height:,} pixels exceeds max_image_pixels {config.max_image_pixels:,}"
    if min(width, height) < 1 or max(width, height) / min(width, height) > QWEN_MAX_ASPECT_RATIO:
        return (
            f"{width}x{height} pixels: aspect ratio beyond the {QWEN_MAX_ASPECT_RATIO}:1 "
            "the Qwen3-VL image processor accepts"
        )
    return None


def open_image(path: str | os.PathLike, config: DataConfig) -> Image.Image:
    """Decode an image as RGB under the shared image rule, or raise :class:`ImageDefect` naming the file.

    Refused: missing, not a regular file (a FIFO would block the reader), 0 bytes, not an image, over
    ``max_image_side`` / ``max_image_pixels`` or beyond the processor's aspect ratio (all read from the
    header, before any pixel is decoded), a PIL decompression bomb, truncated or corrupt pixel data.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ImageDefect(f"{path}: does not exist") from None
    except OSError as err:  # e.g. a folder on the way without permission
        raise ImageDefect(f"{path}: cannot be read ({err.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise ImageDefect(f"{path}: is not a regular file")
    if info.st_size == 0:
        raise ImageDefect(f"{path}: is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            # PIL only warns between 89 M and 179 M pixels; our max_image_pixels decides instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)  # reads the header only
    except Image.DecompressionBombError as err:
        raise ImageDefect(f"{path}: {err}") from None
    except DECODE_ERRORS as err:
        raise ImageDefect(f"{path}: not an image PIL can read ({_one_line(err)})") from None
    with image:
        refusal = _refusal_from_header(image.size, config)
        if refusal:
            raise ImageDefect(f"{path}: {refusal}")
        try:
            image.load()
            return image.convert("RGB")
        except DECODE_ERRORS as err:
            raise ImageDefect(f"{path}: truncated or corrupt image data ({_one_line(err)})") from None


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


@dataclass(frozen=True)
class TokenIds:
    """The few token ids masking and truncation need, read from the processor."""

    im_start: int
    im_end: int
    assistant_header: tuple[int, ...]
    vision_start: int
    vision_end: int
    image_pad: int
    pad: int

    @classmethod
    def from_processor(cls, processor) -> TokenIds:
        tok = processor.tokenizer
        im_start = tok.convert_tokens_to_ids("<|im_start|>")
        header = tuple(tok.encode("<|im_start|>assistant\n", add_special_tokens=False))
        if not header or header[0] != im_start:
            raise ValueError("tokenizer does not encode '<|im_start|>assistant\\n' as a Qwen chat header")
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.convert_tokens_to_ids("<|endoftext|>")
        return cls(
            im_start=im_start,
            im_end=tok.convert_tokens_to_ids("<|im_end|>"),
            assistant_header=header,
            vision_start=processor.vision_start_token_id,
            vision_end=processor.vision_end_token_id,
            image_pad=processor.image_token_id,
            pad=pad,
        )


def mask_labels(input_ids: list[int], ids: TokenIds) -> list[int]:
    """Labels that supervise only assistant answers: from after the header to ``<|im_end|>`` inclusive."""
    labels = [IGNORE_INDEX] * len(input_ids)
    header, n = ids.assistant_header, len(ids.assistant_header)
    i = 0
    while i < len(input_ids):
        if tuple(input_ids[i : i + n]) != header:
            i += 1
            continue
        j = i + n
        while j < len(input_ids) and input_ids[j] != ids.im_end:
            labels[j] = input_ids[j]
            j += 1
        if j < len(input_ids):
            labels[j] = input_ids[j]
        i = j + 1
    return labels


def truncation_point(input_ids: list[int], max_length: int, ids: TokenIds) -> int:
    """Where to cut a too-long sample: at ``max_length`` unless that splits an image's tokens."""
    if len(input_ids) <= max_length:
        return len(input_ids)
    cut = max_length
    opened = max((i for i in range(cut) if input_ids[i] == ids.vision_start), default=-1)
    closed = max((i for i in range(cut) if input_ids[i] == ids.vision_end), default=-1)
    if opened > closed:  # the cut falls inside vision_start ... vision_end: cut before the image
        cut = opened
    return cut


class SampleBuilder:
    """Turns one record into the tensors of one training sample."""

    def __init__(self, processor, config: DataConfig, image_root: str | os.PathLike):
        self.processor = processor
        self.config = config
        self.image_root = Path(image_root)
        self.ids = TokenIds.from_processor(processor)

    def image_paths(self, record: dict) -> list[str]:
        """Absolute paths of the record's images (DataError for a path that leaves the image root)."""
        return [rec.resolve_image_path(self.image_root, path, record.get("id")) for path in record["image"]]

    def load_images(self, record: dict) -> list:
        """The record's images, decoded under the one image rule of every path that opens images
        (training, validation, run_inference): any defect is a :class:`SkipSample` of kind "image"
        naming the record and the file."""
        try:
            return [open_image(path, self.config) for path in self.image_paths(record)]
        except ImageDefect as err:
            raise SkipSample(f"record {record.get('id')!r}: image {err}") from None
        except DataError as err:  # an image path outside the image root (the message names the record)
            raise SkipSample(str(err)) from None

    def prompt(self, record: dict) -> tuple[list[dict], list]:
        """Messages up to the record's first question (as training renders them) and their images."""
        messages = to_messages(record, self.config.system_prompt)
        first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
        return messages[: first_user + 1], self.load_images(record)

    def __call__(self, record: dict) -> dict[str, torch.Tensor]:
        messages = to_messages(record, self.config.system_prompt)
        images = self.load_images(record)
        if count_images(messages) != len(images):
            raise SkipSample(
                f"record {record.get('id')!r}: {len(images)} images but a different placeholder count"
            )
        text = self.processor.apply_chat_template(messages, tokenize=False)
        enc = self.processor(text=[text], images=images or None, return_tensors="pt")
        return self._finish(record, enc)

    def _finish(self, record: dict, enc) -> dict[str, torch.Tensor]:
        input_ids = enc["input_ids"][0].tolist()
        cut = truncation_point(input_ids, self.config.model_max_length, self.ids)
        labels = mask_labels(input_ids[:cut], self.ids)
        if all(label == IGNORE_INDEX for label in labels):
            raise SkipSample(
                f"record {record.get('id')!r}: no answer token left within model_max_length", "no_answer"
            )
        sample = {
            "input_ids": torch.tensor(input_ids[:cut]),
            "labels": torch.tensor(labels),
            "mm_token_type_ids": enc["mm_token_type_ids"][0, :cut],
        }
        if "pixel_values" in enc:
            kept_images = sum(1 for t in input_ids[:cut] if t == self.ids.vision_start)
            grid = enc["image_grid_thw"][:kept_images]
            if kept_images:
                sample["image_grid_thw"] = grid
                sample["pixel_values"] = enc["pixel_values"][: int(grid.prod(dim=1).sum())]
        return sample


class RecordDataset(torch.utils.data.Dataset):
    """Records in memory, samples built lazily (so image decoding happens in DataLoader workers).

    With ``cache`` every sample is built once (``fill_cache``) and reused: samples carry no random
    augmentation, so rounds 2+ would rebuild identical tensors. Measured on the tiny model, building
    a sample costs about as much as training on it (bench/bench_data_pipeline.py).
    """

    def __init__(self, records: list[dict], builder: SampleBuilder, cache: bool = False):
        self.records = records
        self.builder = builder
        self.cache: dict[int, dict] | None = {} if cache else None
        self.image_skips: list[str] = []  # reasons of the records screen() dropped
        # Records already reported: a round draws a record many times (1000 steps over a small shard
        # logged 447 identical warnings, measured), so each is logged once per process; skips still count.
        self._reported: set[int] = set()

    def screen(self, limit: int = 0) -> list[str]:
        """Keep only records whose images all pass the image rule (the first ``limit`` such when > 0).

        Evaluation screens before it starts, so that the loss, the generated answers and every
        compared checkpoint cover the same records. Each dropped record is logged; the reasons are
        returned and kept in ``image_skips``.
        """
        kept = []
        for record in self.records:
            if limit and len(kept) == limit:
                break
            try:
                self.builder.load_images(record)
            except SkipSample as err:
                logger.warning("Skipping record: %s", err)
                self.image_skips.append(str(err))
                continue
            kept.append(record)
        self.keep(kept)
        return self.image_skips

    def keep(self, records: list[dict]) -> None:
        """Narrow the dataset to ``records`` (a subset, in order); cached samples are keyed by index,
        so the cache starts again."""
        self.records = records
        self.cache = {} if self.cache is not None else None
        self._reported = set()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        if self.cache is not None and index in self.cache:
            return self.cache[index]
        try:
            return self.builder(self.records[index])
        except SkipSample as err:
            if index not in self._reported:
                self._reported.add(index)
                logger.warning("Skipping sample: %s", err)
            return {"skipped": err.kind, "reason": str(err)}

    def fill_cache(self, num_workers: int) -> None:
        """Build every sample once, in parallel (workers cannot fill the parent's dict themselves)."""
        if self.cache is None or len(self.cache) == len(self):
            return
        loader = torch.utils.data.DataLoader(
            self, batch_size=None, num_workers=num_workers, collate_fn=_identity
        )
        for index, sample in enumerate(loader):  # the sequential sampler keeps the order
            # clone: out of the workers' shared memory, which would otherwise hold a file descriptor each
            self.cache[index] = {k: v.clone() if torch.is_tensor(v) else v for k, v in sample.items()}


def _identity(sample):
    return sample


class Collator:
    """Right-pads samples into a batch; counts skipped ones in ``num_skipped`` (bad image) / ``num_dropped``."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        kept = [s for s in samples if "skipped" not in s]
        batch: dict[str, torch.Tensor] = {
            "num_skipped": torch.tensor(sum(s.get("skipped") == "image" for s in samples)),
            "num_dropped": torch.tensor(sum(s.get("skipped") == "no_answer" for s in samples)),
        }
        if not kept:
            return batch
        width = max(len(s["input_ids"]) for s in kept)

        def pad(key: str, value: int) -> torch.Tensor:
            out = torch.full((len(kept), width), value, dtype=torch.long)
            for row, s in enumerate(kept):
                out[row, : len(s[key])] = s[key]
            return out

        batch["input_ids"] = pad("input_ids", self.pad_token_id)
        batch["labels"] = pad("labels", IGNORE_INDEX)
        batch["mm_token_type_ids"] = pad("mm_token_type_ids", 0)
        batch["attention_mask"] = torch.zeros((len(kept), width), dtype=torch.long)
        for row, s in enumerate(kept):
            batch["attention_mask"][row, : len(s["input_ids"])] = 1
        with_images = [s for s in kept if "pixel_values" in s]
        if with_images:
            batch["pixel_values"] = torch.cat([s["pixel_values"] for s in with_images])
            batch["image_grid_thw"] = torch.cat([s["image_grid_thw"] for s in with_images])
        return batch


def resolve_image_root(config: DataConfig, data_path: Path) -> Path:
    """--image_root if given; else the source image root prepare_data recorded in the shard set's
    manifest.json (shards live away from the images); else the data file's own folder.

    A root that does not exist is a DataError naming it: otherwise every image would be a skip.
    """
    if config.image_root:
        root = Path(config.image_root)
        if not root.is_dir():
            raise DataError(
                f"--image_root {config.image_root}{_absolute_hint(root)} does not exist or is not a folder; "
                "pass the folder that holds the data file's images/ (e.g. your PubMedVision clone)"
            )
        return root
    data_path = Path(os.path.abspath(data_path))  # "train.json".parent.parent would be "." again
    for folder in (data_path.parent, data_path.parent.parent):
        manifest = folder / "manifest.json"
        if manifest.is_file():
            return _manifest_image_root(manifest)
    return data_path.parent


def _absolute_hint(path: Path) -> str:
    return "" if path.is_absolute() else f" (= {path.absolute()})"


def _manifest_image_root(manifest: Path) -> Path:
    """The image root a manifest records, as an existing absolute path (DataError if none exists)."""
    try:
        info = json.loads(manifest.read_text(encoding="utf-8"))
        # prepare_data's default root is the source data file's folder (recorded absolute)
        recorded = (
            info.get("image_root")
            or info["config"].get("image_root")
            or str(Path(info["source"]["path"]).parent)
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise DataError(f"{manifest}: unreadable manifest ({_one_line(err)}); pass --image_root") from None
    candidates = (
        [Path(recorded)] if os.path.isabs(recorded) else [d / recorded for d in _prepare_dirs(info, manifest)]
    )
    for root in candidates:
        if root.is_dir():
            return Path(os.path.normpath(root))
    tried = ", ".join(os.path.normpath(c) for c in candidates)
    raise DataError(
        f"{manifest}: its image root {recorded!r} does not exist here (looked for {tried}); "
        "pass --image_root <folder holding the images/ folder>"
    )


def _prepare_dirs(info: dict, manifest: Path) -> list[Path]:
    """Folders a relative path in an old manifest may be relative to, most likely first.

    Such a path was relative to the folder prepare_data ran in, which old manifests do not record;
    it is recovered from a recorded relative path whose absolute form is known (the manifest's
    own --output_dir, the source --data_file). The manifest's folder is the last resort.
    """
    config = info.get("config") or {}
    known = [(config.get("output_dir"), manifest.parent)]
    source = (info.get("source") or {}).get("path")
    if source:
        known.append((config.get("data_file"), Path(source)))
    found = []
    for relative, absolute in known:
        if not relative or os.path.isabs(relative):
            continue
        parts = Path(os.path.normpath(relative)).parts
        if ".." in parts or (parts and absolute.parts[-len(parts) :] != parts):
            continue
        found.append(Path(*absolute.parts[: len(absolute.parts) - len(parts)]) if parts else absolute)
    return [*dict.fromkeys(found), manifest.parent]


def build_dataset(processor, config: DataConfig, data_path: str | None = None) -> RecordDataset:
    """The dataset of one data file (records validated on load; invalid ones counted and dropped)."""
    path = Path(data_path or config.data_path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist; create the site shards with prepare_data.py")
    image_root = resolve_image_root(config, path)  # before reading records: a wrong root fails at once
    records, skipped = rec.valid_records(load_records(path))
    if skipped:
        logger.warning("%s: skipped %d invalid records %s", path, sum(skipped.values()), dict(skipped))
    if not records:
        raise DataError(f"{path}: no usable records (skipped: {dict(skipped)})")
    return RecordDataset(records, SampleBuilder(processor, config, image_root), cache=config.cache_samples)


def main(argv: list[str] | None = None) -> None:
    from ..model.modeling import load_processor

    parser = argparse.ArgumentParser(description="Show how records become training samples.")
    parser.add_argument("--model", required=True, help="Model directory or id (for its processor).")
    parser.add_argument("--data", required=True, help="PubMedVision-format .json/.jsonl file.")
    parser.add_argument("--show", type=int, default=1, help="How many samples to print.")
    args = parser.parse_args(argv)
    config = DataConfig(data_path=args.data)
    processor = load_processor(args.model, config)
    dataset = build_dataset(processor, config)
    for index in range(min(args.show, len(dataset))):
        sample = dataset[index]
        if "skipped" in sample:
            print(f"[{index}] skipped: {sample['skipped']}")
            continue
        ids, labels = sample["input_ids"].tolist(), sample["labels"].tolist()
        answer = [t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]
        print(f"[{index}] {len(ids)} tokens, {len(answer)} supervised")
        print(processor.tokenizer.decode(ids))
        print("supervised:", repr(processor.tokenizer.decode(answer)))


if __name__ == "__main__":
    main()
