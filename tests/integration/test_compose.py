"""infra/compose.yaml as Compose itself reads it, and the Grafana dashboard beside it.

``docker-compose config`` (or ``docker compose config``) interpolates and validates
the file without pulling an image or talking to an engine; the tests assert on its
rendered output, so they see what ``up`` would run. Compose runs with a clean
environment and an empty env file, so a developer's shell or an ``infra/.env``
cannot make a test pass.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "infra" / "compose.yaml"
DOCKERFILE = "infra/docker/service.Dockerfile"
PROMETHEUS_CONFIG = REPO / "infra" / "prometheus" / "prometheus.yml"
GRAFANA = REPO / "infra" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "agentbus.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "agentbus.yaml"
DASHBOARD_PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "agentbus.yaml"

AGENTBUS_SERVICES = ("planner", "executor", "sandbox", "memory", "gateway")
INFRA_SERVICES = ("nats", "postgres", "jaeger", "prometheus", "grafana")
SCALABLE = ("executor", "sandbox")
DOCKER_SOCKET = "/var/run/docker.sock"
DEFAULT_WORKSPACES = "/var/lib/agentbus/workspaces"

# Environment variable names that hold secrets.
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEY|PRIVATE_KEY", re.IGNORECASE)


# --- running Compose --------------------------------------------------------------------


def _compose_command() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(
            ["docker", "compose", "version"], capture_output=True, check=False, timeout=30
        )
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


@pytest.fixture(scope="module")
def compose() -> list[str]:
    command = _compose_command()
    if command is None:
        pytest.skip(
            "neither docker-compose nor `docker compose` is installed "
            "(`make setup` as root installs Debian's docker-compose)"
        )
    return command


@pytest.fixture(scope="module")
def empty_env_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("compose") / "empty.env"
    path.write_text("")
    return path


@pytest.fixture(scope="module")
def run_config(compose: list[str], empty_env_file: Path) -> Iterator[Any]:
    """``config`` with exactly the given variables (plus PATH) in its environment."""

    def run(**env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*compose, "--env-file", str(empty_env_file), "-f", str(COMPOSE_FILE), "config"],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
            cwd=REPO,
            env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(empty_env_file.parent), **env},
        )

    yield run


def _rendered(run_config: Any, **env: str) -> dict[str, Any]:
    result = run_config(**env)
    assert result.returncode == 0, f"compose config failed:\n{result.stderr}"
    config = yaml.safe_load(result.stdout)
    assert isinstance(config, dict)
    return config


@pytest.fixture(scope="module")
def postgres_password() -> str:
    return f"pw-{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def services(run_config: Any, postgres_password: str) -> dict[str, dict[str, Any]]:
    return _rendered(run_config, POSTGRES_PASSWORD=postgres_password)["services"]


# --- normalising the two Compose versions' output -----------------------------------------


def _env(service: dict[str, Any]) -> dict[str, str | None]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # KEY=VALUE strings
        return dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return {key: None if value is None else str(value) for key, value in env.items()}


def _depends_on(service: dict[str, Any]) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):  # short form: started, not healthy
        return dict.fromkeys(deps, "service_started")
    return {name: spec.get("condition", "service_started") for name, spec in deps.items()}


def _mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of every volume, from short or long syntax."""
    mounts = []
    for volume in service.get("volumes") or []:
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = volume.get("source", ""), volume["target"]
        mounts.append((source, target))
    return mounts


def _healthcheck_argv(service: dict[str, Any]) -> list[str]:
    check = service.get("healthcheck") or {}
    if check.get("disable"):
        return []
    test = check.get("test") or []
    return [test] if isinstance(test, str) else list(test)


def _published_ports(service: dict[str, Any]) -> list[str]:
    published = []
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            if port.get("published"):
                published.append(str(port["published"]))
        elif str(port).count(":") >= 1:  # [ip:]host:container
            published.append(str(port))
    return published


# --- the compose file ---------------------------------------------------------------------


def test_all_ten_services_are_defined(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == {*INFRA_SERVICES, *AGENTBUS_SERVICES}


def test_every_service_has_a_healthcheck(services: dict[str, dict[str, Any]]) -> None:
    missing = [
        name
        for name, service in services.items()
        if _healthcheck_argv(service)[:1] not in (["CMD"], ["CMD-SHELL"])
    ]
    assert not missing, f"no usable healthcheck: {missing}"


@pytest.mark.parametrize("name", AGENTBUS_SERVICES)
def test_agentbus_service_is_built_and_probed_on_readyz(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    service = services[name]
    build = service["build"]
    assert Path(build["context"]).resolve() == REPO
    assert build["dockerfile"] == DOCKERFILE
    args = build.get("args") or {}
    if isinstance(args, list):
        args = dict(arg.split("=", 1) for arg in args if "=" in arg)
    assert args.get("SERVICE") == name

    env = _env(service)
    assert env["AGENTBUS_NATS_URL"] == "nats://nats:4222"
    assert env["AGENTBUS_HTTP_HOST"] == "0.0.0.0"
    port = env["AGENTBUS_HTTP_PORT"]
    assert port == "9464"
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4318"
    probe = " ".join(_healthcheck_argv(service))
    assert f"127.0.0.1:{port}/readyz" in probe


@pytest.mark.parametrize("name", AGENTBUS_SERVICES)
def test_agentbus_service_waits_for_a_healthy_bus(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    assert _depends_on(services[name]).get("nats") == "service_healthy"


def test_memory_waits_for_a_healthy_postgres_and_uses_it(
    services: dict[str, dict[str, Any]], postgres_password: str
) -> None:
    memory = services["memory"]
    assert _depends_on(memory).get("postgres") == "service_healthy"
    url = _env(memory)["AGENTBUS_DATABASE_URL"]
    assert url == f"postgresql://agentbus:{postgres_password}@postgres:5432/agentbus"
    postgres_env = _env(services["postgres"])
    assert postgres_env["POSTGRES_USER"] == "agentbus"
    assert postgres_env["POSTGRES_DB"] == "agentbus"


def test_nats_runs_jetstream_with_monitoring_and_a_volume(
    services: dict[str, dict[str, Any]],
) -> None:
    nats = services["nats"]
    command = nats["command"]
    command = command.split() if isinstance(command, str) else command
    assert "--jetstream" in command or "-js" in command
    assert "--http_port=8222" in command
    assert "8222/healthz" in " ".join(_healthcheck_argv(nats))
    store = next(arg.split("=", 1)[1] for arg in command if arg.startswith("--store_dir="))
    assert store in {target for _, target in _mounts(nats)}


@pytest.mark.parametrize("name", SCALABLE)
def test_scalable_service_has_no_fixed_name_or_host_port(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    service = services[name]
    assert "container_name" not in service
    assert _published_ports(service) == []


@pytest.mark.parametrize("workspaces", [None, "/srv/agentbus test/ws"])
def test_sandbox_sees_docker_socket_and_workspaces_at_host_paths(
    run_config: Any, workspaces: str | None
) -> None:
    env = {"POSTGRES_PASSWORD": "x"}
    if workspaces:
        env["AGENTBUS_WORKSPACES"] = workspaces
    sandbox = _rendered(run_config, **env)["services"]["sandbox"]
    mounts = _mounts(sandbox)
    assert (DOCKER_SOCKET, DOCKER_SOCKET) in mounts
    root = _env(sandbox)["AGENTBUS_SANDBOX_WORKSPACE_ROOT"]
    assert root == (workspaces or DEFAULT_WORKSPACES)
    # The host engine mounts workspaces by host path: same path on both sides.
    assert (root, root) in mounts


def _secret_interpolations(text: str) -> list[str]:
    """Every ${NAME...} in text whose NAME looks like a secret and has a literal default."""
    bad = []
    for match in re.finditer(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}", text):
        name, operator, default = match.groups()
        if SECRET_NAME.search(name) and operator in {"-", ":-"} and default:
            bad.append(match.group(0))
    return bad


def test_secret_checker_catches_a_literal_default() -> None:
    assert _secret_interpolations("A: ${DB_PASSWORD:-hunter2}\nB: ${API_TOKEN-abc}") == [
        "${DB_PASSWORD:-hunter2}",
        "${API_TOKEN-abc}",
    ]
    assert _secret_interpolations("${X_PASSWORD:?set it} ${LLM_API_KEY:-} ${PORT:-80}") == []


def test_no_secret_has_a_literal_default(
    services: dict[str, dict[str, Any]], postgres_password: str
) -> None:
    assert _secret_interpolations(COMPOSE_FILE.read_text()) == []
    # Rendered with no secret but POSTGRES_PASSWORD set: every secret-named variable
    # is empty, unset, or exactly what the environment gave.
    leaked = {
        f"{name}.{key}": value
        for name, service in services.items()
        for key, value in _env(service).items()
        if SECRET_NAME.search(key) and value not in (None, "", postgres_password)
    }
    assert not leaked, f"secrets with a value nobody set: {leaked}"


def test_config_fails_without_postgres_password(run_config: Any) -> None:
    result = run_config()
    assert result.returncode != 0
    assert "POSTGRES_PASSWORD" in result.stderr + result.stdout


def test_prometheus_scrapes_every_service_on_its_http_port(
    services: dict[str, dict[str, Any]],
) -> None:
    prometheus = services["prometheus"]
    config_mount = next(
        source for source, target in _mounts(prometheus) if target.endswith("prometheus.yml")
    )
    assert Path(config_mount).resolve() == PROMETHEUS_CONFIG

    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    targets: set[tuple[str, str]] = set()
    for job in config["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            targets.update((name, str(sd["port"])) for name in sd["names"])
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, port = target.rsplit(":", 1)
                targets.add((host, port))
    for name in AGENTBUS_SERVICES:
        assert (name, _env(services[name])["AGENTBUS_HTTP_PORT"]) in targets, name


def test_grafana_is_provisioned_from_the_repository(services: dict[str, dict[str, Any]]) -> None:
    mounts = {target: Path(source).resolve() for source, target in _mounts(services["grafana"])}
    assert mounts["/etc/grafana/provisioning"] == GRAFANA / "provisioning"
    providers = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())["providers"]
    dashboard_dirs = {provider["options"]["path"] for provider in providers}
    assert any(mounts.get(path) == DASHBOARD.parent for path in dashboard_dirs)


# --- the Grafana dashboard ----------------------------------------------------------------

# The metrics the services export (prometheus_client adds _total to counters and
# _bucket/_sum/_count to histograms).
COUNTERS = (
    "faststream_received_processed_messages_total",
    "faststream_received_processed_messages_exceptions_total",
    "agentbus_llm_calls_total",
    "agentbus_llm_tokens_total",
    "agentbus_llm_cost_usd_total",
)
GAUGES = (
    "agentbus_consumer_pending",
    "agentbus_consumer_ack_pending",
    "agentbus_sandbox_pool_size",
)
HISTOGRAMS = (
    "faststream_received_processed_messages_duration_seconds",
    "agentbus_llm_call_seconds",
    "agentbus_sandbox_exec_seconds",
    "agentbus_memory_search_seconds",
)
KNOWN_METRICS = {
    *COUNTERS,
    *GAUGES,
    *(f"{h}_{suffix}" for h in HISTOGRAMS for suffix in ("bucket", "sum", "count")),
}

# PromQL words that are not metric names (functions are recognised by their "(").
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool"}
PROMQL_KEYWORDS |= {"and", "or", "unless", "offset", "inf", "nan"}
IDENTIFIER = r"[A-Za-z_:][A-Za-z0-9_:]*"


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (with Grafana variables) selects."""
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors
    text = re.sub(r"\$\{?\w+\}?", "", text)  # $__rate_interval, $service, ...
    text = re.sub(
        r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text
    )  # grouping label lists
    names = {
        match.group(1)
        for match in re.finditer(rf"(?<![\w.:])({IDENTIFIER})(\s*\()?", text)
        if not match.group(2)  # a function call, not a metric
    }
    return {name for name in names if name.lower() not in PROMQL_KEYWORDS}


def _template_metric_names(query: str) -> set[str]:
    match = re.fullmatch(
        rf"\s*label_values\(\s*(?:({IDENTIFIER})\s*,\s*)?{IDENTIFIER}\s*\)\s*", query
    )
    if match:
        return {match.group(1)} if match.group(1) else set()
    return metric_names(query)


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    parsed = json.loads(DASHBOARD.read_text())
    assert isinstance(parsed, dict)
    return parsed


def test_metric_name_extraction() -> None:
    expr = (
        "histogram_quantile(0.95, sum by (le, job) (rate(foo_seconds_bucket"
        '{job=~"$service", status!="acked"}[$__rate_interval]))) * 3600'
    )
    assert metric_names(expr) == {"foo_seconds_bucket"}
    assert metric_names("max by (durable) (agentbus_consumer_pendnig)") == {
        "agentbus_consumer_pendnig"
    }
    assert metric_names("sum(a_total) / on (job) group_left b_total") == {"a_total", "b_total"}
    assert _template_metric_names("label_values(bar_total, job)") == {"bar_total"}


def test_dashboard_is_a_provisionable_grafana_dashboard(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"]
    assert dashboard["title"]
    assert 36 <= dashboard["schemaVersion"] <= 41
    ids = [panel["id"] for panel in _panels(dashboard["panels"])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in _panels(dashboard["panels"]):
        position = panel["gridPos"]
        assert position["x"] + position["w"] <= 24, panel["title"]


def test_dashboard_panels_query_the_provisioned_prometheus(dashboard: dict[str, Any]) -> None:
    datasources = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    prometheus_uid = next(ds["uid"] for ds in datasources if ds["type"] == "prometheus")
    for panel in _panels(dashboard["panels"]):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == prometheus_uid, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target.get("datasource", panel["datasource"])["uid"] == prometheus_uid
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            assert variable["datasource"]["uid"] == prometheus_uid, variable["name"]


def test_dashboard_uses_only_exported_metrics_and_all_of_them(dashboard: dict[str, Any]) -> None:
    used: set[str] = set()
    for panel in _panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            names = metric_names(target["expr"])
            assert names, f"{panel['title']}: no metric in {target['expr']!r}"
            assert names <= KNOWN_METRICS, f"{panel['title']}: unknown {names - KNOWN_METRICS}"
            used |= names
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        query = query.get("query", "") if isinstance(query, dict) else query or ""
        names = _template_metric_names(query)
        assert names <= KNOWN_METRICS, f"${variable['name']}: unknown {names - KNOWN_METRICS}"

    families = {*COUNTERS, *GAUGES, *HISTOGRAMS}
    shown = {f for f in families if any(name == f or name.startswith(f"{f}_") for name in used)}
    assert shown == families, f"no panel for {families - shown}"
