"""bench/cell_ceiling.py moves the server's whole first global between bare NVFlare cells (tiny checkpoint)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from qwen3vl_sft.config import ModelConfig
from qwen3vl_sft.model.checkpoints import initial_exchanged
from qwen3vl_sft.model.weights import message_bytes

BENCH = Path(__file__).resolve().parents[1] / "bench" / "cell_ceiling.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("cell_ceiling", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["cell_ceiling"] = module  # its processes re-run the file by path; this is only the parent
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("topology", ["direct", "relayed"])
def test_a_bare_download_delivers_the_whole_first_global(tiny_model_dir, tmp_path, topology):
    bench = load_bench()
    result = bench.ceiling(tiny_model_dir, topology, tmp_path / topology)
    expected = message_bytes(initial_exchanged(ModelConfig(model_name_or_path=str(tiny_model_dir))))
    assert result["error"] is None
    assert result["topology"] == topology
    assert result["mib"] * 2**20 == expected
    assert result["mib_per_s"] > 0
    # relayed: the job cells' bytes pass through both parties' cells, each a process of its own
    cells = {log.name.removesuffix(".log") for log in (tmp_path / topology).glob("*.log")}
    jobs = {"server.job", "site-1.job"} if topology == "relayed" else set()
    assert cells == {"server", "site-1"} | jobs
