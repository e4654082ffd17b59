"""Tests only: a provisioned NVFlare deployment on this machine (server, sites, admin on loopback).

Each party starts from its own startup kit, as its own process group, with HOME pointed into the
deployment's folder so nothing reaches ~/.nvflare; stop() ends every process it started, by PID.
The commands are docs/production.md's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
from ports import free_port_base

PROJECT = "qwen3vl_fl"
SERVER = "localhost"
ADMIN = "admin@hospital.org"
VENV_BIN = Path(sys.executable).parent


def project_yml(sites: list[str], fed_learn_port: int, admin_port: int) -> str:
    clients = "".join(f"  - name: {site}\n    type: client\n    org: hospital\n" for site in sites)
    return f"""api_version: 3
name: {PROJECT}
description: Federated Qwen3-VL fine-tuning (test deployment on loopback)
participants:
  - name: {SERVER}
    type: server
    org: hospital
    fed_learn_port: {fed_learn_port}
    admin_port: {admin_port}
{clients}  - name: {ADMIN}
    type: admin
    org: hospital
    role: project_admin
builders:
  - path: nvflare.lighter.impl.workspace.WorkspaceBuilder
  - path: nvflare.lighter.impl.static_file.StaticFileBuilder
    args:
      config_folder: config
  - path: nvflare.lighter.impl.cert.CertBuilder
  - path: nvflare.lighter.impl.signature.SignatureBuilder
"""


def party_env(home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment's python and nvflare first on PATH, nothing of the caller's NVFlare state."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NVFLARE") and k != "PYTHONPATH"}
    env.update(HOME=str(home), PATH=f"{VENV_BIN}{os.pathsep}{env['PATH']}", **(extra or {}))
    return env


@dataclasses.dataclass
class Deployment:
    root: Path
    sites: list[str]
    party_vars: dict[str, str] = dataclasses.field(default_factory=dict)  # what each party's operator sets
    groups: list[subprocess.Popen] = dataclasses.field(default_factory=list)

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def kits(self) -> Path:
        return self.root / "provisioned" / PROJECT / "prod_00"

    @property
    def admin_kit(self) -> Path:
        return self.kits / ADMIN

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return party_env(self.home, extra)

    def provision(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        base = free_port_base(2)
        (self.root / "project.yml").write_text(project_yml(self.sites, base, base + 1))
        cmd = ["nvflare", "provision", "-p", "project.yml", "-w", "provisioned"]
        subprocess.run(cmd, cwd=self.root, env=self.env(), check=True, capture_output=True, timeout=120)

    def start(self, timeout: float = 180) -> None:
        """Server first, then each site; returns once every site has registered with the server."""
        for party in (SERVER, *self.sites):
            self._start_party(party, self.party_vars)
        deadline = time.monotonic() + timeout
        log = self.kits / SERVER / "log.txt"
        while time.monotonic() < deadline:
            text = log.read_text(errors="replace") if log.is_file() else ""
            if all(f"Client: New client {site}@" in text for site in self.sites):
                return
            if any(p.poll() is not None for p in self.groups):
                raise RuntimeError(f"a party exited during start-up; see the logs under {self.kits}")
            time.sleep(1)
        raise TimeoutError(f"not every site registered within {timeout:.0f} s; see {log}")

    def _start_party(self, name: str, extra: dict[str, str]) -> None:
        kit = self.kits / name
        console = open(kit / "console.txt", "wb")  # noqa: SIM115 - the party writes it as long as it runs
        # --once: the kit's own start command without its restart-on-exit loop (a test ends parties for good).
        self.groups.append(subprocess.Popen(["bash", str(kit / "startup" / "sub_start.sh"), "--once"], cwd=kit,
                                            env=self.env(extra), stdout=console, stderr=subprocess.STDOUT,
                                            start_new_session=True))  # fmt: skip
        console.close()

    def stop(self) -> None:
        """End every process this deployment started, by PID, descendants included: NVFlare starts job
        processes and site trainers in sessions of their own, which a process-group kill would miss.
        SIGTERM, then SIGKILL to whatever is left after 15 s."""
        procs = []
        for started in self.groups:
            try:
                root = psutil.Process(started.pid)
                procs += [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue  # ended on its own already
        for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
            for proc in procs:
                with contextlib.suppress(psutil.NoSuchProcess):  # ended between the listing and now
                    proc.send_signal(sig)
            _, procs = psutil.wait_procs(procs, timeout=wait)
            if not procs:
                break
        for started in self.groups:
            started.wait(timeout=5)  # reap the parties this process started
        self.groups.clear()


def processes_under(root: Path) -> list[str]:
    """Command lines of running processes that name a path under ``root`` (what stop() must leave none of)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        line = " ".join(proc.info["cmdline"] or [])
        if str(root) in line:
            found.append(line)
    return found
