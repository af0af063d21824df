"""CLIP embedding service: gRPC gateway, TorchScript export, Triton and Redis integration."""

__version__ = "0.1.0"
