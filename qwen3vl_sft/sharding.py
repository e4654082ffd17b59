"""Split a PubMedVision-format file into per-site shards, a global test set and a manifest.

Three steps, each a function:

1. :func:`collect` streams the source once and keeps, per usable record, only its byte span, how its
   ``<image>`` placeholders must be repaired and its modality / body-part label (about 30 bytes per
   record instead of the ~8 KB a parsed record costs in Python).
2. :func:`split_pool` does the seeded shuffle, the held-out ``test.json``, the per-site assignment
   (``iid``, whole ``modality`` / ``body_part`` groups, or Dirichlet label skew), ``val.json`` and the
   ``subset_size`` cap, on index arrays only.
3. :func:`write_outputs` copies each record's raw bytes into its shard (re-serialising only what the
   placeholder repair cannot splice), hashing as it writes, into a staging folder inside the output
   directory; the shards and ``manifest.json`` are moved into place only when everything is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import multiprocessing
import os
import shutil
import tempfile
from array import array
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from qwen3vl_sft.config import PrepareDataConfig
from qwen3vl_sft.fileio import atomic_write_json, publish
from qwen3vl_sft.records import (
    DataError,
    ImageIndex,
    MisalignedSplit,
    Scanned,
    ensure_image_placeholders,
    image_list,
    inspect_record,
    scan_records,
    splice_placeholders,
    split_points,
)

LABEL_KEYS = ("modality", "body_part")
UNKNOWN_LABEL = "unknown"
COPY, RESERIALISE = -1, -2  # Pool.fix_at values besides a splice offset (>= 0)
_ARRAYS = ("offsets", "lengths", "fix_at", "fix_count")  # the per-record columns of a Pool
_BLOCK_RECORDS = 2048  # records joined per write: few syscalls, bounded memory


# --------------------------------------------------------------------------- 1. collect


@dataclass
class Pool:
    """The usable records of a source file, as parallel arrays indexed by record number."""

    offsets: np.ndarray  # int64 byte offset of each record in the source
    lengths: np.ndarray  # int64 byte length
    fix_at: np.ndarray  # int64: COPY, RESERIALISE, or byte offset where placeholders are spliced in
    fix_count: np.ndarray  # int64: how many "<image>\n" to splice in
    labels: dict[str, np.ndarray]  # LABEL_KEYS -> int64 label codes
    names: dict[str, list[str]]  # LABEL_KEYS -> label name of each code
    total: int  # records read, usable or not
    skipped: Counter  # records not usable, by reason

    def __len__(self) -> int:
        return len(self.offsets)


class _PoolBuilder:
    """Accumulates a :class:`Pool` in compact ``array`` buffers (a Python int per field would cost 10x)."""

    def __init__(self) -> None:
        self.offsets, self.lengths, self.fix_at, self.fix_count = (array("q") for _ in _ARRAYS)
        self.codes = {key: {} for key in LABEL_KEYS}
        self.labels = {key: array("q") for key in LABEL_KEYS}

    def add(self, scanned: Scanned, record: dict, missing: int) -> None:
        """Keep a usable record: its span, how to repair its placeholders, its label codes."""
        if isinstance(record.get("image"), str):
            fix_at = RESERIALISE  # a bare string becomes a list: more than a splice
        elif missing:
            fix_at = scanned.placeholder_offset()
            fix_at = fix_at if fix_at >= 0 else RESERIALISE
        else:
            fix_at = COPY
        self.offsets.append(scanned.offset)
        self.lengths.append(scanned.length)
        self.fix_at.append(fix_at)
        self.fix_count.append(missing)
        for key in LABEL_KEYS:
            label = record.get(key)
            if not isinstance(label, str) or not label:
                label = UNKNOWN_LABEL
            codes = self.codes[key]
            code = codes.get(label)
            if code is None:
                code = codes[label] = len(codes)
            self.labels[key].append(code)

    def build(self, total: int, skipped: Counter) -> Pool:
        def as_numpy(col: array) -> np.ndarray:
            return np.frombuffer(col, dtype=np.int64)

        return Pool(
            **{col: as_numpy(getattr(self, col)) for col in _ARRAYS},
            labels={key: as_numpy(col) for key, col in self.labels.items()},
            names={key: list(codes) for key, codes in self.codes.items()},
            total=total,
            skipped=skipped,
        )


def collect(path: str, images: ImageIndex, workers: int = 1) -> Pool:
    """Read ``path`` once; keep the usable records' spans and labels, count the others by reason.

    With ``workers > 1`` (and ``fork`` available) the file is cut at record boundaries and the parts
    are read by that many processes (this process reads the first); the result is the same.
    """
    can_fork = "fork" in multiprocessing.get_all_start_methods()
    points = split_points(path, workers) if can_fork else [0]
    if len(points) == 1:
        return _collect_range(path, images, 0, None)
    images.preload()  # one listing, inherited by the forked readers instead of one each
    ranges = list(zip(points, [*points[1:], None], strict=True))
    children = [_Forked(_collect_range, path, images, *r) for r in ranges[1:]]
    try:
        parts = [_collect_range(path, images, *ranges[0])] + [child.result() for child in children]
    except MisalignedSplit:  # a split point was not a record start: read it all in order
        return _collect_range(path, images, 0, None)
    finally:
        for child in children:
            child.close()
    return _merge(parts)


class _Forked:
    """``fn(*args)`` run in a forked child: the arguments are inherited, not pickled (the image
    listing alone is ~100 MB); the result comes back through a pipe.
    """

    def __init__(self, fn, *args):
        context = multiprocessing.get_context("fork")
        self.conn, child_end = context.Pipe(duplex=False)
        self.process = context.Process(target=_child_main, args=(child_end, fn, args), daemon=True)
        self.process.start()  # flushes stdout first, so buffered output is not printed twice
        child_end.close()

    def result(self):
        try:
            ok, value = self.conn.recv()
        except EOFError:
            raise RuntimeError(f"a reader process died (exit code {self.process.exitcode})") from None
        if not ok:
            raise value
        return value

    def close(self) -> None:
        if self.process.is_alive():  # only when this process failed first: its work is not needed
            self.process.terminate()
        self.process.join()
        self.conn.close()


def _child_main(conn, fn, args) -> None:
    try:
        result = (True, fn(*args))
    except (DataError, MisalignedSplit) as e:  # expected failures travel back; bugs print a traceback
        result = (False, e)
    conn.send(result)
    conn.close()


def _collect_range(path: str, images: ImageIndex, start: int, stop: int | None) -> Pool:
    """:func:`collect` for the records that begin in bytes ``[start, stop)``."""
    builder, skipped, total = _PoolBuilder(), Counter(), 0
    for scanned in scan_records(path, start, stop):
        total += 1
        record = scanned.raw  # fast view: exact for structure and ASCII text (see records.py)
        reason, missing = inspect_record(record)
        if not reason:
            if not (scanned.ascii or _ascii_fields(record)):
                record = scanned.record  # non-ASCII image path or label: decode the text properly
            reason = images.problem(record)
        if reason:
            skipped[reason] += 1
        else:
            builder.add(scanned, record, missing)
    return builder.build(total, skipped)


def _merge(parts: list[Pool]) -> Pool:
    """One pool from pools of consecutive file parts (label codes renumbered into the first's)."""
    names = {key: {} for key in LABEL_KEYS}
    labels = {key: [] for key in LABEL_KEYS}
    for part in parts:
        for key in LABEL_KEYS:
            codes = names[key]
            remap = np.array([codes.setdefault(n, len(codes)) for n in part.names[key]], dtype=np.int64)
            labels[key].append(remap[part.labels[key]])
    return Pool(
        **{col: np.concatenate([getattr(p, col) for p in parts]) for col in _ARRAYS},
        labels={key: np.concatenate(labels[key]) for key in LABEL_KEYS},
        names={key: list(codes) for key, codes in names.items()},
        total=sum(p.total for p in parts),
        skipped=sum((p.skipped for p in parts), Counter()),
    )


def _ascii_fields(record: dict) -> bool:
    """True if the image paths and labels of a validated record are plain ASCII strings."""
    for path in image_list(record):
        if not path.isascii():
            return False
    for key in LABEL_KEYS:
        label = record.get(key)
        if isinstance(label, str) and not label.isascii():
            return False
    return True


# --------------------------------------------------------------------------- 2. split


@dataclass
class Split:
    """Pool indices of every output file, each in shuffled order."""

    test: np.ndarray
    train: list[np.ndarray]
    val: list[np.ndarray]
    dropped_by_subset_size: int


def check_config(cfg: PrepareDataConfig) -> None:
    """Refuse flag values the split cannot honour, naming the flag."""
    if cfg.num_clients <= 0:
        raise DataError(f"--num_clients must be at least 1 (got {cfg.num_clients})")
    for flag in ("val_fraction", "test_fraction"):
        value = getattr(cfg, flag)
        if not 0.0 <= value < 1.0:
            raise DataError(f"--{flag} must be in [0, 1) (got {value})")
    if cfg.alpha <= 0:
        raise DataError(f"--alpha must be > 0 (got {cfg.alpha})")
    if cfg.subset_size is not None and cfg.subset_size <= 0:
        raise DataError(f"--subset_size must be at least 1 (got {cfg.subset_size})")


def _assign_groups(
    idx: np.ndarray, labels: np.ndarray, k: int, key: str, names: list[str]
) -> list[np.ndarray]:
    """Whole label groups per site: largest group first onto the least-loaded site (balances sizes)."""
    codes, sizes = np.unique(labels[idx], return_counts=True)
    if len(codes) < k:
        raise DataError(
            f"--split {key} needs at least --num_clients={k} distinct {key} values, found {len(codes)} "
            f"({', '.join(names[c] for c in codes)}); lower --num_clients or use --split dirichlet"
        )
    load, owner = [0] * k, {}
    for size, code in sorted(
        zip(sizes.tolist(), codes.tolist(), strict=True), key=lambda sc: (-sc[0], names[sc[1]])
    ):
        site = load.index(min(load))
        owner[code] = site
        load[site] += size
    site_of = np.array([owner.get(c, -1) for c in range(len(names))])[labels[idx]]
    return [idx[site_of == s] for s in range(k)]


def _assign_dirichlet(
    idx: np.ndarray, labels: np.ndarray, k: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Per label, proportions drawn from Dirichlet(alpha): small alpha puts each label on few sites.

    Draws again (up to 100 times) while a site would get no record at all.
    """
    lab = labels[idx]
    for _ in range(100):
        parts: list[list[np.ndarray]] = [[] for _ in range(k)]
        for code in np.unique(lab):
            members = idx[lab == code]
            cuts = (np.cumsum(rng.dirichlet([alpha] * k))[:-1] * len(members)).astype(np.int64)
            for site, part in enumerate(np.split(members, cuts)):
                parts[site].append(part)
        sites = [np.concatenate(p) for p in parts]
        if min(len(s) for s in sites) > 0:
            return sites
    raise DataError(
        f"--split dirichlet left a site empty in 100 draws (--alpha {alpha}, {len(idx)} records, "
        f"--num_clients {k}); raise --alpha or lower --num_clients"
    )


def _assign(
    pool: Pool, idx: np.ndarray, cfg: PrepareDataConfig, rng: np.random.Generator
) -> list[np.ndarray]:
    k = cfg.num_clients
    if cfg.split == "iid":
        return np.array_split(idx, k)
    if cfg.split in LABEL_KEYS:
        return _assign_groups(idx, pool.labels[cfg.split], k, cfg.split, pool.names[cfg.split])
    if cfg.split == "dirichlet":
        return _assign_dirichlet(idx, pool.labels[cfg.dirichlet_key], k, cfg.alpha, rng)
    raise DataError(f"--split must be one of iid, modality, body_part, dirichlet (got {cfg.split!r})")


def _val_and_train(site: np.ndarray, cfg: PrepareDataConfig) -> tuple[np.ndarray, np.ndarray, int]:
    """First ``val_fraction`` of a site's records are its val set; the rest (capped) its train set.

    With ``subset_size``, val shrinks in proportion so a quick run does not evaluate 20 k records.
    Returns (val, train, records dropped by the cap).
    """
    n_val = min(int(round(len(site) * cfg.val_fraction)), len(site) - 1)
    val, train = site[:n_val], site[n_val:]
    if cfg.subset_size is None or len(train) <= cfg.subset_size:
        return val, train, 0
    vf = cfg.val_fraction
    val_cap = max(1, int(round(cfg.subset_size * vf / (1 - vf)))) if n_val else 0
    return val[:val_cap], train[: cfg.subset_size], len(site) - min(n_val, val_cap) - cfg.subset_size


def split_pool(pool: Pool, cfg: PrepareDataConfig) -> Split:
    """Seeded shuffle, global test set, per-site assignment, per-site val set, subset cap."""
    k, n = cfg.num_clients, len(pool)
    rng = np.random.default_rng(cfg.seed)
    perm = rng.permutation(n)
    n_test = int(round(n * cfg.test_fraction))
    if n - n_test < k:
        raise DataError(
            f"only {n} usable records ({n - n_test} after the test set) for --num_clients {k}: "
            "use fewer clients, a smaller --test_fraction, or a larger data file"
        )
    rank = np.empty(n, dtype=np.int64)
    rank[perm] = np.arange(n)
    sites = _assign(pool, perm[n_test:], cfg, rng)
    train, val, dropped = [], [], 0
    for site in sites:
        site = site[np.argsort(rank[site], kind="stable")]  # shuffled order, whatever the assignment
        v, t, d = _val_and_train(site, cfg)
        val.append(v)
        train.append(t)
        dropped += d
    return Split(test=perm[:n_test], train=train, val=val, dropped_by_subset_size=dropped)


# --------------------------------------------------------------------------- 3. write


def _reserialise(raw: bytes) -> bytes:
    """A record whose repair is more than a splice, written back as compact JSON."""
    record = ensure_image_placeholders(json.loads(raw))
    return json.dumps(record, ensure_ascii=False).encode("utf-8")


def _json_array_blocks(fd: int, pool: Pool, indices: np.ndarray) -> Iterator[bytes]:
    """The text of a JSON array of the records ``indices`` of source ``fd``, a block at a time.

    Each record's bytes are copied from the source (placeholders spliced in where needed), which is
    both faster than re-serialising and keeps the source's formatting and escapes.
    """
    yield b"[\n"
    for lo in range(0, len(indices), _BLOCK_RECORDS):
        rows = indices[lo : lo + _BLOCK_RECORDS]
        block = []
        columns = (getattr(pool, name)[rows].tolist() for name in _ARRAYS)
        for offset, length, at, count in zip(*columns, strict=True):
            raw = os.pread(fd, length, offset)
            if len(raw) != length:
                raise DataError("the data file changed while it was being split; run prepare_data.py again")
            if at >= 0:
                raw = splice_placeholders(raw, at, count)
            elif at == RESERIALISE:
                raw = _reserialise(raw)
            block.append(raw)
        yield b",\n".join(block) + (b",\n" if lo + _BLOCK_RECORDS < len(indices) else b"\n")
    yield b"]\n"


def write_json_array(fd: int, pool: Pool, indices: np.ndarray, path: str) -> dict:
    """Write the records ``indices`` of the source ``fd`` to ``path`` as a JSON array.

    A helper thread writes and hashes each block while the next is read (both release the GIL, so
    the two cores overlap).  Returns ``{"records", "bytes", "sha256"}`` of the file as written.
    """
    digest, size, pending = hashlib.sha256(), 0, None
    with open(path, "wb") as f, ThreadPoolExecutor(1) as writer:

        def emit(data: bytes) -> None:
            f.write(data)
            digest.update(data)

        for data in _json_array_blocks(fd, pool, indices):
            size += len(data)
            if pending is not None:
                pending.result()  # one block in flight: bounded memory, write errors surface here
            pending = writer.submit(emit, data)
        pending.result()
        f.flush()
        os.fsync(f.fileno())
    return {"records": len(indices), "bytes": size, "sha256": digest.hexdigest()}


def shard_files(split: Split) -> dict[str, np.ndarray]:
    """Output path (relative to the output directory) -> pool indices it holds."""
    files = {}
    for i, (train, val) in enumerate(zip(split.train, split.val, strict=True), start=1):
        files[f"site-{i}/train.json"] = train
        files[f"site-{i}/val.json"] = val
    files["test.json"] = split.test
    return files


def _counts(pool: Pool, indices: np.ndarray) -> dict:
    out: dict = {"count": len(indices)}
    for key in LABEL_KEYS:
        hist = np.bincount(pool.labels[key][indices], minlength=len(pool.names[key]))
        out[f"by_{key}"] = {pool.names[key][c]: int(n) for c, n in enumerate(hist) if n}
    return out


def build_manifest(
    cfg: PrepareDataConfig, source: str, pool: Pool, split: Split, files: dict[str, dict]
) -> dict:
    """What was written, from what, how: counts per site and label, skips by reason, file hashes."""
    sites = {
        f"site-{i}": {"train": _counts(pool, t), "val": _counts(pool, v)}
        for i, (t, v) in enumerate(zip(split.train, split.val, strict=True), start=1)
    }
    return {
        "config": dataclasses.asdict(cfg),
        "source": {"path": os.path.abspath(source), "bytes": os.path.getsize(source), "records": pool.total},
        "usable_records": len(pool),
        "skipped": dict(sorted(pool.skipped.items())),
        "dropped": {"subset_size": split.dropped_by_subset_size},
        "sites": sites,
        "test": _counts(pool, split.test),
        "files": files,
    }


@contextlib.contextmanager
def staging_dir(output_dir: str) -> Iterator[str]:
    """A fresh folder inside ``output_dir`` (same filesystem: moving out of it is a rename).

    Whatever happens, it is gone on exit; a failure never leaves half-written shards behind.
    """
    try:
        os.makedirs(output_dir, exist_ok=True)
        stage = tempfile.mkdtemp(dir=output_dir, prefix=".prepare-")
    except OSError as e:
        raise DataError(
            f"--output_dir {output_dir} is not writable ({e.strerror}); pass a writable --output_dir"
        ) from None
    try:
        yield stage
    finally:
        shutil.rmtree(stage)


def _check_free_space(output_dir: str, needed: int) -> None:
    free = shutil.disk_usage(output_dir).free
    if free < needed:
        raise DataError(
            f"not enough disk space in --output_dir {output_dir}: the shards need {needed / 2**20:.0f} MiB, "
            f"{free / 2**20:.0f} MiB are free; free some space or pass another --output_dir"
        )


def write_outputs(cfg: PrepareDataConfig, source: str, pool: Pool, split: Split, stage: str) -> dict:
    """Write every shard and the manifest into ``stage``, then move them into ``cfg.output_dir``.

    Returns the manifest.  A full disk raises :class:`DataError` naming the file being written.
    """
    targets = shard_files(split)
    _check_free_space(stage, int(sum(pool.lengths[i].sum() for i in targets.values())))
    files, current = {}, "manifest.json"
    try:
        with open(source, "rb") as src:
            for rel, indices in targets.items():
                current = rel
                os.makedirs(os.path.dirname(os.path.join(stage, rel)), exist_ok=True)
                files[rel] = write_json_array(src.fileno(), pool, indices, os.path.join(stage, rel))
        current = "manifest.json"
        manifest = build_manifest(cfg, source, pool, split, files)
        atomic_write_json(os.path.join(stage, current), manifest)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DataError(
                f"disk full while writing {os.path.join(cfg.output_dir, current)}; nothing was published. "
                "Free some space or pass another --output_dir"
            ) from None
        raise
    site_dirs = [f"site-{i}" for i in range(1, cfg.num_clients + 1)]
    publish(stage, cfg.output_dir, [*site_dirs, "test.json", "manifest.json"])
    return manifest
