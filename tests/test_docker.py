"""The docker/ files, parsed: no engine runs here, so their structure is what we can check."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).parent.parent
DOCKER = ROOT / "docker"


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, rest = line.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    assert not pending, "a continuation line runs off the end of the file"
    return instructions


def compose(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(path.read_text())
    return data


def test_dockerfile_is_a_cuda_image_with_pinned_torch_and_flash_attn() -> None:
    steps = dockerfile_instructions(DOCKER / "Dockerfile")
    known = {"ARG", "FROM", "ENV", "RUN", "WORKDIR", "COPY", "EXPOSE", "HEALTHCHECK", "STOPSIGNAL", "CMD"}
    assert {keyword for keyword, _ in steps} <= known
    args = {rest.split("=", 1)[0]: rest.split("=", 1)[1] for keyword, rest in steps if keyword == "ARG"}
    (base,) = [rest for keyword, rest in steps if keyword == "FROM"]
    assert base == "${CUDA_IMAGE}" and args["CUDA_IMAGE"].startswith("nvidia/cuda:12.")
    runs = " && ".join(rest for keyword, rest in steps if keyword == "RUN")
    torch = re.search(r"pip install torch==(\S+) --index-url https://download.pytorch.org/whl/(cu\d+)", runs)
    assert torch is not None, "torch must be pinned to a CUDA build"
    assert args["CUDA_IMAGE"].split(":")[1].startswith(f"{torch.group(2)[2:4]}.{torch.group(2)[4:]}")
    assert re.search(r"pip install flash-attn==\d+\.\d+\.\d+\S* --no-build-isolation", runs)
    assert 'pip install ".[gpu]"' in runs
    copied = [rest.split()[0] for keyword, rest in steps if keyword == "COPY"]
    for source in copied:
        assert (ROOT / source).exists(), source
    env = " ".join(rest for keyword, rest in steps if keyword == "ENV")
    assert "HOST=0.0.0.0" in env and "PORT=7088" in env
    assert ("EXPOSE", "7088") in steps
    assert ("CMD", '["trioserve"]') in steps


def test_gpu_extra_carries_flash_attn() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    gpu = re.search(r"^gpu = \[(.*)\]$", text, re.MULTILINE)
    assert gpu is not None and "flash-attn" in gpu.group(1)


def test_root_compose_includes_the_docker_one() -> None:
    assert compose(ROOT / "compose.yaml")["include"] == ["docker/compose.yaml"]


def test_compose_keeps_the_old_usage() -> None:
    spec = compose(DOCKER / "compose.yaml")
    service = spec["services"]["trioserve"]
    assert "profiles" not in service  # plain `docker compose up` starts it
    assert (DOCKER / service["build"]["context"] / service["build"]["dockerfile"]).resolve() == DOCKER / "Dockerfile"
    env = service["environment"]
    for name in ("HF_MODEL", "HOTLOAD", "TORCH_DTYPE", "ATTN_IMPLEMENTATION", "MAX_CONCURRENT"):
        assert env[name] == f"${{{name}:-{env[name].split(':-')[1][:-1]}}}"
    assert service["ports"] == ["${PORT:-7088}:7088"]
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert any(volume.endswith(":/root/.cache/huggingface") for volume in service["volumes"])
    assert "hf-cache" in spec["volumes"]
    assert "/health" in " ".join(service["healthcheck"]["test"])
    grace = int(service["stop_grace_period"].rstrip("s"))
    assert grace > int(env["GRACEFUL_TIMEOUT"].split(":-")[1][:-1])


def test_scale_profile_balances_replicas_on_health() -> None:
    spec = compose(DOCKER / "compose.yaml")
    services = spec["services"]
    scaled = {name for name, s in services.items() if "scale" in s.get("profiles", [])}
    assert "lb" in scaled and len(scaled) >= 2
    lb = services["lb"]
    assert lb["image"].startswith("haproxy:")
    config_source = lb["volumes"][0].split(":")[0]
    config = (DOCKER / config_source).read_text()
    assert re.search(r"^\s*balance leastconn$", config, re.MULTILINE)
    assert re.search(r"^\s*option httpchk GET /health$", config, re.MULTILINE)
    assert "option http-buffer-request" not in config
    backends = re.findall(r"^\s*server \S+ (\S+):7088 check$", config, re.MULTILINE)
    replicas = {"trioserve"} | (scaled - {"lb"})
    assert set(backends) == replicas
    for name in replicas:
        assert lb["depends_on"][name]["condition"] == "service_healthy"
    gpus = [services[name]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] for name in replicas]
    assert len({tuple(g) for g in gpus}) == len(replicas), "each replica reserves its own GPU"


def test_dockerignore_keeps_the_context_small() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".venv", ".git", "bench/cache"} <= ignored


def test_shell_commands_in_compose_comments_parse() -> None:
    # The usage lines at the top of compose.yaml: each a shell command line (environment assignments, then
    # `docker compose`) naming only profiles the file defines.
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    profiles = {p for service in compose["services"].values() for p in service.get("profiles", [])}
    commands = [
        shlex.split(line.lstrip("# "), comments=True)
        for line in (DOCKER / "compose.yaml").read_text().splitlines()
        if "docker compose" in line
    ]
    assert commands
    for words in commands:
        start = words.index("docker")
        assert all(re.fullmatch(r"[A-Z_]+=\S*", word) for word in words[:start]), words
        assert words[start + 1] == "compose" and "up" in words[start + 2 :], words
        named = [words[i + 1] for i, word in enumerate(words) if word == "--profile"]
        assert set(named) <= profiles, (named, profiles)
