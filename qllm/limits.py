"""Bounds on request fields that router and worker both enforce (one place, so they cannot drift)."""

# Beam search: gen_len ** length_penalty must stay a finite, non-zero float for any output length.
MAX_ABS_LENGTH_PENALTY = 100.0
# Finished candidates to collect = round(num_beams * patience); past this the search is just max_tokens.
MAX_PATIENCE = 1000.0

# Stop strings: how many, and how long each. The worker holds back up to the longest one's length - 1
# characters of text until they cannot start a match, so a long stop string delays streamed text.
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
# Alternatives per generated token (OpenAI's and vLLM's bound).
MAX_TOP_LOGPROBS = 20
# Chat turns in one request (their content also counts against the prompt-bytes limit).
MAX_MESSAGES = 1024
MAX_ROLE_CHARS = 64
