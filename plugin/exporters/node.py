"""`moe-reuse exporter`: the per-node reader, for ranks that do not share a host with the API server.

On one node the API server's reader folds every rank's raw stream and its collector serves the
snapshots on vLLM's own /metrics. With multi-node TP/PP/DP/EP, the ranks of the other nodes write
their raw streams into their own node's /dev/shm, which that reader never sees. This command runs
the same reader (`moe_reuse.plugin.reader`) over the node's runs and the same collector (`SnapshotCollector`, the same families, budgets and refusals) over every run
directory under the node's snapshot base and serves it on a port of its own, like a GPU exporter
(deploy/kubernetes/node-exporter-daemonset.yaml; deploy/compose). Series keep their `model`,
`engine` and `rank` labels, which vLLM numbers across the whole deployment, and the scrape config
adds the node's name (`node`), so the recording rules can sum a cluster across nodes
(`model:moe_reuse_*`) without counting a rank twice.

It binds to 127.0.0.1 unless told otherwise: the series name the served model and its layout.
`--otlp-endpoint` also (or, with `--listen off`, only) pushes the same points over OTLP, one
MeterProvider for the node (resource `node`, every point keeping `model`, `engine` and `rank`).
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server

from ..snapshot import base_dir, scan_base
from . import render_names
from .prometheus import SnapshotCollector

logger = logging.getLogger("vllm.moe_reuse")
DEFAULT_LISTEN = "127.0.0.1:9477"


def parse_listen(text: str) -> tuple[str, int]:
    """'HOST:PORT' or ':PORT' or 'PORT' -> (host, port); clear errors naming --listen."""
    host, sep, port = str(text).rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    host = host.strip("[]") or "127.0.0.1"
    try:
        n = int(port)
    except ValueError:
        raise SystemExit(f"moe-reuse exporter: --listen {text!r}: the port is not a number; "
                         "use HOST:PORT, e.g. 127.0.0.1:9477") from None
    if not 0 < n < 65536:
        raise SystemExit(f"moe-reuse exporter: --listen {text!r}: port {n} is outside 1..65535")
    return host, n


def node_registry(base: Path) -> CollectorRegistry:
    """A registry holding only the node's snapshot collector (no process or GC series: the
    exporter's own health is `up` and moe_reuse_errors_total{stage="collector"}), rendered with
    each name escaped once (`render_names`)."""
    render_names.install()
    reg = CollectorRegistry(auto_describe=False)
    reg.register(SnapshotCollector(lambda: base, whole_base=True))  # type: ignore[arg-type]
    return reg


def push_otlp(base: Path, endpoint: str, interval_s: float, stop: threading.Event,
              exporter: Any = None) -> None:
    """Push the node's ranks over OTLP every `interval_s` until `stop` (its own thread): the same
    points the workers' `otlp_endpoint` pushes, for a node whose workers do not push themselves.
    A failed scan or push is logged once and retried on the next tick."""
    from ..live.otel import OtelBridge

    bridge = OtelBridge(endpoint, interval_s, {"node": socket.gethostname()}, exporter=exporter)
    failed = False
    try:
        while True:
            try:
                bridge.update(scan_base(base).fresh)
            except Exception as exc:  # noqa: BLE001 - the exporter keeps serving
                if not failed:
                    logger.warning("moe_reuse exporter: OTLP update failed: %s: %s",
                                   type(exc).__name__, exc)
                failed = True
            if stop.wait(interval_s):
                break
    finally:
        bridge.flush()
        bridge.shutdown()


def serve(base: Path, host: str, port: int, stop: threading.Event | None = None, *,
          otlp_endpoint: str = "", otlp_interval_s: float = 10.0) -> None:
    """Serve /metrics (port > 0) and/or push OTLP until SIGTERM/SIGINT (or `stop`)."""
    stop = stop or threading.Event()
    server = thread = pusher = None
    reader = start_reader(base)
    if port > 0:
        server, thread = start_http_server(port, addr=host, registry=node_registry(base))
        logger.warning("moe_reuse exporter: serving %s on http://%s:%d/metrics", base, host, port)
        print(f"moe-reuse exporter: reading {base}, serving http://{host}:{port}/metrics",
              flush=True)
    if otlp_endpoint:
        pusher = threading.Thread(target=push_otlp, name="moe_reuse-otlp", daemon=True,
                                  args=(base, otlp_endpoint, otlp_interval_s, stop))
        pusher.start()
        print(f"moe-reuse exporter: reading {base}, pushing OTLP to {otlp_endpoint} every "
              f"{otlp_interval_s:g} s", flush=True)

    def _stop(*_: Any) -> None:
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
    try:
        while not stop.is_set():
            time.sleep(0.2)
    finally:
        stop.set()
        if server is not None and thread is not None:
            server.shutdown()
            thread.join(timeout=5)
        if pusher is not None:
            pusher.join(timeout=15)
        reader.stop()


def start_reader(base: Path) -> Any:
    """The node's reader over every run under `base` (the same code as in the API server): the
    node's workers only count and copy, so without a reader their figures would never be derived.
    Where an API server shares the node, it and this exporter agree through the run's lock: one
    reads, the other serves what it wrote."""
    from ..live.attach import attach_reader
    from ..reader.service import ReaderService

    return ReaderService(lambda: base, whole_base=True, attach_live=attach_reader).start()


def _cmd(args: argparse.Namespace) -> int:
    base = Path(args.snapshot_dir) if args.snapshot_dir else base_dir()
    if args.listen == "off" and not args.otlp_endpoint:
        raise SystemExit("moe-reuse exporter: --listen off needs --otlp-endpoint (else the "
                         "exporter would export nothing)")
    host, port = ("", 0) if args.listen == "off" else parse_listen(args.listen)
    if not args.otlp_interval_s > 0:
        raise SystemExit(f"moe-reuse exporter: --otlp-interval-s must be > 0, got "
                         f"{args.otlp_interval_s}")
    serve(base, host, port, otlp_endpoint=args.otlp_endpoint,
          otlp_interval_s=args.otlp_interval_s)
    return 0


def add_subcommands(sub: Any) -> None:
    p = sub.add_parser(
        "exporter",
        help="serve this node's ranks on /metrics (multi-node deployments)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--snapshot-dir", default="",
                   help="the node's snapshot base (default: MOE_REUSE_SNAPSHOT_DIR, else "
                        "/dev/shm/moe_reuse-<uid>); every server run under it is read")
    p.add_argument("--listen", default=DEFAULT_LISTEN,
                   help=f"HOST:PORT to serve /metrics on (default {DEFAULT_LISTEN}; 0.0.0.0:PORT "
                        "to let a Prometheus on another host scrape it; off: OTLP only)")
    p.add_argument("--otlp-endpoint", default="",
                   help="also push over OTLP: http(s)://HOST:4318/v1/metrics or grpc://HOST:4317")
    p.add_argument("--otlp-interval-s", type=float, default=10.0, help="OTLP push interval")
    p.set_defaults(func=_cmd)
