"""deploy/: docker-compose, Prometheus/Alertmanager/Grafana provisioning, Kubernetes manifests and
the local script agree with each other and with the generated rules and dashboards.

Docker is not runnable here, so the compose file is checked by parsing it against the files it
mounts; `promtool check config` and `amtool check-config` validate the configs themselves.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from moe_reuse.dashboards.config import DEFAULT
from moe_reuse.dashboards.generate import (
    GENERATED_DIR,
    K8S_DASHBOARDS_PATH,
    K8S_RULE_PATH,
    REPO_ROOT,
    RULES_PATH,
    artifacts,
    dashboard_dicts,
)
from moe_reuse.dashboards.rules import rules_file

DEPLOY = REPO_ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
PROM_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
AM_CONFIG = DEPLOY / "alertmanager" / "alertmanager.yml"
SCRIPT = DEPLOY / "local" / "run-prometheus.sh"
K8S = DEPLOY / "k8s"


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _yaml_all(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc: dict[str, Any] = _yaml(COMPOSE)
    return doc


def _mounts(service: dict[str, Any]) -> dict[str, Path]:
    """container path -> host path (resolved against deploy/) of a service's bind mounts."""
    out = {}
    for v in service.get("volumes", []):
        src, dst = v.split(":")[:2]
        if src.startswith("."):
            out[dst] = (DEPLOY / src).resolve()
    return out


def _host_path(service: dict[str, Any], container_path: str) -> Path:
    """Where a file the container reads lives in this repository, through its bind mounts."""
    for dst, src in sorted(_mounts(service).items(), key=lambda kv: -len(kv[0])):
        if container_path == dst or container_path.startswith(dst.rstrip("/") + "/"):
            return src / container_path[len(dst) :].lstrip("/")
    raise AssertionError(f"{container_path} is not mounted into the container")


def _flag(args: list[str], name: str) -> str:
    for i, a in enumerate(args):
        if a == name:
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    raise AssertionError(f"{name} not in {args}")


def _container_ports(service: dict[str, Any]) -> set[int]:
    return {int(str(p).split(":")[-1]) for p in service.get("ports", [])}


# ------------------------------------------------------------------------------------------------
# docker-compose
# ------------------------------------------------------------------------------------------------


def test_compose_has_the_stack(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"vllm", "prometheus", "alertmanager", "grafana",
                                        "moe-reuse-exporter"}
    assert compose["services"]["moe-reuse-exporter"]["profiles"] == ["node-exporter"]  # opt-in


def test_compose_vllm_installs_and_enables_the_plugin(compose: dict[str, Any]) -> None:
    vllm = compose["services"]["vllm"]
    dockerfile = (DEPLOY / vllm["build"]["context"] / vllm["build"]["dockerfile"]).resolve()
    text = dockerfile.read_text()
    assert "vllm/vllm-openai" in text and "pip install" in text
    context = (DEPLOY / vllm["build"]["context"]).resolve()
    assert context == REPO_ROOT
    for line in text.splitlines():
        if line.startswith("COPY "):
            for src in shlex.split(line)[1:-1]:
                assert (context / src).exists(), f"Dockerfile copies missing {src}"
    cfg = json.loads(_flag(vllm["command"], "--additional-config"))
    assert "moe_reuse" in cfg
    assert cfg["moe_reuse"].get("per_expert_series") is True  # the heatmap needs it
    assert "vllm.entrypoints.openai.api_server" in vllm["entrypoint"]


def test_compose_prometheus_scrapes_vllm_and_loads_the_generated_rules(
    compose: dict[str, Any],
) -> None:
    svc = compose["services"]
    prom = svc["prometheus"]
    config_in_container = _flag(prom["command"], "--config.file")
    config = _host_path(prom, config_in_container)
    assert config == PROM_CONFIG.resolve()
    doc = _yaml(config)
    # Rules: resolved next to the config, i.e. the generated file in the mounted directory.
    for rule_file in doc["rule_files"]:
        assert not rule_file.startswith("/"), "relative, so that promtool and the container agree"
        path = config.parent / rule_file
        assert path.read_text() == artifacts()[RULES_PATH]
    # Scrape: vLLM's service name and the port it serves on.
    (job,) = doc["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    ((target,),) = [sc["targets"] for sc in job["static_configs"]]
    host, port = target.split(":")
    assert host == "vllm"
    assert int(port) == int(_flag(svc["vllm"]["command"], "--port"))
    assert int(port) in _container_ports(svc["vllm"])
    # Alerting: the alertmanager service.
    (am,) = doc["alerting"]["alertmanagers"]
    ((am_target,),) = [sc["targets"] for sc in am["static_configs"]]
    am_host, am_port = am_target.split(":")
    assert am_host == "alertmanager" and int(am_port) in _container_ports(svc["alertmanager"])


def test_compose_alertmanager_config_is_mounted(compose: dict[str, Any]) -> None:
    am = compose["services"]["alertmanager"]
    assert _host_path(am, _flag(am["command"], "--config.file")) == AM_CONFIG.resolve()


def test_compose_grafana_provisions_datasource_and_generated_dashboards(
    compose: dict[str, Any],
) -> None:
    svc = compose["services"]
    graf = svc["grafana"]
    prov = _host_path(graf, "/etc/grafana/provisioning")
    assert prov == (DEPLOY / "grafana" / "provisioning").resolve()
    (ds,) = _yaml(prov / "datasources" / "prometheus.yml")["datasources"]
    assert ds["type"] == "prometheus" and ds["isDefault"]
    assert ds["url"] == "http://prometheus:9090"
    assert 9090 in _container_ports(svc["prometheus"])
    (provider,) = _yaml(prov / "dashboards" / "moe-reuse.yml")["providers"]
    dash_dir = _host_path(graf, provider["options"]["path"])
    assert dash_dir == (REPO_ROOT / GENERATED_DIR).resolve()
    files = {p.name for p in dash_dir.glob("*.json")}
    assert files == {f"{uid}.json" for uid in dashboard_dicts()}
    home = graf["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert _host_path(graf, home).exists()


# ------------------------------------------------------------------------------------------------
# Prometheus / Alertmanager configs and the local script
# ------------------------------------------------------------------------------------------------

promtool = shutil.which("promtool")
amtool = shutil.which("amtool")


@pytest.mark.skipif(promtool is None, reason="promtool not on PATH (apt-get install prometheus)")
def test_promtool_check_config() -> None:
    assert promtool is not None
    out = subprocess.run(
        [promtool, "check", "config", str(PROM_CONFIG)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 rule files found" in out.stdout


@pytest.mark.skipif(
    amtool is None, reason="amtool not on PATH (apt-get install prometheus-alertmanager)"
)
def test_amtool_check_config() -> None:
    assert amtool is not None
    out = subprocess.run(
        [amtool, "check-config", str(AM_CONFIG)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_alertmanager_inhibition_names_real_alerts() -> None:
    names = {r["alert"] for r in rules_file(DEFAULT)["groups"][1]["rules"]}
    doc = _yaml(AM_CONFIG)
    for rule in doc.get("inhibit_rules", []):
        for m in rule["source_matchers"]:
            assert m.split("=", 1)[1].strip('"') in names


def test_local_script_syntax() -> None:
    out = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_local_script_config_mirrors_the_shipped_one(tmp_path: Path) -> None:
    out = subprocess.run(
        ["bash", str(SCRIPT), "--print-config", "127.0.0.1:8000"],
        capture_output=True,
        text=True,
        check=True,
    )
    local = yaml.safe_load(out.stdout)
    shipped = _yaml(PROM_CONFIG)
    assert local["global"] == shipped["global"]
    assert [Path(p).name for p in local["rule_files"]] == shipped["rule_files"]
    assert Path(local["rule_files"][0]) == (REPO_ROOT / RULES_PATH).resolve()
    for key in ("job_name", "metrics_path"):
        assert local["scrape_configs"][0][key] == shipped["scrape_configs"][0][key]
    assert local["scrape_configs"][0]["static_configs"][0]["targets"] == ["127.0.0.1:8000"]
    if promtool:
        cfg = tmp_path / "prometheus.yml"
        cfg.write_text(out.stdout)
        chk = subprocess.run(
            [promtool, "check", "config", str(cfg)], capture_output=True, text=True
        )
        assert chk.returncode == 0, chk.stdout + chk.stderr
    # Alertmanager routing: same grouping as the shipped config.
    script = SCRIPT.read_text()
    group_by = _yaml(AM_CONFIG)["route"]["group_by"]
    assert f"group_by: [{', '.join(group_by)}]" in script


def test_local_script_usage_without_target() -> None:
    out = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True)
    assert out.returncode == 2 and "run-prometheus.sh" in out.stdout


# ------------------------------------------------------------------------------------------------
# Kubernetes
# ------------------------------------------------------------------------------------------------


def _k8s_docs() -> list[dict[str, Any]]:
    return [d for p in sorted(K8S.glob("*.yaml")) if p.name != "kustomization.yaml"
            for d in _yaml_all(p)]  # fmt: skip


def _one(kind: str, name: str | None = None) -> dict[str, Any]:
    (doc,) = [d for d in _k8s_docs() if d["kind"] == kind
              and (name is None or d["metadata"]["name"] == name)]
    return doc


def test_kustomization_lists_every_manifest() -> None:
    resources = _yaml(K8S / "kustomization.yaml")["resources"]
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(resources) == on_disk


def test_prometheusrule_is_the_rules_file() -> None:
    rule = _one("PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"] == _yaml(REPO_ROOT / RULES_PATH)
    assert (REPO_ROOT / K8S_RULE_PATH).read_text() == artifacts()[K8S_RULE_PATH]


def test_dashboard_configmap_holds_the_generated_json() -> None:
    cm = _one("ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    generated = {p.name: p.read_text() for p in (REPO_ROOT / GENERATED_DIR).glob("*.json")}
    assert cm["data"] == generated
    assert (REPO_ROOT / K8S_DASHBOARDS_PATH).read_text() == artifacts()[K8S_DASHBOARDS_PATH]


def test_podmonitor_selects_the_vllm_pods_and_port() -> None:
    pm = _one("PodMonitor", "vllm-moe-reuse")
    dep = _one("Deployment")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    for k, v in pm["spec"]["selector"]["matchLabels"].items():
        assert pod_labels.get(k) == v
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics"
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert endpoint["port"] in ports
    assert ports[endpoint["port"]] == int(_flag(container["args"], "--port"))
    assert "moe_reuse" in json.loads(_flag(container["args"], "--additional-config"))


def test_service_targets_the_vllm_pods() -> None:
    svc = _one("Service")
    dep = _one("Deployment")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert all(pod_labels.get(k) == v for k, v in svc["spec"]["selector"].items())


def test_node_exporter_runs_our_command_and_its_podmonitor_labels_the_node(
    compose: dict[str, Any],
) -> None:
    """The per-node reader (`moe-reuse exporter`): the DaemonSet's and the compose service's
    arguments parse with the command's own parser, the PodMonitor scrapes that port and adds
    `node`, and the mount is the host's /dev/shm, writable (the node's reader writes the ranks'
    snapshots and its lock there)."""
    from moe_reuse.plugin.cli import build_parser

    ds = _one("DaemonSet")
    (c,) = ds["spec"]["template"]["spec"]["containers"]
    args = build_parser().parse_args(c["command"][1:] + c["args"])
    host, port = args.listen.rsplit(":", 1)
    assert c["command"][0] == "moe-reuse" and host == "0.0.0.0"
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"metrics": int(port)}
    (mount,) = c["volumeMounts"]
    assert not mount.get("readOnly") and args.snapshot_dir.startswith(mount["mountPath"])
    pm = _one("PodMonitor", "vllm-moe-reuse-exporter")
    pod_labels = ds["spec"]["template"]["metadata"]["labels"]
    assert all(pod_labels.get(k) == v for k, v in pm["spec"]["selector"]["matchLabels"].items())
    (ep,) = pm["spec"]["podMetricsEndpoints"]
    assert ep["port"] == "metrics" and ep["path"] == "/metrics"
    for monitor in (pm, _one("PodMonitor", "vllm-moe-reuse")):
        (ep,) = monitor["spec"]["podMetricsEndpoints"]
        assert {"sourceLabels": ["__meta_kubernetes_pod_node_name"],
                "targetLabel": "node"} in ep["relabelings"]
    svc = compose["services"]["moe-reuse-exporter"]
    cargs = build_parser().parse_args(svc["entrypoint"][1:] + svc["command"])
    assert (cargs.snapshot_dir, cargs.listen) == (args.snapshot_dir, args.listen)
