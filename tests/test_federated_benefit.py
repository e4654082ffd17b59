"""The federated-benefit experiment: the non-IID split, step accounting, table and targets, and one
end-to-end run at toy size (the default run itself, experiments/federated_benefit.py, takes ~10 min).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import pytest
from ports import free_port_base

from experiments import federated_benefit as fb
from qwen3vl_sft.config import TrainConfig
from qwen3vl_sft.data import synthetic
from qwen3vl_sft.data.synthetic import QUADRANTS


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


def expected_quadrants(parts) -> set[str]:
    return {QUADRANTS[q] for part in parts for q in synthetic.BODY_PART_QUADRANTS[part]}


def test_default_split_gives_each_site_one_body_part_two_answers_and_test_all(default_data, tmp_path):
    exp = experiment(tmp_path)
    manifest, coverage = fb.split_data(exp, default_data, tmp_path / "data")

    assert (exp.split, exp.num_sites) == ("body_part", 6)
    assert manifest["config"]["seed"] == exp.data_seed and fb.coverage_problems(coverage) == []
    assert set(QUADRANTS) <= coverage["test"]
    for site, counts in manifest["sites"].items():
        (part,) = counts["train"]["by_body_part"]
        assert site_quadrants(coverage, site) == expected_quadrants([part])
    assert fb.format_coverage(coverage, manifest).count("never sees: ") == 6


def test_three_sites_search_a_split_seed_until_no_site_sees_every_answer(default_data, tmp_path):
    exp = experiment(tmp_path, "--num_sites", "3")
    manifest, coverage = fb.split_data(exp, default_data, tmp_path / "data")
    assert fb.coverage_problems(coverage) == [] and set(QUADRANTS) <= coverage["test"]
    for site, counts in manifest["sites"].items():
        parts = counts["train"]["by_body_part"]
        assert len(parts) == 2 and site_quadrants(coverage, site) == expected_quadrants(parts)
    # split seed 0 pairs complementary body parts (a site sees all four answers); the search moves on
    assert manifest["config"]["seed"] == 1


def test_modality_split_is_reported_as_unable_to_show_the_benefit(default_data, tmp_path):
    exp = experiment(tmp_path, "--split", "modality", "--num_sites", "3")
    manifest, coverage = fb.split_data(exp, default_data, tmp_path / "data")
    assert manifest["config"]["seed"] == exp.data_seed  # no seed search: quadrants do not follow modality
    assert fb.coverage_problems(coverage) == [f"site-{i} sees every location answer" for i in (1, 2, 3)]


def test_a_split_with_fewer_sites_leaves_no_stale_site_folder(default_data, tmp_path):
    fb.split_data(experiment(tmp_path), default_data, tmp_path / "data")
    fb.split_data(experiment(tmp_path, "--num_sites", "3"), default_data, tmp_path / "data")
    assert sorted(p.name for p in (tmp_path / "data").glob("site-*")) == ["site-1", "site-2", "site-3"]


def test_union_holds_every_site_record_once(default_data, tmp_path):
    fb.split_data(experiment(tmp_path), default_data, tmp_path / "data")
    union = json.loads(fb.write_union(tmp_path / "data", 6).read_text())
    sites = [json.loads((tmp_path / "data" / f"site-{i}" / "train.json").read_text()) for i in range(1, 7)]
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
        return {"model": model, "kind": kind, "steps": steps, "accuracy": acc, "loss": 0.1234567, "rouge_l": 0.5,
                "ceiling": 0.55 if kind == "local" else None, "train_seconds": 12.4 if kind != "base" else 0.0}  # fmt: skip

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


def test_table_is_aligned_with_percent_accuracy_and_ceilings_for_local_models_only():
    lines = fb.format_table(rows(0.955, 1.0, 0.5)).splitlines()
    assert lines[0].split() == ["model", "steps", "accuracy", "ceiling", "loss", "ROUGE-L", "train", "s"]
    assert len({len(line) for line in lines}) == 1  # every column right-aligned to the same width
    assert lines[1].split() == ["base", "0", "0.0%", "-", "0.1235", "0.5000", "-"]
    assert lines[2].split() == ["local-site-1", "400", "50.0%", "55.0%", "0.1235", "0.5000", "12"]
    assert lines[-1].split() == ["fedavg", "3x5x80", "95.5%", "-", "0.1235", "0.5000", "12"]


def test_ceiling_is_the_share_of_test_answers_a_site_trained_on(write_records, tmp_path):
    def record(answer):
        return {"id": answer, "image": [], "conversations": [
            {"from": "human", "value": "q"}, {"from": "gpt", "value": answer},
            {"from": "human", "value": "q2"}, {"from": "gpt", "value": "CT"}]}  # fmt: skip

    write_records(
        [record(a) for a in ("upper left", "upper left", "lower right", "the first image")], "test.json"
    )
    coverage = {"site-1": {"upper left", "CT"}, "site-2": {"lower right", "the first image"}, "test": set()}
    assert fb.seen_answer_ceilings(tmp_path, coverage) == {"local-site-1": 0.5, "local-site-2": 0.5}


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


@pytest.mark.slow
def test_a_toy_run_trains_every_arm_evaluates_all_and_exits_1_on_missed_targets(
    tiny_model_dir, tmp_path, capfd
):
    shutil.copytree(tiny_model_dir, tmp_path / "qwen3-vl-tiny")  # skip the 12 s build
    flags = ["--work_dir", str(tmp_path), "--split", "modality", "--num_sites", "2", "--num_rounds", "1",
             "--max_steps", "3", "--num_records", "120", "--max_new_tokens", "4",
             "--master_port_base", str(free_port_base(2))]  # fmt: skip

    assert fb.main(flags) == 1  # 3 steps cannot reach 90 %: the exit code says a target was missed

    out = capfd.readouterr().out
    assert "warning: site-1 sees every location answer" in out  # a modality split cannot show the benefit
    assert "[MISSED] FedAvg accuracy >= 90%" in out
    result = json.loads((tmp_path / "results.json").read_text())
    rows = {row["model"]: row for row in result["rows"]}
    assert list(rows) == ["base", "local-site-1", "local-site-2", "centralised", "fedavg"]
    assert [row["steps"] for row in rows.values()] == ["0", "3", "3", "6", "2x1x3"]
    assert all(0 < rows[f"local-site-{i}"]["ceiling"] <= 1 for i in (1, 2))
    assert all(rows[m]["ceiling"] is None for m in ("base", "centralised", "fedavg"))
    for model in ("local-site-1", "local-site-2", "centralised", "fedavg"):
        assert rows[model]["loss"] < rows["base"]["loss"], model  # every arm trained the model it reports
        assert rows[model]["train_seconds"] > 0
    assert "train_runtime" in (tmp_path / "experiment.log").read_text()  # training logs, not the console
    assert "train_runtime" not in out
