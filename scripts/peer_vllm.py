#!/usr/bin/env python3
"""Side by side with the real peer, vLLM's CPU build, and qllm: the command line of bench/peer_vllm.py
(whose docstring says what it runs and writes).

    .venv/bin/python scripts/peer_vllm.py --dtypes bfloat16,float32 --rounds 3 --be-rate 4 --duration 60
    make bench-peer                      # the same, with those defaults
"""

import sys

from bench.peer_vllm import main

if __name__ == "__main__":
    sys.exit(main())
