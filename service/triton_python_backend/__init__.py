"""Triton python-backend `model.py` for the pip `tritonserver` (copied by the export)."""
