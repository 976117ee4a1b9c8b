"""qllm: a gRPC control plane for serving MoE LLMs to mixed latency-sensitive and best-effort traffic."""
