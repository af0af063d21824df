"""gRPC transport: server wiring, servicer, interceptors, health."""
