"""Byte spans of the records in a PubMedVision ``.json`` array or ``.jsonl`` file, streamed in chunks.

:func:`scan_records` reads a file of any size in a few chunks of memory and reports where each record's
bytes lie, so ``prepare_data.py`` can copy records into shards without re-serialising them;
:func:`split_points` cuts a large file into parts that separate processes scan in parallel.
:func:`iter_records` / :func:`load_records` are the plain readers the training data loader uses.
Files are a JSON array (``.json``) or one record per line (``.jsonl``); the format is detected from
the first character, a UTF-8 BOM is tolerated.  Malformed JSON raises
:class:`~qwen3vl_sft.errors.DataError` naming the file, line, column and offset.
"""

from __future__ import annotations

import codecs
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from json.decoder import scanstring
from typing import BinaryIO

from ..errors import DataError
from .records import first_human_turn

# JSON-escaped text inserted in front of a question per missing image ("<image>" then a newline).
_PLACEHOLDER_JSON = b"<image>\\n"
_CHUNK_BYTES = 1 << 20  # 1 MiB: per-chunk overhead vanishes, and decoding stays in the CPU cache
_WS = re.compile(r"[ \t\n\r]*")
_SEP = re.compile(r"[ \t\n\r]*,[ \t\n\r]*")
_COLON_QUOTE = re.compile(r'[ \t\n\r]*:[ \t\n\r]*"')
_NO_STOP = 1 << 62  # "read to the end" as a byte offset, so the hot loop compares ints only
_MIN_SPLIT_BYTES = 1 << 24  # smaller files are read by one process: forking would cost more


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

        Memory stays at a few chunks whatever the file size.  :func:`iter_records` / :func:`load_records` are the plain readers the training data loader uses.
    Files are a JSON array (``.json``) or one record per line (``.jsonl``); the format is detected from
    the first character, a UTF-8 BOM is tolerated.  Malformed JSON raises :class:`DataError`
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
