"""Where the encoders run: in-process TorchScript or a Triton Inference Server."""
