"""Triton python-backend model for `bench/gpu.py`: an exported `model.pt` on a torch device.

What it measures and how: bench/README.md.
"""

import importlib.util
import json
from pathlib import Path

import numpy as np
import torch

# The project's python-backend model, copied beside this file by `bench/gpu.py`.
_spec = importlib.util.spec_from_file_location(
    "clip_base_model", Path(__file__).with_name("clip_base_model.py")
)
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)


class TritonPythonModel(_base.TritonPythonModel):
    """The project's model with `initialize` and `_run` on a torch device; `execute` as is."""

    def initialize(self, args):
        """Load `model.pt` onto `DEVICE` (map_location: constants too) and warm up."""
        config = json.loads(args["model_config"])
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        self.input_dtype = _base.pb_utils.triton_string_to_numpy(config["input"][0]["data_type"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.device = torch.device(params.get("DEVICE", "cpu") or "cpu")
        threads = int(params.get("TORCH_THREADS", "0") or 0)
        if threads > 0:
            torch.set_num_threads(threads)
        path = Path(args["model_repository"]) / args["model_version"] / "model.pt"
        self.session = None
        self.module = torch.jit.load(str(path), map_location=self.device).eval()
        dims = [d if d > 0 else 16 for d in config["input"][0]["dims"]]
        self._run(np.ones([1, *dims], dtype=self.input_dtype))

    def _run(self, batch):
        with torch.inference_mode():
            rows = torch.from_numpy(batch).to(self.device, non_blocking=True)
            return self.module(rows).float().cpu().numpy()
