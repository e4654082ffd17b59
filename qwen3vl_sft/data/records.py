"""PubMedVision-format records: loading, validation, ``<image>`` placeholders and image paths.

A record looks like::

    {"id": "pmc_123", "image": ["images/pmc_123.jpg"],
     "conversations": [{"from": "human", "value": "<image>\\nWhat does the CT show?"},
                       {"from": "gpt", "value": "An axial slice of the chest ..."}],
     "modality": "Computed Tomography", "body_part": "Chest"}

Files are a JSON array (``.json``) or one record per line (``.jsonl``); the format is detected from
the first character, a UTF-8 BOM is tolerated.  :func:`scan_records` streams a file in chunks and
reports each record's byte span, so ``prepare_data.py`` can copy records into shards without holding
the 760 MB file in memory; :func:`iter_records` / :func:`load_records` are the plain readers used by
the training data loader.  Errors a user can fix raise :class:`DataError` with a one-line message.
"""

from __future__ import annotations

import codecs
import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from json.decoder import scanstring
from typing import Any, BinaryIO

PLACEHOLDER = "<image>"
# JSON-escaped text inserted in front of a question per missing image ("<image>" then a newline).
_PLACEHOLDER_JSON = b"<image>\\n"
_CHUNK_BYTES = 1 << 20  # 1 MiB: per-chunk overhead vanishes, and decoding stays in the CPU cache
_WS = re.compile(r"[ \t\n\r]*")
_SEP = re.compile(r"[ \t\n\r]*,[ \t\n\r]*")
_COLON_QUOTE = re.compile(r'[ \t\n\r]*:[ \t\n\r]*"')
_NO_STOP = 1 << 62  # "read to the end" as a byte offset, so the hot loop compares ints only
_MIN_SPLIT_BYTES = 1 << 24  # smaller files are read by one process: forking would cost more

# Reasons a record is skipped (counted, not fatal); the manifest reports them under these names.
# One rule for prepare_data.py and the training loader (both call :func:`inspect_record`):
#   not_an_object / no_conversations / malformed_turn (a turn that is not {"from", "value": str}),
#   unknown_role (a "from" other than human / gpt: it would reach the chat template as is),
#   no_human_turn / no_gpt_turn, answer_without_question (a gpt turn with no human turn since the
#   previous answer, e.g. a conversation opening with the assistant: it would be trained as an answer
#   to nothing), empty_answer (blank gpt value: trains the model to say nothing), empty_question (a
#   human turn with neither text nor an image), placeholder_in_answer ("<image>" inside a gpt turn:
#   the image would be fed as the model's own output), empty_image_list, too_many_placeholders,
#   image_outside_root, missing_image.  A trailing question without an answer is kept: nothing in it
#   is supervised, and the answers before it are still good.
SKIP_REASONS = (
    "not_an_object",
    "no_conversations",
    "malformed_turn",
    "unknown_role",
    "no_human_turn",
    "no_gpt_turn",
    "answer_without_question",
    "empty_answer",
    "empty_question",
    "placeholder_in_answer",
    "empty_image_list",
    "too_many_placeholders",
    "image_outside_root",
    "missing_image",
)


class DataError(ValueError):
    """A problem with the user's data or flags, reported as one line (no traceback)."""


# --------------------------------------------------------------------------- validation & placeholders


def image_list(record: dict) -> list[str]:
    """The record's image paths as a list (a single string is accepted as one image)."""
    images = record.get("image")
    if isinstance(images, str):
        return [images]
    return images if isinstance(images, list) else []


def first_human_turn(record: dict) -> int:
    """Index of the first ``human`` turn in ``conversations``, or -1."""
    for i, turn in enumerate(record.get("conversations") or ()):
        if isinstance(turn, dict) and turn.get("from") == "human":
            return i
    return -1


def inspect_record(record: Any) -> tuple[str | None, int]:
    """``(why the record cannot be trained on, or None; how many <image> placeholders it lacks)``.

    One pass over the record (this runs 650 k times in ``prepare_data.py``).  The reason is one of
    :data:`SKIP_REASONS`; image files are not looked at here (see :class:`ImageIndex`).
    """
    if not isinstance(record, dict):
        return "not_an_object", 0
    turns = record.get("conversations")
    if not turns or not isinstance(turns, list):
        return "no_conversations", 0
    reason, placeholders, blank_questions = _check_turns(turns)
    if reason:
        return reason, 0
    images = image_list(record)
    if not images or not all(isinstance(p, str) and p for p in images):
        return "empty_image_list", 0
    if placeholders > len(images):  # a spare placeholder would show which image? not repairable
        return "too_many_placeholders", 0
    missing = len(images) - placeholders
    # Missing placeholders go into the first human turn, so a blank first question still shows an image;
    # any other blank question asks nothing.
    if any(i > 0 for i in blank_questions) or (blank_questions[:1] == [0] and not missing):
        return "empty_question", 0
    return None, missing


def _check_turns(turns: list) -> tuple[str | None, int, list[int]]:
    """(skip reason or None, <image> count in human turns, indices among the human turns of those
    with neither text nor an image) for a non-empty ``conversations`` list.
    """
    humans = answers = placeholders = 0
    blank: list[int] = []
    problem = None  # the first answer-level problem; structural ones return at once
    asked = False  # a human turn came since the last answer
    for turn in turns:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            return "malformed_turn", 0, blank
        role, value = turn.get("from"), turn["value"]
        if role == "human":
            count = value.count(PLACEHOLDER)
            if not count and (not value or value.isspace()):
                blank.append(humans)
            placeholders += count
            humans += 1
            asked = True
        elif role == "gpt":
            if problem is None:
                if not asked:
                    problem = "answer_without_question"
                elif not value or value.isspace():
                    problem = "empty_answer"
                elif PLACEHOLDER in value:
                    problem = "placeholder_in_answer"
            answers += 1
            asked = False
        else:
            return "unknown_role", 0, blank
    if not humans or not answers:
        return ("no_gpt_turn" if humans else "no_human_turn"), 0, blank
    return problem, placeholders, blank


def check_record(record: Any) -> str | None:
    """Why ``record`` cannot be trained on (one of :data:`SKIP_REASONS`), or None if it can."""
    return inspect_record(record)[0]


def missing_placeholders(record: dict) -> int:
    """How many ``<image>`` placeholders must be added so that there is one per image (0 for a
    record that fails :func:`check_record`).
    """
    return inspect_record(record)[1]


def ensure_image_placeholders(record: dict) -> dict:
    """Return ``record`` with one ``<image>`` per image, adding missing ones to the first human turn.

    Missing placeholders are prepended as ``"<image>\\n"`` each (the Qwen-VL single/multi-image
    format), so ``"Q"`` with two images becomes ``"<image>\\n<image>\\nQ"``.  The input is not
    modified; it is returned as is when nothing is missing, or when it fails :func:`check_record`
    (there may be no human turn to put them in).  A string ``image`` becomes a list.
    """
    missing = missing_placeholders(record)
    if not missing and not isinstance(record.get("image"), str):
        return record
    fixed = {**record, "image": image_list(record)}
    if missing:
        turns = list(record["conversations"])
        h = first_human_turn(record)
        turns[h] = {**turns[h], "value": "<image>\n" * missing + turns[h]["value"]}
        fixed["conversations"] = turns
    return fixed


def valid_records(records: Iterable[Any]) -> tuple[list[dict], Counter]:
    """Keep the records :func:`check_record` accepts (placeholders ensured); count the rest by reason."""
    kept, skipped = [], Counter()
    for record in records:
        reason = check_record(record)
        if reason:
            skipped[reason] += 1
        else:
            kept.append(ensure_image_placeholders(record))
    return kept, skipped


# --------------------------------------------------------------------------- image paths


def resolve_image_path(image_root: str, rel_path: str, record_id: Any = "?") -> str:
    """Absolute path of ``rel_path`` under ``image_root``; refuses paths that leave the root.

    The check is lexical (``..`` components, absolute paths elsewhere): a symlink placed inside the
    root by the data owner is trusted, a path written into a record is not.
    """
    root = os.path.abspath(image_root)
    native = rel_path.replace("\\", "/") if os.sep == "/" else rel_path
    full = os.path.normpath(os.path.join(root, native))
    if full != root and full.startswith(root.rstrip(os.sep) + os.sep):
        return full
    raise DataError(
        f"record {record_id}: image path {rel_path!r} points outside the image root {root}; "
        "image paths must be relative to --image_root (fix the record or the flag)"
    )


class ImageIndex:
    """Answers "does this image exist?" for many records with one directory listing per folder.

    A million ``os.stat`` calls take tens of seconds on network filesystems; listing ``images/`` once
    into a set and looking names up there takes about a second.  With ``check_exists=False`` only the
    confinement check is done (for preparing data on a machine without the images).
    """

    def __init__(self, image_root: str, check_exists: bool = True):
        self.root = os.path.abspath(image_root)
        self.check_exists = check_exists
        self._listings: dict[str, frozenset[str]] = {}

    def preload(self, folder: str = "images") -> None:
        """List ``folder`` now (PubMedVision keeps every image in ``images/``), e.g. before forking."""
        if self.check_exists:
            self._names_in(folder)

    def _names_in(self, folder: str) -> frozenset[str]:
        names = self._listings.get(folder)
        if names is None:
            try:
                names = frozenset(os.listdir(os.path.join(self.root, folder)))
            except (FileNotFoundError, NotADirectoryError):
                names = frozenset()  # every image in a missing folder is a missing image
            self._listings[folder] = names
        return names

    def _relative(self, path: str, record: dict) -> str:
        """``path`` relative to the root, normalised; DataError if it leaves the root."""
        full = resolve_image_path(self.root, path, record.get("id", "?"))
        return os.path.relpath(full, self.root).replace(os.sep, "/")

    def key(self, path: str, record: dict) -> str:
        """The name ``path`` (of a record :meth:`problem` accepted) has under the root, so that
        ``./images/a.jpg`` and ``images/a.jpg`` are recognised as one image.
        """
        return self._relative(path, record) if _needs_normalising(path) else path

    def problem(self, record: dict) -> str | None:
        """``"image_outside_root"``, ``"missing_image"`` or None for the images of ``record``."""
        images = record.get("image")
        for path in (images,) if isinstance(images, str) else images:
            if _needs_normalising(path):
                try:  # rare: a path that needs normalising; the common clean case skips normpath
                    path = self._relative(path, record)
                except DataError:
                    return "image_outside_root"
            if self.check_exists:
                folder, _, name = path.rpartition("/")
                names = self._listings.get(folder)
                if name not in (self._names_in(folder) if names is None else names):
                    return "missing_image"
        return None


def _needs_normalising(path: str) -> bool:
    """True for the rare path that is not already a clean relative name (the common case skips normpath)."""
    return path[0] in "/\\" or ".." in path or "\\" in path or "//" in path or "./" in path


# --------------------------------------------------------------------------- streaming reader
#
# Files are read in chunks decoded as Latin-1, not UTF-8: one character per byte, so every text index
# *is* a byte offset (no re-encoding to find where a record lies), and all JSON syntax is ASCII, so the
# parser sees exactly the structure it would see in UTF-8.  Only the *content* of strings with
# non-ASCII text differs: their UTF-8 bytes come out one character each ("\xc2\xb5m" for "µm").
# ``Scanned.raw`` is that fast view; ``Scanned.record`` decodes properly.  The UTF-8 validity of the
# file is still checked, chunk by chunk.


@dataclass(slots=True)
class Scanned:
    """One record read by :func:`scan_records`, with where its bytes are in the file."""

    raw: dict  # parsed from the Latin-1 view: structure and ASCII text exact, other text as raw bytes
    offset: int  # byte offset of the record's first byte in the file
    length: int  # byte length of the record's JSON text
    _text: str  # Latin-1 view of the chunk the record was parsed from (shared, not copied)
    _start: int  # index of the record in _text

    @property
    def ascii(self) -> bool:
        """True if the chunk holding the record is pure ASCII, so ``raw`` is exact (O(1) for a str)."""
        return self._text.isascii()

    @property
    def record(self) -> dict:
        """The record with all text correctly decoded."""
        if self._text.isascii():
            return self.raw
        span = self._text[self._start : self._start + self.length]
        return self.raw if span.isascii() else json.loads(span.encode("latin-1"))

    def placeholder_offset(self) -> int:
        """Byte offset, relative to the record, where missing ``<image>`` placeholders can be inserted
        into the raw JSON (just inside the opening quote of the first human turn's value); -1 if it
        cannot be located safely, in which case the record must be re-serialised instead.
        """
        at = _locate_first_human_value(self._text, self._start, self._start + self.length, self.raw)
        return at - self._start if at >= 0 else -1


def splice_placeholders(raw: bytes, at: int, count: int) -> bytes:
    """Insert ``count`` JSON-escaped ``"<image>\\n"`` at byte ``at`` of a record's raw JSON."""
    return raw[:at] + _PLACEHOLDER_JSON * count + raw[at:]


def _locate_first_human_value(text: str, start: int, end: int, record: dict) -> int:
    """Index just after the opening quote of the first human turn's value in ``text``, or -1.

    Walks the ``"value": "`` keys of the record in order (a quote inside a JSON string is escaped, so
    only real keys match) and decodes the literal after each: the first human turn's value is the
    one equal to it, after as many equal values as earlier turns have.
    """
    turns = record["conversations"]
    h = 0 if turns[0].get("from") == "human" else first_human_turn(record)
    value = turns[h]["value"]
    nth = sum(1 for t in turns[:h] if t["value"] == value) if h else 0
    key = text.find('"value"', start, end)
    while key >= 0:
        # ': "' is how json.dump writes it; other spacing goes through the regex
        at = key + 10 if text.startswith(': "', key + 7) else _value_start(text, key + 7)
        if at > 0 and _decodes_to(text, at, value):
            if nth == 0:
                return at
            nth -= 1
        key = text.find('"value"', key + 7, end)
    return -1


def _value_start(text: str, after_key: int) -> int:
    """Index after the opening quote if ``text[after_key:]`` is ``<blanks>:<blanks>"``, else -1."""
    m = _COLON_QUOTE.match(text, after_key)
    return m.end() if m else -1


def _decodes_to(text: str, at: int, value: str) -> bool:
    """True if the JSON string literal whose text starts at ``text[at]`` decodes to ``value``."""
    if text.startswith(value, at) and text.startswith('"', at + len(value)) and "\\" not in value:
        return True  # written without escapes: no backslash, so that quote really ends it
    try:
        return scanstring(text, at, True)[0] == value
    except json.JSONDecodeError:
        return False  # not a string literal after all


class _Reader:
    """A binary file as Latin-1 text, chunk by chunk, with the bookkeeping for error locations.

    ``text`` holds the unconsumed part; ``base`` is the file offset of ``text[0]``.
    """

    def __init__(self, f: BinaryIO, path: str, start: int = 0):
        self.f, self.path = f, path
        self.text, self.base, self.eof = "", start, False
        self._utf8 = codecs.getincrementaldecoder("utf-8")()  # validation only; output discarded
        f.seek(start)

    def more(self, keep_from: int) -> bool:
        """Drop ``text[:keep_from]`` and append the next chunk; False if the file was exhausted."""
        if self.eof:
            return False
        data = self.f.read(_CHUNK_BYTES)
        self._check_utf8(data)
        self.base += keep_from
        self.text = self.text[keep_from:] + data.decode("latin-1")
        self.eof = not data
        return True

    def _check_utf8(self, data: bytes) -> None:
        if data.isascii() and not self._utf8.getstate()[0]:
            return  # pure ASCII and no multi-byte character pending from the previous chunk
        try:
            self._utf8.decode(data, final=not data)
        except UnicodeDecodeError as e:
            where = self.base + len(self.text) + e.start - len(self._utf8.getstate()[0])
            raise DataError(f"{self.path} is not UTF-8 text near byte {where}: {e.reason}") from None

    def skip_ws(self, pos: int) -> int | None:
        """Index of the next non-blank character at or after ``pos`` (reading on); None at the end."""
        while True:
            pos = _WS.match(self.text, pos).end()
            if pos < len(self.text):
                return pos
            if not self.more(keep_from=pos):
                return None
            pos = 0

    def error(self, at: int, what: str) -> DataError:
        """A one-line error for ``text[at]``: file, line, column (in bytes), byte offset."""
        line = _lines_before(self.path, self.base) + self.text.count("\n", 0, at) + 1  # counted only now
        nl = self.text.rfind("\n", 0, at)
        col = f", column {at - nl}" if nl >= 0 else ""
        return DataError(f"malformed JSON in {self.path}: line {line}{col} (byte {self.base + at}): {what}")


def _after_record(r: _Reader, end: int) -> int | None:
    """Index of the record after the one ending at ``end``; None after the closing ``]``."""
    pos = r.skip_ws(end)
    if pos is None:
        raise r.error(len(r.text), "unterminated array (expected ',' or ']')")
    if r.text[pos] == "]":
        extra = r.skip_ws(pos + 1)
        if extra is not None:
            raise r.error(extra, "extra data after the closing ']'")
        return None
    if r.text[pos] != ",":
        raise r.error(pos, "expected ',' or ']' after a record")
    pos = r.skip_ws(pos + 1)
    if pos is None:
        raise r.error(len(r.text), "unterminated array (expected a record after ',')")
    return pos


class MisalignedSplit(Exception):
    """A split point from :func:`split_points` turned out not to be a record start (read sequentially)."""


def _lines_before(path: str, offset: int) -> int:
    """Newlines in the first ``offset`` bytes (only computed for an error message)."""
    count = 0
    with open(path, "rb") as f:
        while offset > 0:
            data = f.read(min(offset, _CHUNK_BYTES))
            if not data:
                break
            count, offset = count + data.count(b"\n"), offset - len(data)
    return count


def _scan_array(r: _Reader, pos: int, stop: int) -> Iterator[Scanned]:
    """Records of the JSON array whose ``[`` is at ``r.text[pos]``, up to byte ``stop``."""
    pos = r.skip_ws(pos + 1)
    if pos is None:
        raise r.error(len(r.text), "unterminated array (expected ']')")
    if r.text[pos] == "]":
        pos = _after_record(r, pos)  # empty array: only blanks may follow
    yield from _scan_items(r, pos, stop)


def _scan_items(r: _Reader, pos: int | None, stop: int) -> Iterator[Scanned]:
    """Array records from the one at ``r.text[pos]`` until one starts at byte ``stop`` or ``]``."""
    scan, sep = json.JSONDecoder().scan_once, _SEP.match
    while pos is not None:
        if r.base + pos >= stop:
            if r.base + pos != stop:
                raise MisalignedSplit(f"{r.path}: no record starts at byte {stop}")
            return
        text = r.text
        try:
            record, end = scan(text, pos)
        except (StopIteration, json.JSONDecodeError) as e:
            at, msg = (e.value, "Expecting value") if isinstance(e, StopIteration) else (e.pos, e.msg)
            # A record cut by the chunk end fails at (or a few characters before) the end, or in a
            # string that has not ended yet: read on and retry.  Anything else is a real error.
            cut = at >= len(text) - 16 or msg.startswith("Unterminated string")
            if not cut or not r.more(keep_from=pos):
                raise r.error(at, msg) from None
            pos = 0
            continue
        if type(record) is not dict:
            raise r.error(pos, f"expected a record object, found {type(record).__name__}")
        yield Scanned(record, r.base + pos, end - pos, text, pos)
        m = sep(text, end)  # fast path: ",<blanks>" followed by more text in this chunk
        pos = m.end() if m and m.end() < len(text) else _after_record(r, end)
    if stop != _NO_STOP:
        raise MisalignedSplit(f"{r.path}: the array ends before byte {stop}")


def _scan_lines(f: BinaryIO, path: str, offset: int, stop: int) -> Iterator[Scanned]:
    """Records of a JSON-lines file from byte ``offset`` (a line start) to ``stop``."""
    f.seek(offset)
    for line in f:
        if offset >= stop:
            return
        if not line.isascii():
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                where = f"line {_lines_before(path, offset) + 1} (byte {offset + e.start})"
                raise DataError(f"{path} is not UTF-8 text at {where}: {e.reason}") from None
        text = line.decode("latin-1")
        start, end = len(text) - len(text.lstrip()), len(text.rstrip())
        if start < end:
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                where = f"line {_lines_before(path, offset) + 1}, column {e.colno} (byte {offset + e.pos})"
                raise DataError(f"malformed JSON in {path}: {where}: {e.msg}") from None
            if type(record) is not dict:
                where = f"line {_lines_before(path, offset) + 1} (byte {offset + start})"
                raise DataError(f"malformed JSON in {path}: {where}: expected a record object")
            yield Scanned(record, offset + start, end - start, text, start)
        offset += len(line)


def _open_format(r: _Reader) -> tuple[str, int]:
    """``("lines" | "array", index of the first character)`` of a file, after any UTF-8 BOM."""
    r.more(keep_from=0)
    bom = 3 if r.text.startswith("\xef\xbb\xbf") else 0  # UTF-8 BOM: not part of the JSON
    pos = r.skip_ws(bom)
    if pos is None:
        raise DataError(f"{r.path} is empty: expected a JSON array of records or JSON lines")
    if r.text[pos] == "{":  # JSON lines, whatever the extension says
        return "lines", bom
    if r.text[pos] == "[":
        return "array", pos
    raise r.error(pos, "expected '[' (a JSON array of records) or '{' (JSON lines)")


def scan_records(path: str | os.PathLike, start: int = 0, stop: int | None = None) -> Iterator[Scanned]:
    """Stream the records of a ``.json`` array or JSON-lines file with their byte spans.

    Memory stays at a few chunks whatever the file size.  Malformed JSON raises :class:`DataError`
    naming the file, line, column and byte offset.  With ``start``/``stop`` from :func:`split_points`
    only the records beginning in ``[start, stop)`` are read (to read parts in parallel); a split
    point that is not a record start raises :class:`MisalignedSplit`.
    """
    path, stop = os.fspath(path), _NO_STOP if stop is None else stop
    with open(path, "rb") as f:
        r = _Reader(f, path)
        kind, pos = _open_format(r)
        if kind == "lines":
            yield from _scan_lines(f, path, max(pos, start), stop)
        elif start == 0:
            yield from _scan_array(r, pos, stop)
        else:
            r = _Reader(f, path, start)
            yield from _scan_items(r, r.skip_ws(0), stop)


def split_points(path: str | os.PathLike, parts: int) -> list[int]:
    """Up to ``parts`` byte offsets (the first is 0) at which :func:`scan_records` can start, splitting
    the file into parts of about equal size.  Files under 16 MiB are not split.
    """
    path = os.fspath(path)
    size = os.path.getsize(path)
    if parts < 2 or size < _MIN_SPLIT_BYTES:
        return [0]
    with open(path, "rb") as f:
        kind, _ = _open_format(_Reader(f, path))
        points = [0]
        for k in range(1, parts):
            f.seek(size * k // parts)
            window = f.read(_CHUNK_BYTES).decode("latin-1")
            at = _line_start(window) if kind == "lines" else _record_start(window)
            if at is not None and size * k // parts + at > points[-1]:
                points.append(size * k // parts + at)
    return points


def _line_start(window: str) -> int | None:
    nl = window.find("\n")
    return nl + 1 if 0 <= nl < len(window) - 1 else None


_RECORD_GAP = re.compile(r"\}[ \t\n\r]*,[ \t\n\r]*(?=\{)")


def _record_start(window: str) -> int | None:
    """Index of the first top-level record start in a window cut from the middle of a JSON array.

    A candidate ``{`` after ``},`` must parse as an object with ``conversations`` followed by ``,``
    or ``]``; a ``{`` inside a string or a nested turn does not.  The reader of the previous part
    confirms it by arriving exactly there (else :class:`MisalignedSplit`).
    """
    scan = json.JSONDecoder().scan_once
    for m in _RECORD_GAP.finditer(window):
        try:
            record, end = scan(window, m.end())
        except (StopIteration, json.JSONDecodeError):
            continue  # not a value start after all (or cut by the window end)
        after = _WS.match(window, end).end()
        if type(record) is dict and "conversations" in record and window[after : after + 1] in (",", "]"):
            return m.end()
    return None


def iter_records(path: str | os.PathLike) -> Iterator[dict]:
    """The records of a ``.json`` array or ``.jsonl`` file, streamed."""
    for scanned in scan_records(path):
        yield scanned.record


def load_records(path: str | os.PathLike) -> list[dict]:
    """All records of a ``.json`` array or ``.jsonl`` file (raises :class:`DataError` if malformed)."""
    return list(iter_records(path))
