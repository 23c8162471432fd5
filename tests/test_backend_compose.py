"""docker-compose.yml and Dockerfile structure (no Docker engine here): services, healthchecks, volumes, the
Label Studio settings needed to reach a backend on the compose network, GPU reservations, valid CLI args."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_services_healthchecks_and_volumes(compose):
    services = compose["services"]
    assert set(services) == {"label-studio", "postgres", "backend", "trainer"}
    for name, svc in services.items():
        assert svc.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
        assert svc.get("volumes"), f"{name} has no volumes"
    named = set(compose["volumes"])
    for svc in services.values():
        for vol in svc["volumes"]:
            src = vol.split(":")[0]
            if not src.startswith((".", "/")):
                assert src in named, f"volume {src} is not declared"
            elif src.startswith("./") and src != "./media":
                assert (ROOT / src).exists(), f"{src} is mounted but missing"


def test_label_studio_on_postgres_and_can_reach_backend(compose):
    ls = compose["services"]["label-studio"]
    env = ls["environment"]
    assert env["DJANGO_DB"] == "default" and env["POSTGRE_HOST"] == "postgres"
    assert env["ML_BLOCK_LOCAL_IP"] == "false" and env["SSRF_PROTECTION_ENABLED"] == "false"
    assert ls["depends_on"]["postgres"]["condition"] == "service_healthy"
    backend_env = compose["services"]["backend"]["environment"]
    assert backend_env["LABEL_STUDIO_URL"] == "http://label-studio:8080"  # not localhost inside a container
    assert backend_env["SURGENET_ASSIST_DB_URL"].startswith("postgresql+psycopg://")
    assert "@postgres:5432/" in backend_env["SURGENET_ASSIST_DB_URL"]
    assert "SURGENET_ASSIST_WEBHOOK_SECRET" in backend_env  # webhooks without the secret are refused
    aliases = compose["services"]["backend"]["networks"]["default"]["aliases"]
    assert any("." in a for a in aliases)  # Label Studio refuses webhook URLs whose host has no dot


def test_the_backend_alias_passes_label_studios_own_url_check(compose):
    """Label Studio validates a webhook URL with Django's URLValidator and silently creates no webhook when it
    fails: the compose network name must pass it (checked with Label Studio's own Django, when installed)."""
    ls_python = ROOT / ".ls-venv" / "bin" / "python"
    if not ls_python.exists():
        pytest.skip("Label Studio's virtualenv (.ls-venv) is not installed")
    import subprocess

    alias = next(a for a in compose["services"]["backend"]["networks"]["default"]["aliases"] if "." in a)
    # the webhook's `url` is a Django URLField (label_studio/webhooks/models.py): URLValidator decides
    check = (
        "import sys; from django.conf import settings; settings.configure();"
        "from django.core.validators import URLValidator; URLValidator()(sys.argv[1])"
    )

    def accepted(url: str) -> bool:
        return subprocess.run([str(ls_python), "-c", check, url], capture_output=True).returncode == 0

    assert accepted(f"http://{alias}:9090/webhook")
    assert not accepted("http://backend:9090/webhook")  # the plain service name, as the finding said


@pytest.mark.parametrize("name", ["backend", "trainer"])
def test_gpu_reserved(compose, name):
    devices = compose["services"][name]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)


def test_backend_command_uses_real_cli_options(compose):
    import typer
    from typer.main import get_command

    from surgenet_assist.cli.backend_commands import register

    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)  # a second command keeps `serve` addressable as a subcommand
    serve = get_command(app).commands["serve"]
    known = {opt for p in serve.params for opt in p.opts}
    cmd = compose["services"]["backend"]["command"]
    assert cmd[:2] == ["surgenet-assist", "serve"]
    assert {a for a in cmd[2:] if a.startswith("--")} <= known
    assert compose["services"]["backend"]["healthcheck"]["test"][-1].count(":9090/health")


def test_dockerfile_serves_the_backend():
    text = (ROOT / "Dockerfile").read_text()
    assert text.startswith("#") and "FROM python:3.11" in text
    assert '".[backend]"' in text and "EXPOSE 9090" in text and "HEALTHCHECK" in text
    assert '"surgenet-assist", "serve"' in text


def test_trainer_runs_the_nightly_cycle_command():
    """The trainer service must run a real `surgenet-assist` command that the CLI knows."""
    import yaml
    from typer.testing import CliRunner

    from surgenet_assist.cli.main import app

    compose = yaml.safe_load((Path(__file__).resolve().parents[1] / "docker-compose.yml").read_text())
    command = compose["services"]["trainer"]["command"]
    assert command[:2] == ["surgenet-assist", "trainer"]
    result = CliRunner().invoke(app, ["trainer", "--help"])
    assert result.exit_code == 0 and "--at" in result.output
