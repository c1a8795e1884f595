"""docker-compose.yml, the Dockerfile and .dockerignore: consistent with Settings, valid for
docker-compose (when its binary is installed; .ci/run installs Debian's), and production-shaped."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from core.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parents[3]
COMPOSE = ROOT / "docker-compose.yml"
BOTS = ("telegram", "discord")


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return loaded


def settings_variables() -> set[str]:
    """Read at test time: colleagues add settings while this file stays the same."""
    return {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}


def kobot_names(environment: dict[str, Any] | list[str]) -> set[str]:
    names = environment if isinstance(environment, list) else list(environment)
    return {str(n).split("=", 1)[0] for n in names if str(n).startswith(ENV_PREFIX)}


def test_every_kobot_variable_the_compose_file_sets_or_reads_is_a_setting() -> None:
    services = compose()["services"]
    set_here = set().union(*(kobot_names(s.get("environment", {})) for s in services.values()))
    read_here = set(re.findall(r"\$\{(KOBOT_[A-Z0-9_]+)", COMPOSE.read_text(encoding="utf-8")))
    assert {"KOBOT_DATABASE_URL", "KOBOT_REDIS_URL", "KOBOT_METRICS_PORT"} <= set_here
    assert set_here | read_here <= settings_variables(), "unknown KOBOT_ names in compose"


def test_services_profiles_health_conditions_and_volumes() -> None:
    spec = compose()
    services = spec["services"]
    for name in ("postgres", "redis"):
        assert "profiles" not in services[name] and services[name]["healthcheck"]["test"]
        assert services[name]["volumes"]
    for bot in BOTS:
        service = services[bot]
        assert service["profiles"] == [bot] and service["command"] == [bot]
        assert service["depends_on"] == {
            "postgres": {"condition": "service_healthy"},
            "redis": {"condition": "service_healthy"},
        }
        assert service["healthcheck"]["test"] == ["CMD", "kobot", "health"]
        assert service["environment"]["KOBOT_DATABASE_URL"].startswith("postgresql+asyncpg://")
        assert service["env_file"] == ".env" and "hf-cache:/data/hf" in service["volumes"]
    vllm = services["vllm"]
    assert vllm["profiles"] == ["gpu"]
    devices = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert services["telegram"]["environment"]["KOBOT_BACKEND_URL"].endswith("vllm:8000/v1}")
    assert set(spec["volumes"]) >= {"postgres-data", "redis-data", "hf-cache"}


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed")
@pytest.mark.parametrize("profiles", [[], ["telegram", "discord", "gpu"]])
def test_docker_compose_accepts_the_file(tmp_path: Path, profiles: list[str]) -> None:
    """As an admin runs it: .env copied from .env.example, a password filled in."""
    shutil.copy(COMPOSE, tmp_path / "docker-compose.yml")
    env = (ROOT / ".env.example").read_text(encoding="utf-8")
    (tmp_path / ".env").write_text(env + "\nPOSTGRES_PASSWORD=s3cret\n", encoding="utf-8")
    flags = [arg for profile in profiles for arg in ("--profile", profile)]
    command = ["docker-compose", "-f", "docker-compose.yml", *flags, "config", "-q"]
    done = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    (tmp_path / ".env").write_text(env, encoding="utf-8")  # no password: refused, with a reason
    refused = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False
    )
    assert refused.returncode != 0 and "POSTGRES_PASSWORD" in refused.stderr


def test_the_image_is_multi_stage_slim_unprivileged_with_cpu_torch_and_a_cache_volume() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    stages = re.findall(r"^FROM (\S+)", dockerfile, flags=re.MULTILINE)
    assert len(stages) >= 2 and all("-slim" in stage for stage in stages)
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in dockerfile
    assert re.search(r"^USER kobot", dockerfile, flags=re.MULTILINE)
    assert "HF_HOME=/data/hf" in dockerfile and 'VOLUME ["/data/hf"]' in dockerfile
    assert "HEALTHCHECK" in dockerfile and 'ENTRYPOINT ["kobot"]' in dockerfile
    ignored = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    assert ignored[ignored.index("*") :][:1] == ["*"]  # an allowlist: .env never gets in
    assert "!.env" not in ignored and "!core/" in ignored


def test_settings_set_by_the_image_exist() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert set(re.findall(r"\b(KOBOT_[A-Z0-9_]+)=", dockerfile)) <= settings_variables()
