"""Grafana dashboards, Prometheus rules and alerts for vllm-moe-reuse, as code.

`config` (thresholds), `queries` (PromQL), `overview` (dashboard), `rules` (rules and alerts),
`rule_tests` (promtool cases) and `generate` (writes and checks the generated files). Nothing runs
at import time.
"""
