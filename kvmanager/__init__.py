"""qllm kvmanager service."""
