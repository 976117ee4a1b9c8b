"""qllm worker service."""
