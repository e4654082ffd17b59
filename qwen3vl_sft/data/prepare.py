"""prepare_data's logic: PubMedVision (local file or Hub split, image zips) -> per-site shards.

    python prepare_data.py --help      # the command line around :func:`prepare_shards`

Kept in the package so job.py --demo and the tests shard data the same way the script does.

What a run does to the records, in order: invalid ones are skipped by reason (the rule shared with
the training loader, :func:`qwen3vl_sft.data.records.inspect_record`, plus missing images); exact
copies (same images and conversations, whatever the id) are dropped, the first kept; records that
share an image path or an id are linked, and each linked group lands in one file (test, a site's
train or val) under every ``--split``.  Without shared images or ids the split is the plain
record-level one (same seed, same files).

``manifest.json`` keys (every path absolute: sites read it from other working directories):

* ``config``: the flags as run; ``data_file``, ``image_root`` (resolved default included) and
  ``output_dir`` absolute.
* ``image_root``: where the records' image paths point (what a site resolves them against).
* ``source``: ``path`` (absolute), ``bytes``, ``records`` (read, usable or not).
* ``usable_records``: records written somewhere (after skips and duplicates).
* ``skipped``: records not written, by reason (:data:`qwen3vl_sft.data.records.SKIP_REASONS`,
  ``missing_image``, ``image_outside_root``, and ``duplicate`` for dropped exact copies).
* ``duplicates``: ``removed`` (= ``skipped.duplicate``, 0 if none) and
  ``ids_with_different_content``: ``ids`` (how many ids sit on records that differ), ``records``
  (how many records carry them, all kept), ``examples`` (up to 5 such ids).
* ``links``: groups of more than one record kept together (shared image or id): ``groups``,
  ``records`` in them, ``largest`` group.
* ``held_out``: ``val`` / ``test`` true when ``site-N/val.json`` / ``test.json`` were written
  (``--val_fraction 0`` / ``--test_fraction 0`` write none: an empty file would fail every reader).
  With a fraction > 0 every site's ``val.json`` and ``test.json`` hold at least one record.
* ``dropped``: ``subset_size`` (records left out by the cap).
* ``sites``: per site, ``train`` and ``val`` counts (``count``, ``by_modality``, ``by_body_part``);
  ``test``: the same for ``test.json``.
* ``files``: per file written, ``records``, ``bytes``, ``sha256``.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import re
import shutil
import zipfile

from ..config import DEFAULT_DATA_FILE, HF_DATASET_ID, PrepareDataConfig
from ..errors import DataError
from ..fileio import atomic_dir, atomic_path
from .records import ImageIndex
from .sharding import (
    check_config,
    collect,
    drop_duplicates,
    link_records,
    split_pool,
    staging_dir,
    write_outputs,
)

CLONE_HINT = (
    f"clone it with git lfs (git lfs install && git clone https://huggingface.co/datasets/{HF_DATASET_ID}) "
    "into ./PubMedVision, or pass --data_file '' to download the split from the Hugging Face Hub"
)


def download_split(split_name: str) -> str:
    """Export the Hub split to ``PubMedVision/<split_name>.jsonl`` (once) and return its path.

    Only the records come from the Hub; the images are the ``images_*.zip`` files of the same repo.
    """
    dest = os.path.join(os.path.dirname(DEFAULT_DATA_FILE), f"{split_name}.jsonl")
    if os.path.isfile(dest):
        print(f"Using {dest} downloaded earlier")
        return dest
    from datasets import load_dataset  # heavy import, only needed on this path

    print(f"Downloading {HF_DATASET_ID} ({split_name}) from the Hugging Face Hub ...")
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    try:
        dataset = load_dataset(HF_DATASET_ID, split_name, split="train")
    except (OSError, ValueError) as e:  # no network, unknown config name
        raise DataError(f"could not download {HF_DATASET_ID} ({split_name}): {e}; {CLONE_HINT}") from None
    with atomic_path(dest) as tmp:
        dataset.to_json(tmp, lines=True, force_ascii=False)
    return dest


def _member_target(name: str) -> str | None:
    """Where an archive member goes below ``images/``: the part after a leading ``images/`` folder
    if the archive stores one (so both layouts give ``images/<name>.jpg``, as records expect), or
    None for folders and unsafe names (absolute, ``..``).
    """
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if "images" in parts[:-1]:
        parts = parts[parts.index("images") + 1 :]
    if not parts or name.endswith("/") or ".." in parts or name.startswith("/"):
        return None
    return posixpath.join(*parts)


def extract_image_zips(data_dir: str) -> None:
    """Extract ``images_*.zip`` of ``data_dir`` into ``data_dir/images`` unless that folder exists.

    Extraction goes to a temporary folder renamed to ``images/`` at the end, so an interrupted run
    is redone instead of leaving a partial ``images/`` that would silently drop records.
    """
    images = os.path.join(data_dir, "images")
    archives = sorted(
        n for n in os.listdir(data_dir or ".") if n.startswith("images_") and n.endswith(".zip")
    )
    if os.path.isdir(images) or not archives:
        return
    from tqdm import tqdm

    with atomic_dir(images) as tmp:
        for archive in archives:
            try:
                with zipfile.ZipFile(os.path.join(data_dir, archive)) as zf:
                    members = [m for m in zf.infolist() if _member_target(m.filename)]
                    for m in tqdm(members, desc=f"Extracting {archive}", unit="img"):
                        target = os.path.join(tmp, _member_target(m.filename))
                        os.makedirs(os.path.dirname(target), exist_ok=True)
                        with zf.open(m) as src, open(target, "wb") as dst:
                            shutil.copyfileobj(src, dst)
            except zipfile.BadZipFile as e:
                raise DataError(
                    f"{os.path.join(data_dir, archive)} is not a valid zip ({e}); download it again"
                ) from None


def check_paths(cfg: PrepareDataConfig, data_file: str, image_root: str) -> None:
    """Refuse paths that cannot work, naming the flag, before the long read."""
    if os.path.isdir(data_file):
        raise DataError(f"--data_file {data_file} is a folder; pass the .json / .jsonl file in it")
    if not os.path.isfile(data_file):
        raise DataError(f"--data_file {data_file} does not exist: {CLONE_HINT}")
    if cfg.check_images and not os.path.isdir(image_root):
        what = "is not a folder" if os.path.exists(image_root) else "does not exist"
        raise DataError(
            f"--image_root {image_root} {what}; pass the folder the records' image paths are relative to "
            "(the one holding images/), or --check_images false to prepare shards without the images"
        )
    out, src = os.path.abspath(cfg.output_dir), os.path.abspath(data_file)
    rel = os.path.relpath(src, out).replace(os.sep, "/")
    if rel in ("test.json", "manifest.json") or re.fullmatch(r"site-\d+/.*", rel):
        raise DataError(
            f"--data_file {data_file} lies where --output_dir {cfg.output_dir} writes its shards and would be "
            "replaced; pass another --output_dir"
        )


def prepare_shards(cfg: PrepareDataConfig) -> dict:
    """Prepare the shards described by ``cfg``; returns the manifest.  Raises DataError on bad input."""
    check_config(cfg)
    data_file = cfg.data_file or download_split(cfg.split_name)
    data_dir = os.path.dirname(data_file)
    image_root = cfg.image_root or data_dir or "."
    check_paths(cfg, data_file, image_root)
    if cfg.extract_images:
        extract_image_zips(data_dir)
    # Absolute from here on: a relative path through a folder this run replaces ("out/site-1/..")
    # would stop resolving halfway through.
    cfg = dataclasses.replace(cfg, output_dir=os.path.abspath(cfg.output_dir))
    with staging_dir(cfg.output_dir) as stage:  # before the long read: an unwritable dir fails fast
        print(f"Reading {data_file} ...")
        workers = cfg.num_workers or min(4, os.cpu_count() or 1)
        images = ImageIndex(image_root, check_exists=cfg.check_images)
        pool = collect(data_file, images, workers)
        if not len(pool) and pool.skipped.get("missing_image"):
            raise DataError(
                f"no usable record: {pool.skipped['missing_image']} of {pool.total} have images missing under "
                f"--image_root {image_root}; extract the dataset's images_*.zip there, or pass --check_images false"
            )
        pool, duplicates = drop_duplicates(pool, data_file, images)
        links = link_records(pool, data_file, duplicates)
        split = split_pool(pool, cfg, links)
        return write_outputs(cfg, data_file, pool, split, stage, links, image_root)


def report(cfg: PrepareDataConfig, manifest: dict) -> None:
    """The summary lines (the per-site and final lines keep the format of the original example)."""
    skipped = ", ".join(f"{reason}={n}" for reason, n in manifest["skipped"].items()) or "none"
    print(
        f"Read {manifest['source']['records']} records: {manifest['usable_records']} usable, skipped: {skipped}"
    )
    conflicts = manifest["duplicates"]["ids_with_different_content"]
    if conflicts["ids"]:
        print(
            f"Warning: {conflicts['ids']} id(s) occur on records with different content "
            f"({conflicts['records']} records, e.g. {', '.join(conflicts['examples'])}): all kept, each id's "
            "records on one side of every split; see 'duplicates' in manifest.json"
        )
    if manifest["dropped"]["subset_size"]:
        print(f"Dropped {manifest['dropped']['subset_size']} records beyond --subset_size {cfg.subset_size}")
    held_out = manifest["held_out"]
    for site, counts in manifest["sites"].items():
        print(
            f"  {site}: {counts['train']['count']} samples -> {os.path.join(cfg.output_dir, site, 'train.json')}"
        )
    if not held_out["val"]:
        print("  val: off (--val_fraction 0): no site-N/val.json, sites validate nothing")
    if held_out["test"]:
        print(f"  test: {manifest['test']['count']} samples -> {os.path.join(cfg.output_dir, 'test.json')}")
    else:
        print("  test: off (--test_fraction 0): no test.json written")
    print(f"Done. Client data under {cfg.output_dir}")
