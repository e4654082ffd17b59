"""Fake ``qwenvl.data``: the registry of named data sets.

Contract reproduced: ``data_dict`` maps a name to ``{"annotation_path": json/jsonl file, "data_path":
folder media paths are relative to}``; ``data_list(names)`` returns copies of the entries with a
``sampling_rate``, taken from a ``%N`` suffix of the name (N percent) or 1.0.
"""

from __future__ import annotations

import re

data_dict: dict[str, dict[str, str]] = {
    "example_set": {"annotation_path": "/nonexistent/annotations.json", "data_path": ""},
}

_PERCENT_SUFFIX = re.compile(r"%(\d+)$")


def data_list(dataset_names: list[str]) -> list[dict]:
    configs = []
    for full_name in dataset_names:
        match = _PERCENT_SUFFIX.search(full_name)
        name = _PERCENT_SUFFIX.sub("", full_name)
        if name not in data_dict:
            raise ValueError(f"fake qwenvl.data: no data set registered as {name!r}")
        rate = int(match.group(1)) / 100.0 if match else 1.0
        configs.append({**data_dict[name], "sampling_rate": rate})
    return configs
