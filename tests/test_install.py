"""install_requirements.sh's argument handling (the installs themselves run in CI's set-up step).

.venv/bin/python -m pytest tests/test_install.py -q
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "install_requirements.sh"


@pytest.mark.parametrize("args", [["--official"], ["--official", "a", "b"], ["--official", ""]])
def test_official_without_one_env_dir_is_a_usage_error_that_creates_nothing(args, tmp_path):
    done = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "error: usage: bash install_requirements.sh --official ENV_DIR (the folder for the new environment)"
    )
    assert not any(tmp_path.iterdir()) and not Path("a").exists()
