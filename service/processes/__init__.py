"""Child servers run locally: the pip tritonserver launcher and the process-group helper."""
