#!/usr/bin/env bash
# Runs Debian's Prometheus and Alertmanager (apt-get install prometheus prometheus-alertmanager)
# against a vLLM server on this machine, with the generated rules. No Docker needed.
#
#   deploy/local/run-prometheus.sh 127.0.0.1:8000 [HOST:PORT ...]
#   deploy/local/run-prometheus.sh --print-config 127.0.0.1:8000   # print prometheus.yml, exit
#
# Environment (defaults in brackets):
#   PROM_PORT [9090]  AM_PORT [9093]  LISTEN_HOST [127.0.0.1]
#   SCRAPE_INTERVAL [5s]  EVAL_INTERVAL [5s]
#   RULES_FILE [deploy/prometheus/moe-reuse-rules.yml]
#   ALERT_WEBHOOK_URL  [unset: alerts stay in Alertmanager's UI]  webhook receiving the alerts
#   GROUP_WAIT [10s]  GROUP_INTERVAL [1m]  REPEAT_INTERVAL [4h]
#   WORK_DIR [a new temp dir, removed on exit]  data, configs and logs (prometheus.log, alertmanager.log)
#   PROMETHEUS_BIN [prometheus]  ALERTMANAGER_BIN [prometheus-alertmanager]
#
# Ctrl-C (or SIGTERM) stops both servers. The configuration mirrors deploy/prometheus/prometheus.yml
# and deploy/alertmanager/alertmanager.yml (tests/test_deploy.py checks that they agree).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DEPLOY="$(dirname "$HERE")"

PRINT_ONLY=0
if [[ "${1:-}" == "--print-config" ]]; then
  PRINT_ONLY=1
  shift
fi
if [[ $# -lt 1 || "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  exit 2
fi

PROM_PORT="${PROM_PORT:-9090}"
AM_PORT="${AM_PORT:-9093}"
LISTEN_HOST="${LISTEN_HOST:-127.0.0.1}"
SCRAPE_INTERVAL="${SCRAPE_INTERVAL:-5s}"
EVAL_INTERVAL="${EVAL_INTERVAL:-5s}"
RULES_FILE="${RULES_FILE:-$DEPLOY/prometheus/moe-reuse-rules.yml}"
GROUP_WAIT="${GROUP_WAIT:-10s}"
GROUP_INTERVAL="${GROUP_INTERVAL:-1m}"
REPEAT_INTERVAL="${REPEAT_INTERVAL:-4h}"
PROMETHEUS_BIN="${PROMETHEUS_BIN:-prometheus}"
ALERTMANAGER_BIN="${ALERTMANAGER_BIN:-prometheus-alertmanager}"

targets=""
for t in "$@"; do
  targets+="${targets:+, }\"$t\""
done

prometheus_config() {
  cat <<EOF
# Written by deploy/local/run-prometheus.sh (mirrors deploy/prometheus/prometheus.yml).
global:
  scrape_interval: $SCRAPE_INTERVAL
  evaluation_interval: $EVAL_INTERVAL

rule_files:
  - $RULES_FILE

alerting:
  alertmanagers:
    - static_configs:
        - targets: ["$LISTEN_HOST:$AM_PORT"]

scrape_configs:
  - job_name: vllm
    metrics_path: /metrics
    static_configs:
      - targets: [$targets]
EOF
}

alertmanager_config() {
  cat <<EOF
# Written by deploy/local/run-prometheus.sh (mirrors deploy/alertmanager/alertmanager.yml).
route:
  receiver: default
  group_by: [alertname, model, instance]
  group_wait: $GROUP_WAIT
  group_interval: $GROUP_INTERVAL
  repeat_interval: $REPEAT_INTERVAL

receivers:
  - name: default
EOF
  if [[ -n "${ALERT_WEBHOOK_URL:-}" ]]; then
    cat <<EOF
    webhook_configs:
      - url: "$ALERT_WEBHOOK_URL"
        send_resolved: true
EOF
  fi
}

if [[ $PRINT_ONLY == 1 ]]; then
  prometheus_config
  exit 0
fi

for bin in "$PROMETHEUS_BIN" "$ALERTMANAGER_BIN"; do
  command -v "$bin" >/dev/null || {
    echo "missing $bin: apt-get install -y prometheus prometheus-alertmanager" >&2
    exit 1
  }
done
[[ -r "$RULES_FILE" ]] || { echo "no rules file $RULES_FILE" >&2; exit 1; }

OWN_WORK_DIR=0
if [[ -z "${WORK_DIR:-}" ]]; then
  WORK_DIR="$(mktemp -d -t moe-reuse-prometheus.XXXXXX)"
  OWN_WORK_DIR=1
fi
mkdir -p "$WORK_DIR/prometheus-data" "$WORK_DIR/alertmanager-data"

pids=()
cleanup() {
  trap - EXIT INT TERM
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${pids[@]}"; do
    for _ in $(seq 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
  done
  if [[ $OWN_WORK_DIR == 1 ]]; then
    rm -rf "$WORK_DIR"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

prometheus_config >"$WORK_DIR/prometheus.yml"
alertmanager_config >"$WORK_DIR/alertmanager.yml"

"$ALERTMANAGER_BIN" \
  --config.file="$WORK_DIR/alertmanager.yml" \
  --storage.path="$WORK_DIR/alertmanager-data" \
  --web.listen-address="$LISTEN_HOST:$AM_PORT" \
  --cluster.listen-address="" \
  >"$WORK_DIR/alertmanager.log" 2>&1 &
pids+=("$!")

"$PROMETHEUS_BIN" \
  --config.file="$WORK_DIR/prometheus.yml" \
  --storage.tsdb.path="$WORK_DIR/prometheus-data" \
  --web.listen-address="$LISTEN_HOST:$PROM_PORT" \
  --web.enable-lifecycle \
  >"$WORK_DIR/prometheus.log" 2>&1 &
pids+=("$!")

wait_ready() {
  local url="$1" name="$2"
  for _ in $(seq 100); do
    if curl -fsS "$url" >/dev/null 2>&1; then
      echo "$name ready at ${url%/-/ready}"
      return 0
    fi
    sleep 0.2
  done
  echo "$name did not become ready; log in $WORK_DIR" >&2
  return 1
}
wait_ready "http://$LISTEN_HOST:$AM_PORT/-/ready" alertmanager
wait_ready "http://$LISTEN_HOST:$PROM_PORT/-/ready" prometheus
echo "scraping $* every $SCRAPE_INTERVAL; work dir $WORK_DIR; Ctrl-C to stop"

# Exit (and stop the other) as soon as either server dies.
wait -n "${pids[@]}"
echo "a server exited:" >&2
tail -n 20 "$WORK_DIR"/*.log >&2 || true
exit 1
