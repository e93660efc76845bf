"""compose/prometheus.yml, compose/observability.yml, compose/grafana-dashboard.json: shapes users rely on."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

COMPOSE = Path(__file__).resolve().parents[2] / "compose"


def test_prometheus_discovers_targets_from_meshd():
    cfg = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    (job,) = cfg["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    sd = job["http_sd_configs"][0]
    assert sd["url"] == "http://127.0.0.1:15014/v1/prometheus/targets"
    assert sd["authorization"] == {"type": "Bearer", "credentials_file": "/etc/prometheus/meshd-admin.token"}


def test_observability_compose_runs_prometheus_and_grafana_on_the_host_network():
    doc = yaml.safe_load((COMPOSE / "observability.yml").read_text())
    assert "version" not in doc  # docker compose v2 warns about it; 1.29 does not need it
    services = doc["services"]
    assert set(services) == {"prometheus", "grafana"}
    for svc in services.values():
        assert svc["network_mode"] == "host" and ":" in svc["image"] and not svc["image"].endswith(":latest")
        for volume in svc["volumes"]:
            source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
            if source.startswith("./"):
                assert (COMPOSE / source).exists(), source
    token = [v for v in services["prometheus"]["volumes"] if isinstance(v, dict)]
    assert token == [{"type": "bind", "read_only": True, "target": "/etc/prometheus/meshd-admin.token",
                      "source": "${MESHD_ADMIN_TOKEN_FILE:-/var/lib/docker/volumes/meshd_meshd-state/_data/admin.token}"}]
    assert "--web.listen-address=127.0.0.1:9090" in services["prometheus"]["command"]
    assert services["grafana"]["environment"]["GF_SERVER_HTTP_ADDR"] == "127.0.0.1"
    ds = yaml.safe_load((COMPOSE / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert ds["datasources"][0]["url"] == "http://127.0.0.1:9090"


def test_grafana_dashboard_has_istio_style_panels():
    dash = json.loads((COMPOSE / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert all("istio_request" in e for e in exprs)
    joined = "\n".join(exprs)
    assert "histogram_quantile(0.99" in joined and "istio_request_duration_milliseconds_bucket" in joined
    assert 'response_code!~"5.."' in joined
    assert "destination_service, destination_version" in joined
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    assert {v["name"] for v in dash["templating"]["list"]} == {"datasource", "reporter", "service"}
