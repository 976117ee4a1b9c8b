"""qllm predictor service."""
