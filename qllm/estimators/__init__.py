"""Pure models more than one service uses: the latency model (prefill and decode-step seconds) and the
tool-duration model of agent programs. The predictor serves them; the kvmanager runs its own copy when the
predictor is unset, down or late. No torch, no I/O, no clock."""
