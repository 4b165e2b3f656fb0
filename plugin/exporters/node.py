"""`moe-reuse exporter`: the per-node reader, for ranks that do not share a host with the API server.

On one node the API server's collector reads every rank's snapshot and vLLM's own /metrics carries
the plugin's series. With multi-node TP/PP/DP/EP, the ranks of the other nodes write their
snapshots into their own node's /dev/shm, which that collector never sees. This command runs the
same collector (`SnapshotCollector`, the same families, budgets and refusals) over every run
directory under the node's snapshot base and serves it on a port of its own, like a GPU exporter
(deploy/kubernetes/node-exporter-daemonset.yaml; deploy/compose). Series keep their `model`,
`engine` and `rank` labels, which vLLM numbers across the whole deployment, and the scrape config
adds the node's name (`node`), so the recording rules can sum a cluster across nodes
(`model:moe_reuse_*`) without counting a rank twice.

It binds to 127.0.0.1 unless told otherwise: the series name the served model and its layout.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server

from ..snapshot import base_dir
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
    exporter's own health is `up` and moe_reuse_errors_total{stage="collector"})."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(SnapshotCollector(lambda: base, whole_base=True))  # type: ignore[arg-type]
    return reg


def serve(base: Path, host: str, port: int, stop: threading.Event | None = None) -> None:
    """Serve /metrics until SIGTERM/SIGINT (or `stop`)."""
    stop = stop or threading.Event()
    server, thread = start_http_server(port, addr=host, registry=node_registry(base))
    logger.warning("moe_reuse exporter: serving %s on http://%s:%d/metrics", base, host, port)
    print(f"moe-reuse exporter: reading {base}, serving http://{host}:{port}/metrics", flush=True)

    def _stop(*_: Any) -> None:
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
    try:
        while not stop.is_set():
            time.sleep(0.2)
    finally:
        server.shutdown()
        thread.join(timeout=5)


def _cmd(args: argparse.Namespace) -> int:
    base = Path(args.snapshot_dir) if args.snapshot_dir else base_dir()
    host, port = parse_listen(args.listen)
    serve(base, host, port)
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
                        "to let a Prometheus on another host scrape it)")
    p.set_defaults(func=_cmd)
