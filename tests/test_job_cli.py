"""job.py before NVFlare runs: flags refused in one line, free ports, the printed commands. Fast."""

from __future__ import annotations

import shlex
import socket
import sys
from pathlib import Path

import pytest

import job as job_script
from qwen3vl_sft.config import JobConfig
from qwen3vl_sft.errors import DataError
from qwen3vl_sft.fl import job as fl_job
from qwen3vl_sft.fl import summary as fl_summary


def run_main(argv: list[str], capsys) -> tuple[int | str | None, str]:
    with pytest.raises(SystemExit) as stop:
        job_script.main(argv)
    return stop.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--num_rounds", "0"], "--num_rounds must be at least 1, got 0"),
        (["--num_sites", "0"], "--num_sites must be at least 1"),
        (["--nproc_per_client", "0"], "--nproc_per_client must be at least 1"),
        (["--min_sites", "4"], "--min_sites must be between 0 (all sites) and --num_sites 3, got 4"),
        (["--master_port_base", "80"], "--master_port_base must be in 1024..65532, got 80"),
        (["--max_steps", "0"], "--max_steps must be a positive step count or -1"),
        (["--learning_rate", "0"], "--learning_rate must be > 0"),
        (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be at least 1"),
        (
            ["--image_root", "/no/such/images"],
            "--image_root /no/such/images does not exist or is not a folder",
        ),
        (["--workspace", "/proc/not-writable"], "--workspace /proc/not-writable is not writable"),
        (["--gpu", "[0],[1"], "--gpu '[0],[1' is malformed"),
        (["--export_dir", "/proc/no-export"], "--export_dir /proc/no-export is not writable"),
        (["--max_bad_sample_fraction", "1.5"], "--max_bad_sample_fraction must be in [0, 1], got 1.5"),
        (["--max_pixels", "100", "--min_pixels", "784"], "--max_pixels 100 is below --min_pixels 784"),
        (["--max_image_pixels", "0"], "--max_image_pixels must be >= 1, got 0"),
        (["--dataloader_num_workers", "-1"], "--dataloader_num_workers must be >= 0, got -1"),
        (["--lora", "true", "--lora_r", "0"], "--lora_r must be >= 1, got 0"),
        (
            ["--master_port_base", "65500", "--backend", "official"],
            "beyond 65535; pass a lower --official_master_port",
        ),
        (["--env", "prod"], "--env prod needs --startup_kit: the admin's startup kit folder"),
        (
            ["--env", "prod", "--startup_kit", "/no/kit"],
            "--startup_kit /no/kit: no startup/fed_admin.json there",
        ),
        (
            ["--env", "prod", "--startup_kit", "/", "--data_dir", "x"],
            "--startup_kit /: no startup/fed_admin.json",
        ),
    ],
)
def test_flags_that_cannot_work_are_refused_in_one_line(
    flags, message, tiny_model_dir, shards, tmp_path, capsys
):
    base = [
        "--model_name_or_path",
        str(tiny_model_dir),
        "--data_dir",
        str(shards),
        "--workspace",
        str(tmp_path),
    ]
    code, _ = run_main([*base, *flags], capsys)
    assert isinstance(code, str) and code.startswith("error: ") and message in code, code
    assert "\n" not in code


def test_a_missing_data_dir_names_the_file_and_the_command(tmp_path, tiny_model_dir, capsys):
    code, _ = run_main(["--model_name_or_path", str(tiny_model_dir), "--data_dir", str(tmp_path / "nodata"),
                        "--workspace", str(tmp_path / "ws")], capsys)  # fmt: skip
    assert code == f"error: {tmp_path / 'nodata' / 'site-1' / 'train.json'} does not exist: run prepare_data.py " \
        f"--num_sites N --output_dir {tmp_path / 'nodata'} first"  # fmt: skip


def test_ctrl_c_ends_with_one_line_and_exit_code_130(tiny_model_dir, shards, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fl_job, "run_job", interrupted)
    code, err = run_main(["--model_name_or_path", str(tiny_model_dir), "--data_dir", str(shards),
                          "--workspace", str(tmp_path / "ws")], capsys)  # fmt: skip
    assert code == 130
    assert (
        err.strip() == "job.py: interrupted; continue the job later with: python job.py --resume <same flags>"
    )


def listening_port() -> socket.socket:
    s = socket.socket()
    s.bind(("", 0))
    s.listen()
    return s


def test_a_busy_master_port_is_replaced_by_a_free_one(capsys):
    with listening_port() as busy:
        port = busy.getsockname()[1]
        ports = fl_job.master_ports(JobConfig(num_sites=3, master_port_base=port))
        assert port not in ports and len(set(ports)) == 3 and ports[0] > port
        assert all(fl_job.port_is_free(p) for p in ports)
        assert f"port {port} is in use on this machine; using {ports[0]} instead" in capsys.readouterr().out
        # an exported job runs elsewhere: its ports are the ones asked for
        exported = JobConfig(num_sites=3, master_port_base=port, export_dir="x")
        assert fl_job.master_ports(exported) == [port, port + 1, port + 2]


def test_poc_is_refused_while_its_server_port_is_taken(tiny_model_dir, shards, tmp_path, capsys, monkeypatch):
    with listening_port() as busy:
        port = busy.getsockname()[1]
        monkeypatch.setattr(fl_job, "poc_server_port", lambda: port)
        code, _ = run_main(["--env", "poc", "--model_name_or_path", str(tiny_model_dir), "--data_dir", str(shards),
                            "--workspace", str(tmp_path / "ws")], capsys)  # fmt: skip
    assert code == (f"error: --env poc: port {port}, where NVFlare PoC's server listens, is in use on this "
                    "machine (another PoC or NVFlare server?): stop that, or use --env sim")  # fmt: skip
    assert not (tmp_path / "ws" / "poc").exists()  # refused before anything was provisioned


def test_a_port_left_in_time_wait_is_free_for_a_server_that_reuses_addresses():
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's servers (PoC's) do
    server.bind(("", 0))
    server.listen()
    with server, socket.create_connection(server.getsockname()) as client:
        port = server.getsockname()[1]
        accepted, _ = server.accept()
        accepted.close()  # the server's side closes first: its end of the connection stays in TIME_WAIT
        client.recv(1)
    assert not fl_job.port_is_free(port)
    assert fl_job.port_is_free(port, reuse_address=True)  # PoC's server binds it
    with listening_port() as busy:
        assert not fl_job.port_is_free(busy.getsockname()[1], reuse_address=True)


def test_site_ports_in_the_ephemeral_range_get_a_note_and_ports_below_it_none(tmp_path, monkeypatch, capsys):
    ranges = tmp_path / "ip_local_port_range"
    ranges.write_text("40000\t50000\n")
    monkeypatch.setattr(fl_job, "EPHEMERAL_RANGE_FILE", ranges)
    monkeypatch.setattr(fl_job, "port_is_free", lambda port: True)

    assert fl_job.master_ports(JobConfig(num_sites=2, master_port_base=39999)) == [39999, 40000]
    assert capsys.readouterr().out == (
        "note: --master_port_base: ports 39999..40000 are in this machine's ephemeral range (40000-50000), "
        "where the OS hands NVFlare ports after this check; one could take a site's port (its "
        "torchrun then ends with EADDRINUSE). A --master_port_base below 40000 makes that rare.\n"
    )
    assert fl_job.master_ports(JobConfig(num_sites=2, master_port_base=39998)) == [39998, 39999]
    exported = JobConfig(num_sites=2, master_port_base=45000, export_dir="x")
    assert fl_job.master_ports(exported) == [45000, 45001]
    assert capsys.readouterr().out == ""  # below the range, or run elsewhere: nothing to say


def test_the_printed_commands_are_quoted_and_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job = JobConfig(data_dir="my data", export_dir="out dir")
    assert "no test.json: --test_fraction was 0" in fl_summary.evaluate_command(job, "/ws/g")
    (tmp_path / "my data").mkdir()
    (tmp_path / "my data" / "test.json").write_text("[]")
    command = shlex.split(fl_summary.evaluate_command(job, "/ws/global model_hf"))
    assert command == [sys.executable, str(Path(fl_summary.REPO_DIR) / "run_inference.py"), "--model_path",
                       "/ws/global model_hf", "--data_file", str(tmp_path / "my data" / "test.json")]  # fmt: skip
    with_root = shlex.split(fl_summary.evaluate_command(job, "/g", image_root="imgs"))
    assert with_root[4:6] == ["--image_root", str(tmp_path / "imgs")]
    assert fl_job.exported_job_folder(job) == str(tmp_path / "out dir" / job.job_name)


def test_ctrl_c_inside_nvflares_simulator_is_reported_as_an_interrupt(tmp_path, monkeypatch):
    """NVFlare's simulator catches KeyboardInterrupt, kills its workers and reports "Simulation failed
    with return code -9"; run_job turns that back into the interrupt it was (job.py: exit 130)."""
    import os
    import signal

    class SimulatorLike:
        def run(self, env):
            try:
                os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, delivered to this process
            except KeyboardInterrupt:
                raise RuntimeError("Simulation failed with return code -9. Logs are in ...") from None
            raise AssertionError("SIGINT did not interrupt")

    monkeypatch.setattr(fl_job, "execution_env", lambda job, cuda: None)
    job = JobConfig(workspace=str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        fl_job.run_job(job, SimulatorLike(), 0)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back

    class FailingSimulator:
        def run(self, env):
            raise RuntimeError("Simulation failed with return code 2. Logs are in ...")

    with pytest.raises(
        fl_job.JobFailed, match=r"^Simulation failed with return code 2. Logs are in \(server log: "
    ):
        fl_job.run_job(job, FailingSimulator(), 0)


def test_summary_paths_are_absolute_with_a_relative_workspace(tmp_path, monkeypatch):
    """With --workspace ws the summary prints absolute paths: a ws/... path in the printed evaluation
    command would not be found from another folder."""
    monkeypatch.chdir(tmp_path)
    model_dir = (
        tmp_path / "ws" / "qwen3-vl-fedavg" / "server" / "simulate_job" / "app_server" / "global_model_hf"
    )
    model_dir.mkdir(parents=True)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "test.json").write_text("[]")
    job = JobConfig(workspace="ws", data_dir="data")
    summary = fl_summary.summarize(job, "ws/qwen3-vl-fedavg")
    assert summary.result_dir == str(tmp_path / "ws" / "qwen3-vl-fedavg")
    assert summary.global_model_dir == str(model_dir)
    assert f"--model_path {model_dir} --data_file {tmp_path / 'data' / 'test.json'}" in summary.text


def admin_kit(tmp_path: Path) -> Path:
    kit = tmp_path / "admin@hospital.org"
    (kit / "startup").mkdir(parents=True)
    (kit / "startup" / "fed_admin.json").write_text('{"admin": {"username": "admin@hospital.org"}}')
    return kit


def prod_job(tmp_path: Path, data_dir: str) -> JobConfig:
    return JobConfig(env="prod", startup_kit=str(admin_kit(tmp_path)), data_dir=data_dir,
                     workspace=str(tmp_path / "ws"))  # fmt: skip


def test_prod_sites_get_their_own_paths_and_torchrun(tmp_path, tiny_model_dir, capsys):
    """--env prod: $VAR paths travel unexpanded (each site expands its own), a folder this machine lacks
    is not checked here, torchrun is the sites' own, and their ports are theirs to check."""
    from qwen3vl_sft.config import BackendConfig, DataConfig, ExchangeConfig, ModelConfig, TrainConfig

    job = prod_job(tmp_path, "$HOSPITAL_DATA")
    model = ModelConfig(model_name_or_path="$HOSPITAL_MODEL")
    per_site = fl_job.site_configs(job, model, DataConfig(), TrainConfig(), BackendConfig(), ExchangeConfig())
    args = shlex.split(per_site["site-2"]["train_args"])
    assert args[args.index("--data_path") + 1] == "$HOSPITAL_DATA/site-2/train.json"
    assert args[args.index("--eval_data_path") + 1] == "$HOSPITAL_DATA/site-2/val.json"
    assert args[args.index("--model_name_or_path") + 1] == "$HOSPITAL_MODEL"
    assert per_site["site-1"]["command"] == "torchrun --nproc_per_node=1 --master_port=29500"
    assert fl_job.absolute_model_path(model, job) == model  # the server expands it (fl.server.base_config)
    with pytest.raises(DataError, match="--data_dir data is relative and not on this machine"):
        fl_job.site_data(DataConfig(), prod_job(tmp_path / "b", "data"), "site-1")
    absent = fl_job.site_data(DataConfig(), prod_job(tmp_path / "c", "/srv/pubmedvision"), "site-1")
    assert (
        absent.data_path == "/srv/pubmedvision/site-1/train.json"
    )  # not on this machine: the site checks it
    assert "note: --data_dir $HOSPITAL_DATA is not on this machine" in capsys.readouterr().out


def test_export_prints_the_submit_command_with_the_admin_kit(tmp_path):
    kit = admin_kit(tmp_path)
    job = JobConfig(export_dir=str(tmp_path / "out"), startup_kit=str(kit))
    assert fl_job.submit_command(job) == shlex.join(
        [
            "nvflare",
            "job",
            "submit",
            "-j",
            str(tmp_path / "out" / "qwen3-vl-fedavg"),
            "--startup-kit",
            str(kit),
        ]
    )


def test_prod_refuses_gpu_groups_it_cannot_place(tmp_path):
    import dataclasses

    from qwen3vl_sft.config import DataConfig, ModelConfig, TrainConfig

    job = dataclasses.replace(prod_job(tmp_path, "/srv/pubmedvision"), gpu="[0],[1],[2]")
    with pytest.raises(DataError, match=r"^--gpu is for this machine's sites \(sim, PoC\); with --env prod"):
        fl_job.check_job(job, ModelConfig(), DataConfig(), TrainConfig())
    fl_job.check_job(dataclasses.replace(job, gpu=""), ModelConfig(), DataConfig(), TrainConfig())


def test_a_symlinked_clone_python_is_kept_as_the_link(tmp_path):
    """A venv's bin/python is a link to the base interpreter: resolving it would lose the environment."""
    from qwen3vl_sft.config import BackendConfig

    link = tmp_path / "env" / "bin" / "python"
    link.parent.mkdir(parents=True)
    link.symlink_to(sys.executable)
    paths = fl_job.absolute_backend_paths(BackendConfig(qwen3vl_python=str(link)), JobConfig())
    assert paths["qwen3vl_python"] == str(link)


def test_a_malformed_gpu_flag_is_a_usage_error_reported_like_a_data_error():
    from qwen3vl_sft.errors import UsageError

    with pytest.raises(UsageError, match=r"^--gpu '0,1' is malformed: use one bracketed list per site"):
        fl_job.gpu_groups(JobConfig(gpu="0,1"), 0)
    with pytest.raises(UsageError, match="has 2 groups but --num_sites is 3"):
        fl_job.gpu_groups(JobConfig(gpu="[0],[1]"), 0)
    assert fl_job.gpu_groups(JobConfig(gpu="[0],[1],[2]"), 0) == [[0], [1], [2]]
    assert issubclass(UsageError, DataError)  # job.py's one handler prints it in one line
