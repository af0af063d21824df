"""What describes and produces a model: encoders, export, metadata, Triton configs."""
