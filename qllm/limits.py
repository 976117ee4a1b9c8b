"""Bounds on request fields that router and worker both enforce (one place, so they cannot drift)."""

# Beam search: gen_len ** length_penalty must stay a finite, non-zero float for any output length.
MAX_ABS_LENGTH_PENALTY = 100.0
# Finished candidates to collect = round(num_beams * patience); past this the search is just max_tokens.
MAX_PATIENCE = 1000.0
