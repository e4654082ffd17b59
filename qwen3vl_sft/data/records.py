"""PubMedVision-format records: the schema, validation (skip reasons), ``<image>`` placeholders, image paths.

A record looks like::

    {"id": "pmc_123", "image": ["images/pmc_123.jpg"],
     "conversations": [{"from": "human", "value": "<image>\\nWhat does the CT show?"},
                       {"from": "gpt", "value": "An axial slice of the chest ..."}],
     "modality": "Computed Tomography", "body_part": "Chest"}

Reading the files (a JSON array or JSON lines, streamed with byte spans) is :mod:`.json_scan`'s job;
this module says what a record is and which ones are skipped, and why.  Errors a user can fix raise
:class:`~qwen3vl_sft.errors.DataError` with a one-line message.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from typing import Any

from ..errors import DataError

PLACEHOLDER = "<image>"

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
