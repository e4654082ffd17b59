"""``job.py --resume``: the job's last saved global model, kept where the simulator does not clear it,
and how many rounds the run that saved it completed."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..config import JobConfig
from ..errors import DataError
from ..fileio import atomic_path


def resume_checkpoint(job: JobConfig) -> str | None:
    """For --resume: the job's last saved global model, copied out of the job's run folder.

    The simulator clears ``<workspace>/<job>`` when it starts, so the checkpoint (and the state file)
    are first copied, atomically, to ``<workspace>/resume/<job>/``. That copy is a candidate too: a
    resumed run killed before it saved a round leaves nothing under ``<workspace>/<job>``, and the next
    --resume must still find the last round (the newest of all candidates wins).
    """
    if not job.resume:
        return None
    keep = Path(job.workspace).resolve() / "resume" / job.job_name
    found = [*Path(job.workspace).glob(f"{job.job_name}/**/FL_global_model.pt"), keep / "FL_global_model.pt"]
    candidates = [path for path in found if path.is_file()]
    if not candidates:
        raise DataError(
            f"--resume: no FL_global_model.pt under {job.workspace}/{job.job_name} or {keep}; nothing to resume"
        )
    latest = max(candidates, key=lambda path: (completed_rounds(path), os.path.getmtime(path)))
    if latest.parent != keep:
        keep.mkdir(parents=True, exist_ok=True)
        for name in ("FL_global_model.pt", "fl_state.json"):
            (keep / name).unlink(missing_ok=True)
            if (latest.parent / name).is_file():
                with atomic_path(keep / name) as tmp:
                    shutil.copy2(latest.parent / name, tmp)
    return str(keep / "FL_global_model.pt")


def completed_rounds(checkpoint: str | os.PathLike | None) -> int:
    """Rounds already done by the run that wrote ``checkpoint``.

    Read from the checkpoint itself: its meta round is written in the same atomic rename as the weights,
    whereas fl_state.json is written after global_model_hf/, so a kill between the two leaves the state
    file a round behind the weights (trusting it would train that round twice). It is the fallback.
    """
    if checkpoint is None:
        return 0
    from ..eval.loading import CheckpointError, read_weights_file  # weights_only: never unpickles code

    try:
        _, meta = read_weights_file(checkpoint)
    except CheckpointError as err:
        raise DataError(f"--resume: {err}") from err
    if meta.get("round") is not None:
        return int(meta["round"]) + 1
    state = Path(checkpoint).with_name("fl_state.json")
    return int(json.loads(state.read_text())["last_round"]) + 1 if state.is_file() else 0
