"""Faults injected into the real federated job (NVFlare simulator, CPU, tiny model) and its persistor.

=============================================  ===============================================================
Fault                                          Test (how the fault is injected)
=============================================  ===============================================================
a site's training process SIGKILLed mid-round  test_a_site_killed_mid_round_is_left_out_and_the_job_finishes,
                                               test_the_logs_say_which_site_failed_and_when (this test SIGKILLs
                                               site-3's client.py once its log says it received round 0)
every site fails in one round                  test_every_site_failing_stops_the_job_and_keeps_the_last_model
                                               (tests/fault_hooks.DataOutage renames the image root away as
                                               round 1 goes out: every site fails, its process stays alive)
stopped after round k, restarted --resume      test_resume_continues_at_the_next_round_like_an_uninterrupted_run
kill while the global model is being saved     test_kill_while_saving_leaves_the_old_or_the_new_model (a real
                                               SIGKILL inside torch.save of the .pt / the HF shard write)
disk full while saving the global model        test_disk_full_while_saving_keeps_the_last_complete_files
a resumed run killed before its first save     test_a_crashed_resumed_run_can_be_resumed_again
fewer sites than --min_sites answer          test_too_few_sites_stop_the_job_without_saving
a site receives an empty global model          test_a_site_refuses_an_empty_global_model
secrets in the environment of a running job    test_secrets_in_the_environment_never_reach_the_workspace
server memory round over round                 bench/bench_server_memory.py (a figure, not a test)
=============================================  ===============================================================

Three simulator runs serve all the slow tests (module fixtures): A, 3 sites, site-3 killed in round 0;
B, 2 sites, all failing in round 1; C, B resumed. Sites 1 and 2 see the same data, seed, thread count
and rounds in A as in B+C, and site-3 never contributes to A, so C's final model must equal A's:
that is the uninterrupted run of the same seed. It is compared bit for bit (with ``--exchange weights``:
see EXCHANGE). This holds because
each site trains 8 samples a round: NVFlare sums results in arrival order in bf16
(WeightedAggregationHelper.add documents ulp-level differences between runs), and with power-of-two
weights that sum is exact whatever the order. With other weights, expect bf16-ulp differences
between runs. Everything else (seeded data order, one CPU thread per site, the schedule across rounds)
is deterministic.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fault_hooks import DataOutage, round_weights, save_round, standalone_persistor
from ports import free_port_base
from safetensors.torch import load_file
from sim_jobs import job_configs, run_sim_job

from qwen3vl_sft.config import ExchangeConfig, JobConfig, ModelConfig
from qwen3vl_sft.fl import resume

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent
SECRET = "wandb-test-secret-0123456789abcdef"
SAMPLES_PER_ROUND = 8  # 2 steps x 4: a power of two, so FedAvg's bf16 sum is order independent
# bf16 weights both ways: stateless messages, so a resumed run can equal an uninterrupted one bit for bit.
# With the update exchange (the default) a resumed run restarts the exchange state (the full global, no
# error-feedback residual; docs/exchange.md), and test_fl_job covers its failures and resume.
EXCHANGE = ExchangeConfig(exchange="weights")


# --------------------------------------------------------------------------- helpers


def configs(workspace: Path, data_dir: Path, model_dir: Path, num_sites: int, min_sites: int = 0, **data_kw):
    """Three rounds of two steps, one thread: a resumed run can equal an uninterrupted one bit for bit."""
    return job_configs(workspace, model_dir, data_dir, num_sites=num_sites, min_sites=min_sites,
                       num_rounds=3, max_steps=2, torch_threads=1, data_kw=data_kw)  # fmt: skip


def run_job(cfg, record_dir: Path, outage: DataOutage | None = None):
    return run_sim_job(*cfg, record_dir=record_dir, exchange=EXCHANGE, outage=outage)


class SiteKiller(threading.Thread):
    """SIGKILLs ``site``'s training process (client.py under torchrun) as soon as its log says it
    received round ``at_round``: it dies mid-round, as under the OOM killer. Only a process of this
    test's workspace (its working directory) is ever killed."""

    def __init__(self, workspace: Path, site: str, at_round: int):
        super().__init__(daemon=True)
        self.workspace, self.site = workspace, site
        self.marker = f"{site} round {at_round}: received"
        self.stop, self.killed_pid = threading.Event(), None

    def run(self) -> None:
        while not self.stop.wait(0.2):
            logs = list(self.workspace.glob(f"*/{self.site}/**/qwen3vl_client.log"))
            pid = self._worker_pid() if logs and self.marker in logs[0].read_text() else None
            if pid:
                os.kill(pid, signal.SIGKILL)
                self.killed_pid = pid
                return

    def _worker_pid(self) -> int | None:
        for entry in Path("/proc").iterdir():
            try:
                argv = (entry / "cmdline").read_bytes().decode().split("\0")
                cwd = os.readlink(entry / "cwd")
            except (OSError, ValueError):
                continue
            ours = cwd.startswith(f"{self.workspace}/") and f"/{self.site}/" in cwd
            if (
                ours and "custom/client.py" in argv and "torch.distributed.run" not in argv
            ):  # not the launcher
                return int(entry.name)
        return None


def app_server(job: JobConfig) -> Path:
    return Path(job.workspace) / job.job_name / "server" / "simulate_job" / "app_server"


def read_text(root: Path, pattern: str) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(root.glob(pattern)))


def records(record_dir: Path) -> dict[tuple[int, str], dict]:
    """(round, site) -> what RoundRecorder saw: rc, n_params, meta, and the tensors if any."""
    out = {}
    for path in record_dir.glob("round*-site-*.json"):
        rnd, site = path.stem.removeprefix("round").split("-", 1)
        record = json.loads(path.read_text())
        tensors = path.with_suffix(".safetensors")
        record["tensors"] = load_file(tensors) if tensors.is_file() else {}
        out[(int(rnd), site)] = record
    return out


def saved_model(job: JobConfig) -> dict:
    return torch.load(app_server(job) / "FL_global_model.pt", weights_only=True)


# --------------------------------------------------------------------------- the three simulator runs


@pytest.fixture(scope="module")
def killed_site_run(tiny_model_dir, shards, tmp_path_factory):
    """Run A: 3 sites, --min_sites 2, 3 rounds; site-3's process is SIGKILLed in round 0.
    WANDB_API_KEY is set in the job's environment (for the secrets test)."""
    root = tmp_path_factory.mktemp("killed_site")
    cfg = configs(root / "ws", shards, tiny_model_dir, num_sites=3, min_sites=2)
    killer = SiteKiller(root / "ws", "site-3", at_round=0)
    killer.start()
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("WANDB_API_KEY", SECRET)
            summary = run_job(cfg, root / "sent")
    finally:
        killer.stop.set()
    return SimpleNamespace(job=cfg[0], summary=summary, sent=records(root / "sent"), pid=killer.killed_pid)


@pytest.fixture(scope="module")
def stopped_and_resumed(tiny_model_dir, synth_dir, shards, tmp_path_factory):
    """Run B: 2 sites, 3 rounds, every site fails round 1 (image root gone) -> the job stops.
    Run C: the images are back, ``--resume`` continues the job. B's files are read before C runs
    (the simulator clears the job folder)."""
    root = tmp_path_factory.mktemp("stopped")
    images = root / "image_root"
    shutil.copytree(synth_dir, images)  # a private copy: the outage renames it
    cfg = configs(root / "ws", shards, tiny_model_dir, num_sites=2, image_root=str(images))
    job = cfg[0]
    with pytest.raises(RuntimeError, match="Simulation failed") as failure:
        run_job(cfg, root / "sent", outage=DataOutage(str(images), at_round=1))
    ws_job = Path(job.workspace) / job.job_name
    stopped = SimpleNamespace(
        error=str(failure.value), images=images, sent=records(root / "sent"), model=saved_model(job),
        state=json.loads((app_server(job) / "fl_state.json").read_text()),
        hf=load_file(app_server(job) / "global_model_hf" / "model.safetensors"),
        server_log=(ws_job / "server" / "log.txt").read_text(),
        client_logs=read_text(ws_job, "site-*/**/qwen3vl_client.log"),
    )  # fmt: skip
    os.rename(f"{images}.gone", images)
    resumed = (dataclasses.replace(job, resume=True, master_port_base=free_port_base(2)), *cfg[1:])
    start_round = resume.completed_rounds(resume.resume_checkpoint(resumed[0]))
    summary = run_job(resumed, root / "sent_resumed")
    resumed_run = SimpleNamespace(
        start_round=start_round, summary=summary, sent=records(root / "sent_resumed"), model=saved_model(job)
    )
    return SimpleNamespace(job=job, stopped=stopped, resumed=resumed_run)


# --------------------------------------------------------------------------- A: one site dies


@pytest.mark.slow
def test_a_site_killed_mid_round_is_left_out_and_the_job_finishes(killed_site_run):
    run = killed_site_run
    assert run.pid is not None, "site-3's training process was never found to kill"
    assert {(r["round"], r["site"]) for r in run.summary.rows} == {
        (r, s) for r in range(3) for s in ("site-1", "site-2")
    }
    for rnd in range(3):
        assert run.sent[(rnd, "site-3")]["rc"] == "EXECUTION_EXCEPTION"
        assert run.sent[(rnd, "site-3")]["n_params"] == 0  # nothing of the dead site reaches FedAvg
        for site in ("site-1", "site-2"):
            assert run.sent[(rnd, site)]["meta"]["NUM_STEPS_CURRENT_ROUND"] == SAMPLES_PER_ROUND
            # the results reached the server as files (the disk offload), in the simulator too
            assert run.sent[(rnd, site)]["arrived_as"] == ["_LazyRef"]
    final = saved_model(run.job)
    assert final["meta"]["round"] == 2
    one, two = run.sent[(2, "site-1")]["tensors"], run.sent[(2, "site-2")]["tensors"]
    assert sorted(final["model"]) == sorted(one)
    for name, tensor in final["model"].items():  # the mean of sites 1 and 2, exactly
        assert torch.equal(tensor, ((one[name].float() + two[name].float()) / 2).to(tensor.dtype)), name


@pytest.mark.slow
def test_the_logs_say_which_site_failed_and_when(killed_site_run):
    ws_job = Path(killed_site_run.job.workspace) / killed_site_run.job.job_name
    server_log = (ws_job / "server" / "log.txt").read_text()
    for rnd in range(3):
        line = f"round {rnd}: averaged 2 of 3 sites ['site-1', 'site-2']; left out (failed, died or sent no model): ['site-3']"
        assert line in server_log
    # The global leaves the server's memory early only where all 3 sites downloaded it: round 0 (site-3
    # died after receiving it). Later rounds the dead site downloads nothing, so it stays, as it must.
    assert server_log.count("every site (3) has downloaded the global") == 1
    site_log = (ws_job / "site-3" / "log.txt").read_text()  # NVFlare's log of the site, timestamped
    assert f"exitcode  : -9 (pid: {killed_site_run.pid})" in site_log and "SIGKILL" in site_log
    client_log = read_text(ws_job, "site-3/**/qwen3vl_client.log")
    assert "site-3 round 0: received" in client_log and "site-3 round 0: {" not in client_log


@pytest.mark.slow
def test_secrets_in_the_environment_never_reach_the_workspace(killed_site_run):
    """Logs, configs and models of a job run with WANDB_API_KEY set hold no trace of its value."""
    ws = Path(killed_site_run.job.workspace)
    files = [p for p in ws.rglob("*") if p.is_file()]
    assert len(files) > 20 and any(p.name == "log.txt" for p in files)
    assert [p for p in files if SECRET.encode() in p.read_bytes()] == []


# --------------------------------------------------------------------------- B + C: all fail, then resume


@pytest.mark.slow
def test_every_site_failing_stops_the_job_and_keeps_the_last_model(stopped_and_resumed):
    stopped = stopped_and_resumed.stopped
    assert "round 1: every site failed, the aggregate is empty; the job stops" in stopped.server_log
    assert "python job.py --resume" in stopped.server_log
    assert "round 1: averaged 0 of 2 sites []" in stopped.server_log
    # Both sites downloaded round 1's global before failing: it was freed, and the job stops anyway with
    # round 0's model on disk (below), so nothing needs it back.
    assert stopped.server_log.count("every site (2) has downloaded the global") == 2
    for site in ("site-1", "site-2"):
        assert f"Qwen SFT failed on {site}" in stopped.client_logs
        assert stopped.sent[(1, site)]["n_params"] == 0  # an empty result: the site is left out...
        assert str(stopped.images) in stopped.sent[(1, site)]["meta"]["error"]  # ...saying why
    assert not [key for key in stopped.sent if key[0] == 2]  # nothing trained after the failure...
    assert "round 2: {" not in stopped.client_logs  # ...on any site
    # the round-0 global model stays on disk, consistent in all three files
    assert stopped.model["meta"]["round"] == 0 and stopped.state["last_round"] == 0
    for name, tensor in stopped.model["model"].items():
        assert torch.equal(stopped.hf[name].float(), tensor.float()), name


@pytest.mark.slow
def test_resume_continues_at_the_next_round_like_an_uninterrupted_run(stopped_and_resumed, killed_site_run):
    resumed = stopped_and_resumed.resumed
    assert resumed.start_round == 1
    assert sorted(resumed.sent) == [(1, "site-1"), (1, "site-2"), (2, "site-1"), (2, "site-2")]
    assert {r["round"] for r in resumed.summary.rows} == {1, 2}
    assert resumed.model["meta"]["round"] == 2
    uninterrupted = saved_model(killed_site_run.job)["model"]
    assert sorted(resumed.model["model"]) == sorted(uninterrupted)
    for name, tensor in resumed.model["model"].items():
        assert torch.equal(tensor, uninterrupted[name]), name


# --------------------------------------------------------------------------- the persistor, without a job


@pytest.mark.parametrize("where", ["checkpoint", "hf_dir"])
def test_kill_while_saving_leaves_the_old_or_the_new_model(where, tiny_model_dir, tmp_path):
    """A process saving round 1 is SIGKILLed halfway through writing FL_global_model.pt ("checkpoint")
    or, once that file is in place, global_model_hf/'s shard ("hf_dir")."""
    app = tmp_path / "app_server"
    app.mkdir()
    child = subprocess.run(
        [sys.executable, str(TESTS_DIR / "fault_hooks.py"), str(tiny_model_dir), str(app), where],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    leftovers = [p.name for p in app.iterdir() if p.name.startswith(".")]
    assert leftovers, "the kill should have hit a temporary file or folder"  # writes go to temp paths
    saved_round = 0 if where == "checkpoint" else 1
    initial = standalone_persistor(str(tiny_model_dir), str(tmp_path / "fresh"))[2]
    saved = torch.load(app / "FL_global_model.pt", weights_only=True)
    assert saved["meta"]["round"] == saved_round
    expected = round_weights(initial, saved_round)
    assert all(torch.equal(saved["model"][k], expected[k]) for k in expected)
    hf = load_file(app / "global_model_hf" / "model.safetensors")  # complete, round 0
    assert all(torch.equal(hf[k], round_weights(initial, 0)[k].to(hf[k].dtype)) for k in expected)
    # --resume starts after the round whose weights are in the .pt, even if fl_state.json lags behind
    assert resume.completed_rounds(app / "FL_global_model.pt") == saved_round + 1


class DiskFull:
    """Writes ``budget`` bytes of what it is given, then fails with ENOSPC."""

    def __init__(self, budget: int = 1000):
        self.budget = budget

    def write(self, data: bytes, path) -> None:
        with open(path, "wb") as f:
            f.write(data[: self.budget])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


@pytest.mark.parametrize("where", ["checkpoint", "hf_dir"])
def test_disk_full_while_saving_keeps_the_last_complete_files(where, tiny_model_dir, tmp_path, monkeypatch):
    import io

    from safetensors.torch import save as to_bytes

    from qwen3vl_sft.model import checkpoints

    persistor, fl_ctx, initial = standalone_persistor(str(tiny_model_dir), str(tmp_path))
    save_round(persistor, fl_ctx, initial, 0)
    before = {p.name: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    full = DiskFull()
    if where == "checkpoint":
        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            buffer = io.BytesIO()
            real_save(obj, buffer)
            full.write(buffer.getvalue(), f)

        monkeypatch.setattr(torch, "save", save)
    else:
        monkeypatch.setattr(
            checkpoints, "save_file", lambda t, path, metadata=None: full.write(to_bytes(t, metadata), path)
        )
    with pytest.raises(OSError, match="No space left"):
        save_round(persistor, fl_ctx, initial, 1)
    monkeypatch.undo()
    after = {p.name: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file or folder left
    changed = sorted(name for name in after if after[name] != before.get(name))
    assert changed == ([] if where == "checkpoint" else ["FL_global_model.pt"])
    assert resume.completed_rounds(tmp_path / "FL_global_model.pt") == (1 if where == "checkpoint" else 2)


def test_a_crashed_resumed_run_can_be_resumed_again(tmp_path):
    """A resumed run killed before it saved a round: the simulator had cleared <ws>/<job>, so the only
    copy of the model is <ws>/resume/<job>/. --resume must find it (and prefer a newer one)."""
    job = JobConfig(workspace=str(tmp_path), job_name="j", resume=True)
    keep = tmp_path / "resume" / "j"
    keep.mkdir(parents=True)
    (tmp_path / "j" / "server").mkdir(parents=True)  # cleared by the crashed run, nothing saved
    torch.save({"model": {"w": torch.ones(2)}, "meta": {"round": 1}}, keep / "FL_global_model.pt")
    assert resume.completed_rounds(resume.resume_checkpoint(job)) == 2
    newer = tmp_path / "j" / "server" / "app_server"
    newer.mkdir()
    torch.save({"model": {"w": torch.zeros(2)}, "meta": {"round": 3}}, newer / "FL_global_model.pt")
    kept = resume.resume_checkpoint(job)
    assert resume.completed_rounds(kept) == 4 and torch.load(kept, weights_only=True)["model"]["w"].sum() == 0


def test_too_few_sites_stop_the_job_without_saving(tiny_model_dir, tmp_path):
    from nvflare.app_common.abstract.fl_model import FLModel
    from nvflare.app_common.app_constant import AppConstants
    from nvflare.app_common.app_event_type import AppEventType

    persistor, fl_ctx, initial = standalone_persistor(str(tiny_model_dir), str(tmp_path), min_sites=2)
    save_round(persistor, fl_ctx, initial, 0)
    panics = []
    persistor.system_panic = lambda reason, fl_ctx: panics.append(reason)
    result = FLModel(params=round_weights(initial, 1), meta={"nr_aggregated": 1})
    fl_ctx.set_prop(AppConstants.AGGREGATION_RESULT, result, private=True, sticky=False)
    persistor.handle_event(AppEventType.AFTER_AGGREGATION, fl_ctx)
    save_round(persistor, fl_ctx, initial, 1)
    assert (
        len(panics) == 1
        and "only 1 site(s) returned a model this round, fewer than --min_sites 2" in panics[0]
    )
    assert torch.load(tmp_path / "FL_global_model.pt", weights_only=True)["meta"]["round"] == 0


def test_a_site_refuses_an_empty_global_model(tiny_model_dir):
    from qwen3vl_sft.fl.client import SiteRunner
    from qwen3vl_sft.model.weights import WeightsError
    from qwen3vl_sft.train.engine import RunConfig

    runner = SiteRunner(RunConfig(model=ModelConfig(model_name_or_path=str(tiny_model_dir))), "site-1", 0)
    with pytest.raises(WeightsError, match="site-1 received an empty global model in round 2.*--resume"):
        runner.round({}, current_round=2, total_rounds=3)
    assert runner.engine is None  # refused before loading anything
