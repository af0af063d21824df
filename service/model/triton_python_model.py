"""Triton python-backend model: serves an exported encoder, `model.pt` or `model.onnx`.

The pip `tritonserver` ships only the python backend; this file lets it run the same
`model.pt` that NVIDIA's image runs with the libtorch backend, or the `model.onnx` of
the onnx flavor with ONNX Runtime (CPU) where NVIDIA's image would use its onnxruntime
backend (`clipsvc triton` installs this file as a python-based `onnxruntime` backend).
The dynamic batcher hands `execute` several requests: they are concatenated, run
once, and split.
"""

import json
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """One TorchScript encoder behind Triton's python backend."""

    def initialize(self, args):
        """Load `model.pt` from this version's folder and run one warm-up batch."""
        config = json.loads(args["model_config"])
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        self.input_dtype = pb_utils.triton_string_to_numpy(config["input"][0]["data_type"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.module = None
        self.session = None
        if (version_dir / "model.onnx").is_file():
            import onnxruntime

            options = onnxruntime.SessionOptions()
            # As the gateway's ONNX backend (service/model/onnx_graphs.py): no spinning
            # threads, no memory plan for one shape (batch and text length vary).
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.enable_mem_pattern = False
            threads = int(params.get("intra_op_thread_count", "0") or 0)
            if threads > 0:
                options.intra_op_num_threads = threads
            self.session = onnxruntime.InferenceSession(
                str(version_dir / "model.onnx"), options, providers=["CPUExecutionProvider"]
            )
        else:
            threads = int(params.get("TORCH_THREADS", "0") or 0)
            if threads > 0:
                torch.set_num_threads(threads)
            path = version_dir / "model.pt"
            self.module = torch.jit.load(str(path), map_location="cpu").eval()
        dims = [d if d > 0 else 2 for d in config["input"][0]["dims"]]
        warmup = np.ones([1, *dims], dtype=self.input_dtype)
        self._run(warmup)

    def _run(self, batch):
        if self.session is not None:
            (out,) = self.session.run(None, {self.input_name: batch})
            return out
        with torch.inference_mode():
            return self.module(torch.from_numpy(batch)).numpy()

    def execute(self, requests):
        """One response per request, in order; same-shape requests run as one batch."""
        responses = [None] * len(requests)
        groups = {}
        for index, request in enumerate(requests):
            array = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy()
            groups.setdefault(array.shape[1:], []).append((index, array))
        for members in groups.values():
            batch = np.concatenate([array for _, array in members], axis=0)
            try:
                embeddings = self._run(batch)
            except Exception as exc:  # a bad batch fails its own requests, not the model
                for index, _ in members:
                    responses[index] = pb_utils.InferenceResponse(
                        error=pb_utils.TritonError(f"encoder failed: {exc}")
                    )
                continue
            start = 0
            for index, array in members:
                rows = embeddings[start : start + array.shape[0]]
                start += array.shape[0]
                out = pb_utils.Tensor(self.output_name, np.ascontiguousarray(rows))
                responses[index] = pb_utils.InferenceResponse(output_tensors=[out])
        return responses

    def finalize(self):
        """Drop the module or session so its memory is freed with the stub."""
        self.module = None
        self.session = None
