"""docker-compose.yml and the Dockerfile agree with the code: commands, variables and ports."""

from __future__ import annotations

import re

import yaml

from environment_provider.cli import build_parser

from conftest import ROOT

SETTINGS_SOURCE = (ROOT / "environment_provider" / "settings.py").read_text()


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_commands_are_cli_verbs():
    parser = build_parser()
    for name in ("worker", "beat", "api"):
        command = compose()["services"][name]["command"]

        verb = parser.parse_args(command[:1] if command[0] in ("worker", "beat") else command).command

        assert verb == command[0]


def test_compose_variables_are_settings():
    for service in compose()["services"].values():
        for variable in service.get("environment") or {}:
            assert re.search(f"[\"']{variable}[\"']", SETTINGS_SOURCE), f"{variable} is not read by settings.py"


def test_compose_urls_name_compose_services():
    environment = compose()["services"]["worker"]["environment"]
    services = set(compose()["services"])

    assert environment["ETOS_ETCD_HOST"] in services
    assert re.match(r"redis://(\w+):6379/0", environment["CELERY_BROKER_URL"]).group(1) in services


def test_compose_mounts_the_provider_folders():
    api = compose()["services"]["api"]
    mounted = [volume.split(":")[1] for volume in api["volumes"]]

    for variable in ("IUT_PROVIDERS", "EXECUTION_SPACE_PROVIDERS", "LOG_AREA_PROVIDERS"):
        folder = api["environment"][variable]
        assert any(folder.startswith(mount) for mount in mounted)
        assert (ROOT / "providers" / folder.rsplit("/", 1)[1]).is_dir()


def test_dockerfile_runs_the_console_script():
    dockerfile = (ROOT / "Dockerfile").read_text()

    assert 'ENTRYPOINT ["environment-provider"]' in dockerfile
    assert "COPY providers /providers" in dockerfile
