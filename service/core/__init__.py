"""The pipeline without transport: validation, preprocessing, cache, batching, zero-shot."""
