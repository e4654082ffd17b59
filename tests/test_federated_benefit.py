"""The federated-benefit experiment's own logic: the non-IID split, step accounting, table and targets.

Nothing here trains: the experiment itself (experiments/federated_benefit.py) takes minutes.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from experiments import federated_benefit as fb
from qwen3vl_sft import synthetic
from qwen3vl_sft.config import TrainConfig
from qwen3vl_sft.synthetic import QUADRANTS


@pytest.fixture(scope="module")
def default_data(tmp_path_factory):
    """The experiment's synthetic set with its default flags (2000 records, each body part showing
    lesions in two quadrants only)."""
    out = tmp_path_factory.mktemp("fb") / "synth"
    return synthetic.generate(out, fb.synthetic_spec(fb.ExperimentConfig()))


def experiment(tmp_path, *flags: str) -> fb.ExperimentConfig:
    exp, _ = fb.parse_args(["--work_dir", str(tmp_path), *flags])
    return exp


def site_quadrants(coverage: dict[str, set[str]], site: str) -> set[str]:
    return coverage[site] & set(QUADRANTS)


def test_default_split_leaves_every_site_without_some_answer_and_test_with_all(default_data, tmp_path):
    exp = experiment(tmp_path)
    manifest, coverage = fb.split_data(exp, default_data, tmp_path / "data")

    assert (exp.split, exp.num_sites) == ("body_part", 3)
    assert fb.coverage_problems(coverage) == []
    assert set(QUADRANTS) <= coverage["test"]
    for site, counts in manifest["sites"].items():
        parts = counts["train"]["by_body_part"]
        expected = {QUADRANTS[q] for part in parts for q in synthetic.BODY_PART_QUADRANTS[part]}
        assert len(parts) == 2 and site_quadrants(coverage, site) == expected and len(expected) == 3
    assert fb.format_coverage(coverage, manifest).count("never sees: ") == 3
    # the search starts at --data_seed and stops at the first good split
    assert exp.data_seed <= manifest["config"]["seed"] < exp.data_seed + fb.SPLIT_SEED_TRIES


def test_six_sites_hold_one_body_part_and_two_answers_each(default_data, tmp_path):
    manifest, coverage = fb.split_data(experiment(tmp_path, "--num_sites", "6"), default_data, tmp_path / "d")
    assert manifest["config"]["seed"] == 0 and fb.coverage_problems(coverage) == []
    for site, counts in manifest["sites"].items():
        (part,) = counts["train"]["by_body_part"]
        assert site_quadrants(coverage, site) == {QUADRANTS[q] for q in synthetic.BODY_PART_QUADRANTS[part]}


def test_modality_split_is_reported_as_unable_to_show_the_benefit(default_data, tmp_path):
    exp = experiment(tmp_path, "--split", "modality")
    manifest, coverage = fb.split_data(exp, default_data, tmp_path / "data")
    assert manifest["config"]["seed"] == exp.data_seed  # no seed search: quadrants do not follow modality
    assert fb.coverage_problems(coverage) == [f"site-{i} sees every location answer" for i in (1, 2, 3)]


def test_a_split_with_fewer_sites_leaves_no_stale_site_folder(default_data, tmp_path):
    fb.split_data(experiment(tmp_path, "--num_sites", "6"), default_data, tmp_path / "data")
    fb.split_data(experiment(tmp_path), default_data, tmp_path / "data")
    assert sorted(p.name for p in (tmp_path / "data").glob("site-*")) == ["site-1", "site-2", "site-3"]


def test_union_holds_every_site_record_once(default_data, tmp_path):
    fb.split_data(experiment(tmp_path), default_data, tmp_path / "data")
    union = json.loads(fb.write_union(tmp_path / "data", 3).read_text())
    sites = [json.loads((tmp_path / "data" / f"site-{i}" / "train.json").read_text()) for i in (1, 2, 3)]
    ids = [r["id"] for records in sites for r in records]
    assert [r["id"] for r in union] == ids and len(set(ids)) == len(ids)


def test_step_plan_gives_local_what_its_site_trains_and_centralised_what_all_sites_train():
    plan = fb.StepPlan(sites=3, rounds=5, steps_per_round=80)
    assert plan.local_per_site == 400
    assert plan.centralised == 1200 == plan.sites * plan.local_per_site
    assert [plan.label(k) for k in ("base", "local", "centralised", "fedavg")] == [
        "0",
        "400",
        "1200",
        "3x5x80",
    ]


def test_train_flags_default_to_the_experiment_values_and_explicit_flags_win(tmp_path):
    _, train = fb.parse_args(["--work_dir", str(tmp_path)])
    assert train.learning_rate == fb.EXPERIMENT_TRAIN["learning_rate"] != TrainConfig().learning_rate
    assert train.max_steps == fb.EXPERIMENT_TRAIN["max_steps"]
    assert train.per_device_train_batch_size == fb.EXPERIMENT_TRAIN["per_device_train_batch_size"]
    _, train = fb.parse_args(["--learning_rate", "5e-4", "--max_steps", "7"])
    assert (train.learning_rate, train.max_steps) == (5e-4, 7)


def rows(fedavg: float, central: float, *local: float) -> list[dict]:
    def row(model, kind, steps, acc):
        return {"model": model, "kind": kind, "steps": steps, "accuracy": acc, "loss": 0.1234567,
                "rouge_l": 0.5, "train_seconds": 12.4 if kind != "base" else 0.0}  # fmt: skip

    out = [row("base", "base", "0", 0.0)]
    out += [row(f"local-site-{i}", "local", "400", a) for i, a in enumerate(local, start=1)]
    return out + [
        row("centralised", "centralised", "1200", central),
        row("fedavg", "fedavg", "3x5x80", fedavg),
    ]


def test_targets_met_and_missed():
    assert [t["met"] for t in fb.check_targets(rows(0.95, 0.99, 0.5, 0.6))] == [True, True, True]
    missed = fb.check_targets(rows(0.89, 1.0, 0.61, 0.2))
    assert [t["met"] for t in missed] == [False, False, False]
    assert missed[1]["value"] == 0.61 and missed[2]["value"] == pytest.approx(0.89)
    assert [t["met"] for t in fb.check_targets(rows(math.nan, 0.9, 0.5))] == [False, True, False]
    assert "[MISSED] FedAvg accuracy >= 90%: 89.0%" in fb.format_targets(missed)


def test_table_is_aligned_with_percent_accuracy():
    lines = fb.format_table(rows(0.955, 1.0, 0.5)).splitlines()
    assert lines[0].split() == ["model", "steps", "accuracy", "loss", "ROUGE-L", "train", "s"]
    assert len({len(line) for line in lines}) == 1  # every column right-aligned to the same width
    assert lines[1].split() == ["base", "0", "0.0%", "0.1235", "0.5000", "-"]
    assert lines[-1].split() == ["fedavg", "3x5x80", "95.5%", "0.1235", "0.5000", "12"]


def test_results_json_has_no_nan():
    text = json.dumps(fb.json_safe({"rows": [{"accuracy": math.nan, "loss": 1.0}]}), allow_nan=False)
    assert json.loads(text) == {"rows": [{"accuracy": None, "loss": 1.0}]}


def test_quiet_sends_this_process_and_its_children_to_the_log(tmp_path, capfd):
    log = tmp_path / "experiment.log"
    with fb.quiet(log):
        print("from python")
        subprocess.run(
            [sys.executable, "-c", "import sys; print('from a child', file=sys.stderr)"], check=True
        )
    print("after")
    assert log.read_text().splitlines() == ["from python", "from a child"]
    assert capfd.readouterr().out == "after\n"
