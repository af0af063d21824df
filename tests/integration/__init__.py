"""Integration tests: real tritonserver, redis-server, helm, gRPC over loopback, exported models."""
