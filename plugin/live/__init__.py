"""Live comparison with the predictor: per-window gauges, drift, dead/cold experts, OTel push.

Importing this package does no work; `attach.attach(session, cfg, worker)` is the entry point the
worker runtime calls. See docs/live.md.
"""

__all__ = ["attach"]


def attach(session, cfg, worker):  # type: ignore[no-untyped-def]
    from .attach import attach as _attach

    _attach(session, cfg, worker)
