"""The job -> site contract: what job.py writes into each site's command line, client.py parses back
unchanged (config.to_flags <-> config.parse with client.py's classes). Fast: no NVFlare, no model."""

from __future__ import annotations

import dataclasses
import shlex
import typing

import pytest

from qwen3vl_sft.config import SITE_CONFIGS, DataConfig, JobConfig, ModelConfig, TrainConfig, parse, to_flags
from qwen3vl_sft.fl import job as fl_job


def other_value(cls: type, f: dataclasses.Field):
    """A value of field ``f`` that is not its default and that its flag can carry."""
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    kind = typing.get_type_hints(cls)[f.name]
    choices = typing.get_args(kind) if typing.get_origin(kind) is typing.Literal else ()
    if choices:
        return next(c for c in choices if c != default)
    if isinstance(default, bool):
        return not default
    if isinstance(default, int):
        return default + 3
    if isinstance(default, float):
        return default * 2 + 0.25
    if isinstance(default, str):
        return f"{default}-x" if default else f"value-of-{f.name}"
    return None  # a field whose type has no single flag value (None / list): left at its default


def all_changed(cls: type):
    values = {f.name: other_value(cls, f) for f in dataclasses.fields(cls)}
    return cls(**{name: value for name, value in values.items() if value is not None})


@pytest.mark.parametrize("cls", SITE_CONFIGS, ids=lambda c: c.__name__)
def test_every_field_survives_the_flags(cls):
    changed = all_changed(cls)
    carried = [f.name for f in dataclasses.fields(cls) if getattr(changed, f.name) != getattr(cls(), f.name)]
    assert carried, f"{cls.__name__}: nothing to carry"
    (parsed,) = parse((cls,), to_flags(changed))
    assert parsed == changed


def test_defaults_write_no_flags_and_parse_back_to_defaults():
    configs = tuple(cls() for cls in SITE_CONFIGS)
    assert to_flags(*configs) == []
    assert parse(SITE_CONFIGS, []) == configs


def test_a_sites_train_args_parse_into_the_jobs_configs(shards, tmp_path):
    """site_configs -> shlex -> client.py's parse: the job's configs, with only the site's own paths and
    the site-side settings job.py sets (output folder, no tracking, thread share) replaced."""
    job = JobConfig(num_sites=2, data_dir=str(shards), workspace=str(tmp_path / "ws"))
    model = ModelConfig(model_name_or_path=str(tmp_path), lora=True, lora_r=4, tune_mm_vision=True)
    data = DataConfig(max_pixels=4096, val_generate_samples=3)
    train = TrainConfig(learning_rate=3e-4, max_steps=7, seed=11, torch_threads=1)
    backend, exchange = SITE_CONFIGS[3](), SITE_CONFIGS[4](compression="int8")
    per_site = fl_job.site_configs(job, model, data, train, backend, exchange)
    assert sorted(per_site) == ["site-1", "site-2"]
    for site, config in per_site.items():
        got = parse(SITE_CONFIGS, shlex.split(config["train_args"]))
        want_data = dataclasses.replace(
            data, data_path=str(shards / site / "train.json"), eval_data_path=str(shards / site / "val.json")
        )
        want_train = dataclasses.replace(train, output_dir="qwen3vl_outputs", report_to="none")
        assert got == (model, want_data, want_train, backend, exchange)
