"""Recording core: device counters, the ring and its flusher. Imports torch, never vLLM."""
