"""Shared fixtures. PostgreSQL tests skip with a reason when no server is reachable, unless
SURGENET_ASSIST_REQUIRE_POSTGRES=1 (set by .ci/run), where an unreachable server fails them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.repository_boundary import GUARD

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
PG_URL = os.environ.get("SURGENET_ASSIST_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@pytest.fixture(autouse=True)
def _reads_stay_in_repository():
    """Fails any test that read a file beside the repository (a fresh clone has nothing there)."""
    GUARD.take()
    yield
    outside = GUARD.take()
    if outside:
        paths = sorted(set(outside))[:5]
        pytest.fail(f"read outside the repository: {paths}; copy what the test needs into tests/fixtures/")


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Every test gets its own data dir and none of the deployment's variables, so no test reads a real cache,
    database or Label Studio; downloads are off."""
    home = tmp_path_factory.mktemp("surgenet-home")
    monkeypatch.setenv("SURGENET_ASSIST_HOME", str(home))
    # a developer's deployment settings never reach a test (a Label Studio URL would make `nightly` sync it)
    for name in (
        "SURGENET_ASSIST_DB_URL",
        "SURGENET_ASSIST_STORE_PROJECT",
        "SURGENET_ASSIST_SYNC_EVERY_S",
        "LABEL_STUDIO_URL",
        "LABEL_STUDIO_API_KEY",
        "BASIC_AUTH_USER",
        "BASIC_AUTH_PASS",
    ):
        monkeypatch.delenv(name, raising=False)
    yield home


def _postgres_reachable(url: str) -> str | None:
    try:
        import sqlalchemy as sa

        engine = sa.create_engine(url, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
        engine.dispose()
        return None
    except Exception as exc:  # noqa: BLE001 - any failure means "not reachable"
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """URL of a reachable PostgreSQL; skips (or fails under CI's requirement) when there is none."""
    problem = _postgres_reachable(PG_URL)
    if problem:
        message = f"PostgreSQL not reachable at {PG_URL} ({problem}); set SURGENET_ASSIST_TEST_PG_URL"
        if os.environ.get("SURGENET_ASSIST_REQUIRE_POSTGRES") == "1":
            pytest.fail(message + " — required because SURGENET_ASSIST_REQUIRE_POSTGRES=1")
        pytest.skip(message)
    return PG_URL


@pytest.fixture(scope="session")
def surgenetxl_key_layout() -> dict:
    return json.loads((FIXTURES / "surgenetxl_caformer_s18_keys.json").read_text())


@pytest.fixture(scope="session")
def surgenetxl_test_checkpoint(tmp_path_factory, surgenetxl_key_layout) -> Path:
    """The fixture recipe's deterministic weights saved as a plain teacher state dict (.pth)."""
    import torch

    state = {}
    for i, entry in enumerate(surgenetxl_key_layout["keys"]):
        gen = torch.Generator().manual_seed(0 + i)
        state[entry["key"]] = entry["base"] + 0.02 * torch.randn(entry["shape"], generator=gen)
    path = tmp_path_factory.mktemp("weights") / "SurgeNetXL_checkpoint_epoch0050_teacher.pth"
    torch.save(state, path)
    return path
