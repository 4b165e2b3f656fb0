"""Live comparison with the predictor: per-window gauges, drift, dead/cold experts, OTel push.

Runs in the reader (`moe_reuse.plugin.reader`), never in a vLLM worker: `attach.attach_reader
(reader, status)` builds it from the facts a worker publishes. Importing this package does no
work. See docs/live.md.
"""
