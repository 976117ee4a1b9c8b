"""qllm router service."""
