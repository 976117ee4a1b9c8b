"""Generated gRPC stubs for the qllm.v1 protos (do not edit; run `make protos`)."""
