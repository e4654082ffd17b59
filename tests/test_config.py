"""qwen3vl_sft.config: paths a job leaves for each machine to expand. Fast."""

from __future__ import annotations

import pytest

from qwen3vl_sft.config import (
    JOB_CONFIGS,
    BackendConfig,
    DataConfig,
    ModelConfig,
    PrepareDataConfig,
    parse,
    site_local_paths,
)
from qwen3vl_sft.errors import DataError


def test_site_local_paths_expand_variables_and_home_on_the_machine_that_reads_them(monkeypatch, tmp_path):
    monkeypatch.setenv("HOSPITAL_DATA", "/srv/data")
    monkeypatch.setenv("HOME", str(tmp_path))
    data = site_local_paths(DataConfig(data_path="$HOSPITAL_DATA/site-1/train.json",
                                       eval_data_path="${HOSPITAL_DATA}/site-1/val.json", image_root="~/images"))  # fmt: skip
    assert (data.data_path, data.eval_data_path) == (
        "/srv/data/site-1/train.json",
        "/srv/data/site-1/val.json",
    )
    assert data.image_root == str(tmp_path / "images")
    plain = ModelConfig(model_name_or_path="Qwen/Qwen3-VL-2B-Instruct")
    assert site_local_paths(plain) is plain  # hub ids and plain paths are left alone
    backend = site_local_paths(BackendConfig(qwen3vl_root="~/Qwen3-VL", qwen3vl_python="python3"))
    assert (backend.qwen3vl_root, backend.qwen3vl_python) == (str(tmp_path / "Qwen3-VL"), "python3")


def test_a_variable_this_machine_lacks_is_named(monkeypatch):
    monkeypatch.delenv("NOT_ON_THIS_SITE", raising=False)
    with pytest.raises(
        DataError, match=r"^--data_path \$NOT_ON_THIS_SITE/train.json: the variable is not set"
    ):
        site_local_paths(DataConfig(data_path="$NOT_ON_THIS_SITE/train.json"))


@pytest.mark.parametrize("flag", ["--num_sites", "--n_clients", "--num_clients"])
def test_every_site_count_flag_sets_num_sites_in_both_scripts(flag):
    # The seed README counted sites with --n_clients (job.py) and --num_clients (prepare_data.py).
    (job, *_) = parse(JOB_CONFIGS, [flag, "5"])
    (prepare,) = parse((PrepareDataConfig,), [flag, "5"])
    assert job.num_sites == prepare.num_sites == 5


def test_min_clients_is_an_alias_of_min_sites():
    assert parse(JOB_CONFIGS, ["--min_clients", "2"])[0].min_sites == 2
