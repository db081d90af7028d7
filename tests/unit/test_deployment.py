"""docker-compose.yml, the Dockerfiles and deploy/ stay deployable (no Docker engine runs here).

What can be proved without an engine is proved: the files parse, every file they reference
exists, images are pinned, the gateway runs non-root with its configuration read-only, the
Prometheus rules and the Grafana dashboard only use the normative metric names (DESIGN.md §8),
the Postfix peers' main.cf is accepted by Postfix's own `postconf`, and deploy/routing.yaml
passes `gateway check` once key material is in place.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.check import run_check
from gateway.config import load
from gateway.demo_pki import ensure_pki

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
# Postfix's own tools judge the peers' main.cf (`make test` installs Postfix when missing).
_SBIN = "/usr/sbin:/sbin"
POSTCONF = shutil.which("postconf", path=_SBIN) or "postconf"
POSTMAP = shutil.which("postmap", path=_SBIN) or "postmap"
# Material the operator supplies (IGC-Santé keys, the official whitelist), never committed:
# `make demo` writes a demonstration set there. Every other referenced path must exist.
OPERATOR_SUPPLIED = ("pki", "data")
NORMATIVE_METRICS = {
    "gateway_messages_received_total", "gateway_messages_delivered_total",
    "gateway_messages_failed_total", "gateway_queue_messages", "gateway_process_seconds",
    "gateway_signature_verifications_total", "gateway_certificate_expiry_seconds",
    "gateway_crl_next_update_timestamp_seconds",
}
# Dockerfile instructions (the reference's full list) and the ones whose sources are files.
INSTRUCTIONS = {
    "FROM", "RUN", "CMD", "LABEL", "MAINTAINER", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT",
    "VOLUME", "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL",
}


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def bind_mounts(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(host path, container path, mode) of each bind mount; named volumes are skipped."""
    found = []
    for mount in service.get("volumes", []):
        parts = mount.split(":")
        if parts[0].startswith((".", "/")):
            mode = parts[2] if len(parts) > 2 else "rw"
            found.append((parts[0], parts[1], mode))
    return found


def dockerfile(path: Path) -> list[tuple[str, str]]:
    """(instruction, arguments) with continuation lines joined; raises on unknown instructions."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # comments inside a continued RUN are allowed and dropped
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, f"{path}: the last instruction ends with a line continuation"
    parsed = []
    for line in logical:
        word, _, rest = line.partition(" ")
        assert word.upper() in INSTRUCTIONS, f"{path}: unknown instruction {word!r}"
        parsed.append((word.upper(), rest.strip()))
    return parsed


def pinned(image: str) -> bool:
    """An exact release (a version tag with a digit, never `latest`) or a digest."""
    if "@sha256:" in image:
        return True
    _, _, tag = image.rpartition(":")
    return bool(tag) and "/" not in tag and tag != "latest" and any(c.isdigit() for c in tag)


def test_compose_parses_and_has_the_whole_stack() -> None:
    services = compose()["services"]
    for name in ("gateway", "hospital-mta", "medecin-mta", "mailpit", "prometheus", "grafana"):
        assert name in services, name


def test_every_referenced_file_exists() -> None:
    spec = compose()
    for name, service in spec["services"].items():
        build = service.get("build")
        if build is not None:
            context = ROOT / (build if isinstance(build, str) else build["context"])
            file = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
            assert (context / file).is_file(), f"{name}: {context / file}"
        for host, _, _ in bind_mounts(service):
            relative = Path(host).relative_to(".") if host.startswith(".") else Path(host)
            if relative.parts[0] in OPERATOR_SUPPLIED:
                continue
            assert (ROOT / relative).exists(), f"{name}: {host} does not exist"
    for secret in spec.get("secrets", {}).values():
        assert (ROOT / secret["file"]).is_file()
    dashboards = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/dashboards/passerelle.yml").read_text())
    grafana_mounts = {c: h for h, c, _ in bind_mounts(spec["services"]["grafana"])}
    for provider in dashboards["providers"]:
        host = grafana_mounts[provider["options"]["path"]]
        assert list((ROOT / host).glob("*.json")), "the dashboard provider points at no dashboard"


def test_gateway_runs_non_root_with_configuration_and_keys_read_only() -> None:
    service = compose()["services"]["gateway"]
    assert str(service["user"]).split(":")[0] not in ("0", "root")
    assert service["read_only"] is True
    mounts = {container: (host, mode) for host, container, mode in bind_mounts(service)}
    assert mounts["/srv/passerelle/routing.yaml"][1] == "ro"
    assert mounts["/srv/passerelle/pki"][1] == "ro"
    named = [m for m in service["volumes"] if not m.startswith((".", "/"))]
    assert any(m.endswith(":/srv/passerelle/var/spool") for m in named)
    assert any(m.endswith(":/srv/passerelle/var/audit") for m in named)
    assert "healthz" in " ".join(service["healthcheck"]["test"])
    # The metrics endpoint is published to the host's loopback only.
    assert "127.0.0.1:9464:9464" in service["ports"]


def test_images_are_pinned_and_dockerfiles_parse() -> None:
    for name, service in compose()["services"].items():
        if "build" not in service:
            assert pinned(service["image"]), f"{name}: {service['image']} is not pinned"
    for path, context in ((ROOT / "Dockerfile", ROOT),
                          (ROOT / "deploy/postfix/Dockerfile", ROOT / "deploy/postfix")):
        instructions = dockerfile(path)
        assert instructions[0][0] == "FROM"
        for word, argument in instructions:
            if word == "FROM":
                assert pinned(argument.split()[0]), f"{path}: base image {argument} is not pinned"
            if word in ("COPY", "ADD"):
                sources = [s for s in argument.split()[:-1] if not s.startswith("--")]
                for source in sources:
                    assert (context / source).exists(), f"{path}: COPY source {source} missing"
    words = dict(dockerfile(ROOT / "Dockerfile"))
    assert words["USER"] not in ("root", "0")


def test_prometheus_scrapes_the_gateway_and_alerts_use_normative_metrics() -> None:
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    targets = [t for job in config["scrape_configs"] for s in job["static_configs"]
               for t in s["targets"]]
    gateway = compose()["services"]["gateway"]
    aliases = gateway["networks"]["mail"]["aliases"]
    routing = yaml.safe_load((ROOT / "deploy/routing.yaml").read_text())
    port = routing["gateway"]["metrics"]["port"]
    assert any(t == f"{alias}:{port}" for t in targets for alias in aliases)
    rules = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    names = set()
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert rule["alert"] and rule["expr"] and rule["annotations"]["summary"]
            names |= set(re.findall(r"gateway_[a-z_]+", rule["expr"]))
    assert names <= NORMATIVE_METRICS, names - NORMATIVE_METRICS
    # An alert fires 30 days before a certificate expires (issue: certificate and CRL expiry).
    assert any("gateway_certificate_expiry_seconds" in r["expr"] and "30 * 86400" in r["expr"]
               for g in rules["groups"] for r in g["rules"])


def test_grafana_dashboard_covers_throughput_failures_queue_and_expiry() -> None:
    board = json.loads((ROOT / "deploy/grafana/dashboards/passerelle.json").read_text())
    datasources = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    uids = {d["uid"] for d in datasources["datasources"]}
    expressions = []
    for panel in board["panels"]:
        assert panel["datasource"]["uid"] in uids
        expressions += [t["expr"] for t in panel["targets"]]
    used = {m for e in expressions for m in re.findall(r"gateway_[a-z_]+", e)}
    used = {m.removesuffix("_bucket") for m in used}
    assert used <= NORMATIVE_METRICS, used - NORMATIVE_METRICS
    for wanted in ("gateway_messages_delivered_total", "gateway_messages_failed_total",
                   "gateway_queue_messages", "gateway_certificate_expiry_seconds"):
        assert wanted in used, wanted


@pytest.mark.parametrize("role", ["hospital", "medecin"])
def test_postfix_peers_main_cf_is_accepted_by_postconf(role: str, tmp_path: Path) -> None:
    shutil.copy(ROOT / f"deploy/postfix/{role}/main.cf", tmp_path / "main.cf")
    shutil.copy("/etc/postfix/master.cf", tmp_path / "master.cf")
    result = subprocess.run([POSTCONF, "-c", str(tmp_path), "-n"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr, result.stderr
    settings = {}
    for line in result.stdout.splitlines():
        name, _, value = line.partition("=")
        settings[name.strip()] = value.strip()
    assert settings["smtp_tls_security_level"] == "secure"
    assert settings["relayhost"] == "[passerelle.example.org]:2525"
    # The inline tables parse: the network's own domain goes to the mail viewer.
    domain = settings["relay_domains"]
    looked_up = subprocess.run(
        [POSTMAP, "-c", str(tmp_path), "-q", domain, settings["transport_maps"]],
        capture_output=True, text=True, timeout=60)
    assert looked_up.stdout.strip() == "smtp:[mailpit]:1025", looked_up.stderr


def test_deploy_routing_yaml_checks_clean_with_key_material(tmp_path: Path) -> None:
    config_path = tmp_path / "routing.yaml"
    shutil.copy(ROOT / "deploy/routing.yaml", config_path)
    ensure_pki(load(config_path), dt.datetime.now(dt.UTC))
    report = run_check(config_path, dt.datetime.now(dt.UTC))
    assert report.ok, "\n".join(str(p) for p in report.errors)
    # The Postfix peers present the demonstration MTA certificates the compose file mounts.
    for host, _, _ in bind_mounts(compose()["services"]["hospital-mta"]):
        if host.startswith("./pki/"):
            assert (tmp_path / host.removeprefix("./")).is_file(), host
    # Their subject DNs are the ones routing.yaml expects of the medecin network's peer.
    medecin = load(config_path).networks["medecin"]
    assert medecin.relay is not None and medecin.relay.host == "mx.medecin.fr"
    aliases = compose()["services"]["medecin-mta"]["networks"]["mail"]["aliases"]
    assert medecin.relay.host in aliases
