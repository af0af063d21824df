"""Generated gRPC stubs (`make proto`); hand-written code lives elsewhere."""
