"""Split a PubMedVision-format file into per-site shards, a global test set and a manifest.

Four steps, each a function:

1. :func:`collect` streams the source once and keeps, per usable record, only its byte span, how its
   ``<image>`` placeholders must be repaired, its modality / body-part label and three 8-byte hashes
   (content, id, each image path): about 80 bytes per record instead of the ~8 KB a parsed record
   costs in Python.
2. :func:`drop_duplicates` removes exact copies (same images and conversations, whatever the id;
   the first is kept, each confirmed on the text) and :func:`link_records` groups the records that
   share an image path or an id (union-find over the few records that do).
3. :func:`split_pool` does the seeded shuffle, the held-out ``test.json``, the per-site assignment
   (``iid``, whole ``modality`` / ``body_part`` groups, or Dirichlet label skew), ``val.json`` and the
   ``subset_size`` cap, on index arrays only, moving linked groups whole: no record and no image is
   on two sides of a split.  Without links it is the record-level split (same seed, same files).
4. :func:`write_outputs` copies each record's raw bytes into its shard (re-serialising only what the
   placeholder repair cannot splice), hashing as it writes, into a staging folder inside the output
   directory; the shards and ``manifest.json`` are moved into place only when everything is written
   (Ctrl-C is held back during those renames), and shards an earlier run left that this one does not
   write (a ``test.json``, a ``site-5``) are removed.  Manifest keys: :mod:`qwen3vl_sft.data.prepare`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import tempfile
import threading
from array import array
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from qwen3vl_sft.config import PrepareDataConfig
from qwen3vl_sft.data.json_scan import (
    MisalignedSplit,
    Scanned,
    scan_records,
    splice_placeholders,
    split_points,
)
from qwen3vl_sft.data.records import ImageIndex, ensure_image_placeholders, image_list, inspect_record
from qwen3vl_sft.errors import DataError
from qwen3vl_sft.fileio import atomic_write_json, publish

LABEL_KEYS = ("modality", "body_part")
UNKNOWN_LABEL = "unknown"
COPY, RESERIALISE = -1, -2  # Pool.fix_at values besides a splice offset (>= 0)
_ARRAYS = ("offsets", "lengths", "fix_at", "fix_count")  # the per-record columns a shard is written from
_KEYS = ("content", "ident")  # per-record hashes for de-duplication and linking
NO_ID = 0  # Pool.ident of a record without an "id" (a real id hashing to 0 is a 2**-64 event)
_BLOCK_RECORDS = 2048  # records joined per write: few syscalls, bounded memory
_EXAMPLES = 5  # ids quoted in the manifest and the warning


# --------------------------------------------------------------------------- 1. collect


@dataclass
class Pool:
    """The usable records of a source file, as parallel arrays indexed by record number.

    ``content``, ``ident`` and the image keys are Python ``hash`` values: 8 bytes per record or image
    instead of the strings.  They are only compared with each other within one run (forked readers
    share the interpreter's hash seed), and a duplicate is confirmed on the record's text before it is
    dropped, so a hash collision can at worst link two records that did not need it.
    """

    offsets: np.ndarray  # int64 byte offset of each record in the source
    lengths: np.ndarray  # int64 byte length
    fix_at: np.ndarray  # int64: COPY, RESERIALISE, or byte offset where placeholders are spliced in
    fix_count: np.ndarray  # int64: how many "<image>\n" to splice in
    content: np.ndarray  # int64 hash of (image paths, conversation roles and texts); the id is left out
    ident: np.ndarray  # int64 hash of the record's id, NO_ID without one
    image_keys: np.ndarray  # int64 hash of each image path (normalised under the root), record by record
    image_rows: np.ndarray  # int64 record number of each entry of image_keys
    labels: dict[str, np.ndarray]  # LABEL_KEYS -> int64 label codes
    names: dict[str, list[str]]  # LABEL_KEYS -> label name of each code
    total: int  # records read, usable or not
    skipped: Counter  # records not usable, by reason (exact duplicates too, once dropped)

    def __len__(self) -> int:
        return len(self.offsets)

    def select(self, keep: np.ndarray) -> Pool:
        """The records where ``keep`` (a bool mask) is true, renumbered in order."""
        new_row = np.cumsum(keep) - 1
        on_kept = keep[self.image_rows]
        return dataclasses.replace(
            self,
            **{col: getattr(self, col)[keep] for col in (*_ARRAYS, *_KEYS)},
            image_keys=self.image_keys[on_kept],
            image_rows=new_row[self.image_rows[on_kept]],
            labels={key: col[keep] for key, col in self.labels.items()},
        )


class _PoolBuilder:
    """Accumulates a :class:`Pool` in compact ``array`` buffers (a Python int per field would cost 10x)."""

    def __init__(self) -> None:
        self.columns = {name: array("q") for name in (*_ARRAYS, *_KEYS, "image_keys", "image_rows")}
        self.codes = {key: {} for key in LABEL_KEYS}
        self.labels = {key: array("q") for key in LABEL_KEYS}

    def add(self, scanned: Scanned, record: dict, missing: int, images: ImageIndex) -> None:
        """Keep a usable record: its span, how to repair its placeholders, its hashes and label codes."""
        if isinstance(record.get("image"), str):
            fix_at = RESERIALISE  # a bare string becomes a list: more than a splice
        elif missing:
            fix_at = scanned.placeholder_offset()
            fix_at = fix_at if fix_at >= 0 else RESERIALISE
        else:
            fix_at = COPY
        col = self.columns
        row = len(col["offsets"])
        col["offsets"].append(scanned.offset)
        col["lengths"].append(scanned.length)
        col["fix_at"].append(fix_at)
        col["fix_count"].append(missing)
        keys = tuple(images.key(path, record) for path in image_list(record))
        turns = tuple([(t["from"], t["value"]) for t in record["conversations"]])
        col["content"].append(hash((keys, turns)))
        rid = record.get("id")
        col["ident"].append(NO_ID if rid is None else hash(rid if type(rid) is str else str(rid)))
        for key in keys:
            col["image_keys"].append(hash(key))
            col["image_rows"].append(row)
        for key in LABEL_KEYS:
            self.labels[key].append(self._code(key, record.get(key)))

    def _code(self, key: str, label) -> int:
        label = label.strip() if isinstance(label, str) else ""
        label = label or UNKNOWN_LABEL  # a missing, empty or non-string label
        codes = self.codes[key]
        code = codes.get(label)
        if code is None:
            code = codes[label] = len(codes)
        return code

    def build(self, total: int, skipped: Counter) -> Pool:
        def as_numpy(col: array) -> np.ndarray:
            return np.frombuffer(col, dtype=np.int64)

        return Pool(
            **{name: as_numpy(col) for name, col in self.columns.items()},
            labels={key: as_numpy(col) for key, col in self.labels.items()},
            names={key: list(codes) for key, codes in self.codes.items()},
            total=total,
            skipped=skipped,
        )


def collect(path: str, images: ImageIndex, workers: int = 1) -> Pool:
    """Read ``path`` once; keep the usable records' spans, hashes and labels, count the others by reason.

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
    # Ctrl-C reaches the whole process group; the parent alone reports it and terminates the readers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
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
        record = scanned.raw  # fast view: exact for structure and ASCII text (see json_scan.py)
        reason, missing = inspect_record(record)
        if not reason:
            if not (scanned.ascii or _ascii_fields(record)):
                record = scanned.record  # non-ASCII image path or label: decode the text properly
            reason = images.problem(record)
        if reason:
            skipped[reason] += 1
        else:
            builder.add(scanned, record, missing, images)
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
    first_row = np.cumsum([0] + [len(p) for p in parts[:-1]])
    return Pool(
        **{col: np.concatenate([getattr(p, col) for p in parts]) for col in (*_ARRAYS, *_KEYS, "image_keys")},
        image_rows=np.concatenate([p.image_rows + first for p, first in zip(parts, first_row, strict=True)]),
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


# --------------------------------------------------------------------------- 1b. duplicates and links


@dataclass
class Links:
    """What de-duplication removed and which records must stay together.

    ``root[i]`` is the smallest record number of the group record ``i`` belongs to: records that
    share an image, or an id, are one group, and a group is never cut by a split.
    """

    root: np.ndarray
    duplicates: int = 0  # exact copies dropped (the first occurrence is kept)
    id_conflicts: int = 0  # ids that occur on records with different content
    id_conflict_records: int = 0
    id_examples: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> dict:
        """The manifest's ``links`` section: the groups of more than one record."""
        sizes = np.bincount(self.root)
        sizes = sizes[sizes > 1]
        return {
            "groups": len(sizes),
            "records": int(sizes.sum()),
            "largest": int(sizes.max()) if len(sizes) else 0,
        }


def _runs_of_equal(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(order, first)``: ``keys[order]`` is sorted (stable, so ties keep their record order) and
    ``first[j]`` is the position in ``order`` where the run of ``keys[order][j]`` starts.
    """
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    new_run = np.r_[True, sorted_keys[1:] != sorted_keys[:-1]] if len(keys) else np.zeros(0, bool)
    starts = np.flatnonzero(new_run)
    return order, starts[np.cumsum(new_run) - 1]


def _read_record(fd: int, pool: Pool, row: int) -> dict:
    return json.loads(os.pread(fd, int(pool.lengths[row]), int(pool.offsets[row])))


def _same_content(a: dict, b: dict, images: ImageIndex) -> bool:
    """The comparison ``Pool.content`` hashes: image paths (as :meth:`ImageIndex.key`) and turns."""

    def content(r: dict) -> tuple:
        paths = [images.key(p, r) for p in image_list(r)]
        return paths, [(t["from"], t["value"]) for t in r["conversations"]]

    return content(a) == content(b)


def drop_duplicates(pool: Pool, source: str, images: ImageIndex) -> tuple[Pool, int]:
    """``(pool without exact copies, how many were dropped)``; the first occurrence is kept.

    A copy is a record whose images and conversations equal an earlier one's, whatever its id and
    labels.  Candidates come from the hash column; each is confirmed on the record's text (read
    back from ``source``: duplicates are few), so a hash collision never drops a record.
    """
    order, first = _runs_of_equal(pool.content)
    later = np.flatnonzero(first != np.arange(len(order)))
    if not len(later):
        return pool, 0
    keep = np.ones(len(pool), dtype=bool)
    originals: dict[int, dict] = {}
    with open(source, "rb") as f:
        for pos in later.tolist():
            row, orig = int(order[pos]), int(order[first[pos]])
            if orig not in originals:
                originals[orig] = _read_record(f.fileno(), pool, orig)
            if _same_content(_read_record(f.fileno(), pool, row), originals[orig], images):
                keep[row] = False
    dropped = int(len(pool) - keep.sum())
    if not dropped:
        return pool, 0
    pool = pool.select(keep)
    pool.skipped["duplicate"] += dropped
    return pool, dropped


def _edges(keys: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of record numbers whose keys are equal (each row joined to the next one of its run)."""
    order = np.argsort(keys, kind="stable")
    k, r = keys[order], rows[order]
    same = k[1:] == k[:-1]
    return r[:-1][same], r[1:][same]


def _components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Smallest member of each record's connected component for the edges ``a[i]``--``b[i]``.

    Union-find over the records that have an edge only (none, for data without shared images).
    """
    root = np.arange(n)
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        while parent.get(x, x) != x:
            parent[x] = x = parent.get(parent[x], parent[x])  # path halving
        return x

    for x, y in zip(a.tolist(), b.tolist(), strict=True):
        rx, ry = find(x), find(y)
        if rx != ry:
            parent[max(rx, ry)] = min(rx, ry)  # the smaller number stays the root
    for x in parent:
        root[x] = find(x)
    return root


def link_records(pool: Pool, source: str | None = None, duplicates: int = 0) -> Links:
    """Group the records that share an image path or an id (see :class:`Links`).

    Ids left on more than one record after de-duplication belong to different content: they are
    counted, and a few are read back from ``source`` to be quoted.
    """
    with_id = np.flatnonzero(pool.ident != NO_ID)
    id_a, id_b = _edges(pool.ident[with_id], with_id)
    img_a, img_b = _edges(pool.image_keys, pool.image_rows)
    root = _components(len(pool), np.r_[id_a, img_a], np.r_[id_b, img_b])
    links = Links(root=root, duplicates=duplicates)
    if len(id_a):
        conflicted = np.unique(np.r_[id_a, id_b])
        links.id_conflict_records = len(conflicted)
        firsts = np.unique(pool.ident[conflicted], return_index=True)[1]  # one record per id
        links.id_conflicts = len(firsts)
        if source is not None:
            with open(source, "rb") as f:
                links.id_examples = [
                    str(_read_record(f.fileno(), pool, int(row)).get("id"))
                    for row in np.sort(conflicted[firsts])[:_EXAMPLES]
                ]
    return links


# --------------------------------------------------------------------------- 2. split


@dataclass
class Split:
    """Pool indices of every output file, each in shuffled order (``val`` / ``test`` empty when off)."""

    test: np.ndarray
    train: list[np.ndarray]
    val: list[np.ndarray]
    dropped_by_subset_size: int


def check_config(cfg: PrepareDataConfig) -> None:
    """Refuse flag values that cannot work, naming the flag, before anything is read."""
    if cfg.num_sites <= 0:
        raise DataError(f"--num_sites must be at least 1 (got {cfg.num_sites})")
    for flag in ("val_fraction", "test_fraction"):
        value = getattr(cfg, flag)
        if not 0.0 <= value < 1.0:  # also refuses nan
            raise DataError(f"--{flag} must be in [0, 1) (got {value}); 0 writes no {flag[:-9]}.json")
    if not (cfg.alpha > 0 and math.isfinite(cfg.alpha)):
        raise DataError(f"--alpha must be a number > 0 (got {cfg.alpha})")
    if cfg.subset_size is not None and cfg.subset_size <= 0:
        raise DataError(f"--subset_size must be at least 1 (got {cfg.subset_size}); omit it for no cap")
    if cfg.num_workers < 0:
        raise DataError(f"--num_workers must be 0 (automatic) or more (got {cfg.num_workers})")
    if not 0 <= cfg.seed < 2**63:
        raise DataError(f"--seed must be a whole number >= 0 (got {cfg.seed})")


@dataclass
class _Seq:
    """Records in split order with every linked group contiguous: ``rows`` are record numbers,
    ``group`` the group of each (equal values in runs).  Cutting one only ever moves whole groups.
    """

    rows: np.ndarray
    group: np.ndarray

    def runs(self) -> tuple[np.ndarray, np.ndarray]:
        """(position of each group's first record, group sizes), in order."""
        g = self.group
        starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]]) if len(g) else np.zeros(0, np.int64)
        return starts, np.diff(np.r_[starts, len(g)])

    def take(self, chosen: np.ndarray) -> _Seq:
        """The groups where ``chosen`` (one bool per group, in order) is true."""
        at = np.repeat(chosen, self.runs()[1])
        return _Seq(self.rows[at], self.group[at])


def _fill_front(sizes: np.ndarray, target: int) -> np.ndarray:
    """Groups (bool mask) taken from the front until ``target`` records: a group that does not fit
    is passed over for a later, smaller one.  All singletons: exactly the first ``target``.

    If no group fits, the smallest one is taken (a requested held-out set is never left empty).
    """
    chosen = np.zeros(len(sizes), dtype=bool)
    if target <= 0 or not len(sizes):
        return chosen
    fits = int(np.searchsorted(np.cumsum(sizes), target, side="right"))  # a leading run that fits
    chosen[:fits] = True
    room = target - int(sizes[:fits].sum())
    for i in (np.flatnonzero(sizes[fits:] <= room) + fits).tolist() if room else ():
        if sizes[i] <= room:
            chosen[i], room = True, room - int(sizes[i])
            if not room:
                break
    if not chosen.any():
        chosen[int(np.argmin(sizes))] = True
    return chosen


def _held_out(fraction: float, n: int) -> int:
    """Records to hold out: ``round(n * fraction)``, at least 1 when the fraction is not 0."""
    return max(1, int(round(n * fraction))) if fraction > 0 else 0


def _iid_sites(sizes: np.ndarray, k: int) -> np.ndarray:
    """Site of each group for ``--split iid``: where its middle falls when the sequence is cut into
    ``k`` equal parts (``np.array_split``'s cut points, so singletons split exactly as it does).
    """
    n = int(sizes.sum())
    cuts = np.cumsum([n // k + (1 if s < n % k else 0) for s in range(k)])[:-1]
    site = np.searchsorted(cuts, np.cumsum(sizes) - sizes / 2, side="right")
    if len(np.unique(site)) < k:  # a few large groups: balance sizes instead
        site = _balanced(sizes, k, np.arange(len(sizes)), list(range(len(sizes))))
    return site


def _balanced(sizes: np.ndarray, k: int, units: np.ndarray, tiebreak: list) -> np.ndarray:
    """Site of each item: largest unit first onto the least-loaded site (ties: by ``tiebreak[unit]``).

    ``units[i]`` is the unit (a label code, or the item itself) of item ``i`` of size ``sizes[i]``.
    """
    totals = np.bincount(units, weights=sizes, minlength=len(tiebreak))
    load, owner = [0] * k, np.full(len(tiebreak), -1)
    for unit in sorted(np.flatnonzero(totals).tolist(), key=lambda u: (-totals[u], tiebreak[u])):
        site = load.index(min(load))
        owner[unit] = site
        load[site] += int(totals[unit])
    return owner[units]


def _label_sites(labels: np.ndarray, sizes: np.ndarray, k: int, key: str, names: list[str]) -> np.ndarray:
    """Whole label groups per site (``labels``: the label of each linked group), sizes balanced."""
    codes = np.unique(labels)
    if len(codes) < k:
        raise DataError(
            f"--split {key} needs at least --num_sites={k} distinct {key} values, found {len(codes)} "
            f"({', '.join(names[c] for c in codes)}); lower --num_sites or use --split dirichlet"
        )
    return _balanced(sizes, k, labels, names)


def _dirichlet_sites(
    labels: np.ndarray, sizes: np.ndarray, k: int, alpha: float, rng: np.random.Generator
) -> np.ndarray:
    """Per label, site shares drawn from Dirichlet(alpha): small alpha puts each label on few sites.

    Draws again (up to 100 times) while a site would get no record at all.
    """
    for _ in range(100):
        site = np.zeros(len(sizes), dtype=np.int64)
        for code in np.unique(labels):
            members = np.flatnonzero(labels == code)
            n = int(sizes[members].sum())
            cuts = (np.cumsum(rng.dirichlet([alpha] * k))[:-1] * n).astype(np.int64)
            middle = np.cumsum(sizes[members]) - sizes[members] / 2
            site[members] = np.searchsorted(cuts, middle, side="right")
        if np.bincount(site, weights=sizes, minlength=k).min() > 0:
            return site
    raise DataError(
        f"--split dirichlet left a site empty in 100 draws (--alpha {alpha}, {int(sizes.sum())} records, "
        f"--num_sites {k}); raise --alpha or lower --num_sites"
    )


def _assign(pool: Pool, rest: _Seq, cfg: PrepareDataConfig, rng: np.random.Generator) -> list[_Seq]:
    """The records of each site.  A linked group goes by the label of its first record."""
    k = cfg.num_sites
    starts, sizes = rest.runs()
    if len(sizes) < k:
        raise DataError(
            f"the {len(rest.rows)} records left after the test set form only {len(sizes)} groups of records "
            f"that share images or ids (a group stays on one site) for --num_sites {k}: use fewer "
            "clients, a smaller --test_fraction, or a larger data file"
        )
    if cfg.split == "iid":
        site = _iid_sites(sizes, k)
    elif cfg.split in LABEL_KEYS or cfg.split == "dirichlet":
        key = cfg.split if cfg.split in LABEL_KEYS else cfg.dirichlet_key
        labels = pool.labels[key][rest.group[starts]]  # group = its smallest record number
        if cfg.split == "dirichlet":
            site = _dirichlet_sites(labels, sizes, k, cfg.alpha, rng)
        else:
            site = _label_sites(labels, sizes, k, key, pool.names[key])
    else:
        raise DataError(f"--split must be one of iid, modality, body_part, dirichlet (got {cfg.split!r})")
    return [rest.take(site == s) for s in range(k)]


def _val_and_train(site: _Seq, cfg: PrepareDataConfig, name: str) -> tuple[np.ndarray, np.ndarray, int]:
    """The site's first ``val_fraction`` of records (whole groups) are its val set, the rest (capped)
    its train set.  With ``val_fraction`` > 0 val gets at least one record, and train keeps one.

    With ``subset_size``, val shrinks in proportion so a quick run does not evaluate 20 k records.
    Returns (val, train, records dropped by the cap).
    """
    vf = cfg.val_fraction
    chosen = _fill_front(site.runs()[1], min(_held_out(vf, len(site.rows)), len(site.rows) - 1))
    if vf > 0 and (not chosen.any() or chosen.all()):
        linked = " (one group of records sharing images or ids)" if len(site.rows) > 1 else ""
        raise DataError(
            f"{name} has {len(site.rows)} record(s){linked}: too few to hold out --val_fraction {vf} as its "
            "val.json and still train on something; use fewer --num_sites, more data, or --val_fraction 0 "
            "(no val.json)"
        )
    val, train = site.take(chosen).rows, site.take(~chosen).rows
    n_val = len(val)
    if cfg.subset_size is None or len(train) <= cfg.subset_size:
        return val, train, 0
    val_cap = max(1, int(round(cfg.subset_size * vf / (1 - vf)))) if n_val else 0
    return val[:val_cap], train[: cfg.subset_size], len(site.rows) - min(n_val, val_cap) - cfg.subset_size


def split_pool(pool: Pool, cfg: PrepareDataConfig, links: Links | None = None) -> Split:
    """Seeded shuffle, global test set, per-site assignment, per-site val set, subset cap.

    Linked records (``links``: shared image or id) move as one group through every cut.  The shuffle
    orders groups by their earliest record in the permutation, so without links the order is the
    permutation itself and the split is the plain record-level one.
    """
    k, n = cfg.num_sites, len(pool)
    root = (links or link_records(pool)).root
    rng = np.random.default_rng(cfg.seed)
    perm = rng.permutation(n)
    rank = np.empty(n, dtype=np.int64)
    rank[perm] = np.arange(n)
    group_rank = np.full(n, n, dtype=np.int64)
    np.minimum.at(group_rank, root, rank)
    order = np.lexsort((rank, group_rank[root]))
    seq = _Seq(order, root[order])
    n_test = min(_held_out(cfg.test_fraction, n), n)
    if n - n_test < k:
        raise DataError(
            f"only {n} usable records ({n - n_test} after the test set) for --num_sites {k}: "
            "use fewer clients, a smaller --test_fraction, or a larger data file"
        )
    in_test = _fill_front(seq.runs()[1], n_test)
    sites = _assign(pool, seq.take(~in_test), cfg, rng)
    train, val, dropped = [], [], 0
    for i, site in enumerate(sites, start=1):
        v, t, d = _val_and_train(site, cfg, f"site-{i}")
        val.append(v)
        train.append(t)
        dropped += d
    return Split(test=seq.take(in_test).rows, train=train, val=val, dropped_by_subset_size=dropped)


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


def shard_files(split: Split, cfg: PrepareDataConfig) -> dict[str, np.ndarray]:
    """Output path (relative to the output directory) -> pool indices it holds.

    ``--val_fraction 0`` writes no ``val.json`` (a site then validates nothing) and ``--test_fraction 0``
    no ``test.json``: an empty file would only make every reader fail.
    """
    files = {}
    for i, (train, val) in enumerate(zip(split.train, split.val, strict=True), start=1):
        files[f"site-{i}/train.json"] = train
        if cfg.val_fraction > 0:
            files[f"site-{i}/val.json"] = val
    if cfg.test_fraction > 0:
        files["test.json"] = split.test
    return files


def _counts(pool: Pool, indices: np.ndarray) -> dict:
    out: dict = {"count": len(indices)}
    for key in LABEL_KEYS:
        hist = np.bincount(pool.labels[key][indices], minlength=len(pool.names[key]))
        out[f"by_{key}"] = {pool.names[key][c]: int(n) for c, n in enumerate(hist) if n}
    return out


def absolute_config(cfg: PrepareDataConfig, source: str, image_root: str) -> dict:
    """The config as run, every path absolute: sites read the manifest from other working directories."""
    return {
        **dataclasses.asdict(cfg),
        "data_file": os.path.abspath(source),
        "image_root": os.path.abspath(image_root),
        "output_dir": os.path.abspath(cfg.output_dir),
    }


def build_manifest(
    cfg: PrepareDataConfig,
    source: str,
    pool: Pool,
    split: Split,
    files: dict[str, dict],
    links: Links | None = None,
    image_root: str = "",
) -> dict:
    """What was written, from what, how: counts per site and label, skips by reason, file hashes,
    duplicates and linked records (keys documented in :mod:`qwen3vl_sft.data.prepare`).
    """
    links = links or link_records(pool)
    image_root = image_root or os.path.dirname(os.path.abspath(source))
    sites = {
        f"site-{i}": {"train": _counts(pool, t), "val": _counts(pool, v)}
        for i, (t, v) in enumerate(zip(split.train, split.val, strict=True), start=1)
    }
    return {
        "config": absolute_config(cfg, source, image_root),
        "image_root": os.path.abspath(image_root),
        "source": {"path": os.path.abspath(source), "bytes": os.path.getsize(source), "records": pool.total},
        "usable_records": len(pool),
        "skipped": dict(sorted(pool.skipped.items())),
        "duplicates": {
            "removed": links.duplicates,
            "ids_with_different_content": {
                "ids": links.id_conflicts,
                "records": links.id_conflict_records,
                "examples": links.id_examples,
            },
        },
        "links": links.summary(),
        "held_out": {"val": cfg.val_fraction > 0, "test": cfg.test_fraction > 0},
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
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise DataError(f"--output_dir {output_dir} is a file, not a folder; pass a folder")
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


_OUR_ENTRY = re.compile(r"site-\d+|test\.json")  # what a previous run may leave that is now stale


def _stale_entries(output_dir: str, keep: set[str]) -> list[str]:
    """Entries a previous run's manifest lists that this run does not write (a ``test.json`` when
    ``--test_fraction`` is now 0, ``site-5`` after ``--num_sites`` went from 5 to 3): left in place
    they would mix old records, possibly this run's test records, into a job.
    """
    try:
        with open(os.path.join(output_dir, "manifest.json"), encoding="utf-8") as f:
            old = json.load(f).get("files", {})
    except FileNotFoundError:
        return []
    except (OSError, ValueError, AttributeError) as e:
        print(f"Warning: the previous {output_dir}/manifest.json is unreadable ({e}); stale shards are kept")
        return []
    tops = {rel.split("/", 1)[0] for rel in old if isinstance(rel, str)}
    return sorted(
        t for t in tops - keep if _OUR_ENTRY.fullmatch(t) and os.path.lexists(os.path.join(output_dir, t))
    )


class InterruptedAfterPublish(KeyboardInterrupt):
    """Ctrl-C came while the outputs were being moved into place: they were, completely."""


@contextlib.contextmanager
def _interrupt_deferred() -> Iterator[None]:
    """Hold Ctrl-C back while the outputs are moved into place, then raise it: an interrupted run
    leaves the old output set or the new one, not a mix.  (Only the main thread can set handlers.)
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
    if pending:
        raise InterruptedAfterPublish


def _publish(stage: str, cfg: PrepareDataConfig, written: list[str]) -> None:
    """Move the shards into ``--output_dir``, drop what an earlier run left that is now stale, and
    move the manifest last (its presence marks a complete set).
    """
    with _interrupt_deferred():
        stale = _stale_entries(cfg.output_dir, set(written))
        publish(stage, cfg.output_dir, written)
        for name in stale:
            path = os.path.join(cfg.output_dir, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
        if stale:
            print(f"Removed {', '.join(stale)} left in {cfg.output_dir} by an earlier run")
        publish(stage, cfg.output_dir, ["manifest.json"])


def write_outputs(
    cfg: PrepareDataConfig,
    source: str,
    pool: Pool,
    split: Split,
    stage: str,
    links: Links | None = None,
    image_root: str = "",
) -> dict:
    """Write every shard and the manifest into ``stage``, then move them into ``cfg.output_dir``.

    Returns the manifest.  A full disk raises :class:`DataError` naming the file being written.
    """
    targets = shard_files(split, cfg)
    _check_free_space(stage, int(sum(pool.lengths[i].sum() for i in targets.values())))
    files, current = {}, "manifest.json"
    try:
        with open(source, "rb") as src:
            for rel, indices in targets.items():
                current = rel
                os.makedirs(os.path.dirname(os.path.join(stage, rel)), exist_ok=True)
                files[rel] = write_json_array(src.fileno(), pool, indices, os.path.join(stage, rel))
        current = "manifest.json"
        manifest = build_manifest(cfg, source, pool, split, files, links, image_root)
        atomic_write_json(os.path.join(stage, current), manifest)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DataError(
                f"disk full while writing {os.path.join(cfg.output_dir, current)}; nothing was published. "
                "Free some space or pass another --output_dir"
            ) from None
        raise
    written = [f"site-{i}" for i in range(1, cfg.num_sites + 1)]
    _publish(stage, cfg, written + (["test.json"] if "test.json" in files else []))
    return manifest
