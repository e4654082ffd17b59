"""Tests only: an NVFlare server-side result filter that records what each site sent.

Added to a job by the FL tests (``recipe.add_server_input_filter``) so they can recompute FedAvg from
the tensors the sites really sent. It passes every result through unchanged.
"""

from __future__ import annotations

import json
import os

from nvflare.apis.dxo import from_shareable
from nvflare.apis.filter import Filter


class ResultRecorder(Filter):
    def __init__(self, out_dir: str):
        super().__init__()
        self.out_dir = out_dir

    def process(self, shareable, fl_ctx):
        from safetensors.torch import save_file

        dxo = from_shareable(shareable)
        site = fl_ctx.get_peer_context().get_identity_name()
        current_round = (dxo.meta or {}).get("round")
        os.makedirs(self.out_dir, exist_ok=True)
        stem = os.path.join(self.out_dir, f"round{current_round}-{site}")
        if dxo.data:
            save_file({k: v.contiguous() for k, v in dxo.data.items()}, stem + ".safetensors")
        meta = {k: v for k, v in (dxo.meta or {}).items() if isinstance(v, (int, float, str))}
        with open(stem + ".json", "w") as f:
            json.dump({"meta": meta, "n_params": len(dxo.data or {})}, f)
        return shareable
