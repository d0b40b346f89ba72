"""The Docker files: docker/docker-compose.yml must resolve with a real compose implementation
(`docker compose config`, no engine needed), and docker/Dockerfile must install the project and
run as a non-root user."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker" / "docker-compose.yml"
DOCKERFILE = REPO / "docker" / "Dockerfile"
SERVICES = {"kafka", "trainer", "detector", "logdetector", "rules", "alerter", "scraper", "producer", "log-producer"}

INSTALL_HINT = (
    "no Docker Compose implementation found: neither `docker compose version` nor `docker-compose` "
    "works. Install one, e.g. on Debian/Ubuntu: `apt-get update && apt-get install -y docker-compose` "
    "(or the Docker Compose v2 plugin, `docker-compose-plugin`, from Docker's own apt repository)."
)


def _works(cmd: list[str]) -> bool:
    try:
        return subprocess.run(cmd, capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def find_compose() -> list[str] | None:
    """`docker compose` (v2 plugin) if it works, else a `docker-compose` on PATH, else None."""
    if shutil.which("docker") and _works(["docker", "compose", "version"]):
        return ["docker", "compose"]
    if shutil.which("docker-compose") and _works(["docker-compose", "version"]):
        return ["docker-compose"]
    return None


def _compose_env() -> dict[str, str]:
    """The caller's environment less the variables that would change what is resolved."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANOMSTREAM_", "COMPOSE_"))}
    env.pop("KAFKA_BOOTSTRAP_SERVERS", None)
    return env


def _env_mapping(env) -> dict[str, str]:
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in (env or {}).items()}


def resolved_config(compose: list[str]) -> tuple[set[str], dict[str, str]]:
    """(service names, detector's environment) as the compose implementation resolves them."""
    base = [*compose, "-f", str(COMPOSE_FILE), "config"]
    run = dict(capture_output=True, text=True, timeout=120, env=_compose_env(), cwd=REPO)

    # compose v2 prints JSON on request; v1 knows no --format (and prints its usage instead).
    result = subprocess.run([*base, "--format", "json"], **run)
    if result.returncode == 0 and result.stdout.lstrip().startswith("{"):
        config = json.loads(result.stdout)
        return set(config["services"]), _env_mapping(config["services"]["detector"].get("environment"))

    result = subprocess.run(base, **run)  # compose v1: YAML only
    assert result.returncode == 0, (
        f"`{' '.join(base)}` exited {result.returncode}:\n{result.stderr}\n{result.stdout}"
    )
    config = yaml.safe_load(result.stdout)
    return set(config["services"]), _env_mapping(config["services"]["detector"].get("environment"))


def test_compose_file_resolves():
    compose = find_compose()
    if compose is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    services, detector_env = resolved_config(compose)
    assert SERVICES <= services, f"missing services: {sorted(SERVICES - services)}"
    assert detector_env.get("ANOMSTREAM_BOOTSTRAP_SERVERS") == "kafka:9092", detector_env


def test_dockerfile_installs_project_as_non_root():
    text = DOCKERFILE.read_text()
    # Join continuation lines so each instruction is one line.
    instructions = [
        line.strip() for line in re.sub(r"\\\n", " ", text).splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert instructions[0].upper().startswith("FROM PYTHON:3.11-SLIM"), instructions[0]
    runs = " ".join(i for i in instructions if i.upper().startswith("RUN "))
    assert re.search(r"\bpip install\b[^&;]*\s(\.|/\S+)(\s|$)", runs), "the project is not pip-installed"
    assert "[test]" not in runs, "test extras must not be installed in the image"
    users = [i.split(None, 1)[1].strip() for i in instructions if i.upper().startswith("USER ")]
    assert users, "no USER instruction: the image would run as root"
    assert users[-1].split(":")[0] not in ("root", "0"), f"final USER is root: {users[-1]}"
    assert any(i.upper().startswith("CMD") for i in instructions), "no default CMD"
    assert not re.search(r"\b(openjdk|default-jre|default-jdk|temurin)\b", text, re.I), "no Java in the image"


def test_kafka_image_runs_the_same_jmx_exporter_as_the_local_broker():
    pom = (REPO / "broker" / "pom.xml").read_text()
    pom_version = re.search(r"<jmx.exporter.version>([^<]+)<", pom).group(1)
    kafka_image = (REPO / "docker" / "Dockerfile.kafka").read_text()
    assert re.search(rf"ARG JMX_EXPORTER_VERSION={re.escape(pom_version)}\n", kafka_image)
    assert "-javaagent:/opt/jmx/jmx_prometheus_javaagent.jar=7071:/opt/jmx/jmx-exporter.yaml" in kafka_image
    scraper = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["scraper"]
    assert scraper["environment"]["ANOMSTREAM_METRICS_EXPORTER_URL"] == "http://kafka:7071/metrics"


def test_image_writes_under_one_data_directory():
    """ANOMSTREAM_HOME is the image's data directory: no per-path variable for what follows it, no
    copy of the K-Means recording (package data), and every named volume is mounted on a folder
    under it that the image creates for its user (so a new volume starts out writable)."""
    text = DOCKERFILE.read_text()
    env = dict(re.findall(r"\b(ANOMSTREAM_[A-Z_]+)=(\S+)", text))
    assert env.get("ANOMSTREAM_HOME") == "/app/data", env
    stale = {"ANOMSTREAM_MODEL_DIR", "ANOMSTREAM_KMEANS_STATE_DIR", "ANOMSTREAM_LOG_STATE_DIR",
             "ANOMSTREAM_RULES_DB_URL", "ANOMSTREAM_KMEANS_TRAINING_DATA"} & set(env)
    assert not stale, f"derived from ANOMSTREAM_HOME, not to be set: {sorted(stale)}"
    assert "kafka_load.csv" not in text and "tests/" not in text
    created = {Path(d) for m in re.findall(r"mkdir -p ([^&\n]+)", re.sub(r"\\\n", " ", text)) for d in m.split()}
    for name, service in yaml.safe_load(COMPOSE_FILE.read_text())["services"].items():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith((".", "/", "$")):
                continue  # a bind mount (data, definitions), not state the service writes
            assert Path(target).is_relative_to("/app/data"), f"{name}: volume {volume} outside ANOMSTREAM_HOME"
            assert any(Path(target) == d or d.is_relative_to(target) for d in created), \
                f"{name}: {target} is not created (for the anomstream user) in the image"


# --- What `docker build` sees: the build context after .dockerignore -----------------------------

BUILDKIT_ONLY_FLAGS = ("--chmod", "--link", "--parents", "--exclude", "--checksum", "--keep-git-dir")


def dockerfile_instructions(path: Path) -> list[str]:
    """The instructions of a Dockerfile, continuation lines joined, comments left out."""
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    return [i.strip() for i in re.sub(r"\\\n", " ", "\n".join(lines)).splitlines() if i.strip()]


def copy_instructions(path: Path) -> list[tuple[str, list[str], list[str], str]]:
    """(COPY or ADD, flags, sources, destination) of each COPY/ADD instruction."""
    copies = []
    for instruction in dockerfile_instructions(path):
        word, _, rest = instruction.partition(" ")
        if word.upper() not in ("COPY", "ADD"):
            continue
        args = rest.split()
        flags = [a for a in args if a.startswith("--")]
        args = [a for a in args if not a.startswith("--")]
        if args and args[0].startswith("["):  # JSON form: COPY ["src", "dest"]
            args = json.loads(" ".join(args))
        copies.append((word.upper(), flags, args[:-1], args[-1]))
    return copies


def _pattern_regex(pattern: str) -> re.Pattern:
    """A .dockerignore pattern as Docker reads it (Go's filepath.Match, plus `**` for any number
    of folders), anchored at the context root."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                out.append("(?:.*/)?")
                i += 1
            else:
                out.append(".*")
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            end = pattern.index("]", i + 2 if pattern.startswith("[^", i) else i + 1)
            body = pattern[i + 1:end]
            out.append("[" + ("^" + re.escape(body[1:]) if body.startswith("^") else re.escape(body)) + "]")
            i = end
        elif c == "\\" and i + 1 < len(pattern):
            i += 1
            out.append(re.escape(pattern[i]))
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")


class DockerIgnore:
    """The patterns of a .dockerignore: the last pattern that matches a path, or one of its
    parent folders, decides; `!pattern` takes a path back in."""

    def __init__(self, text: str):
        self.rules = []
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            keep = line.startswith("!")
            pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
            self.rules.append((_pattern_regex(pattern), keep))

    def excluded(self, rel: str) -> bool:
        parts = Path(rel).parts
        candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
        excluded = False
        for regex, keep in self.rules:
            if any(regex.match(c) for c in candidates):
                excluded = not keep
        return excluded


def context_sees(context: Path, ignore: DockerIgnore, rel: str) -> bool:
    """Whether a path (a file, or a folder with at least one file left in) reaches the build."""
    rel = os.path.normpath(rel).lstrip("/")
    path = context / rel
    if rel == ".":
        return True
    if not path.exists() or ignore.excluded(rel):
        return False
    if path.is_dir():
        return any(not ignore.excluded(str(f.relative_to(context))) for f in path.rglob("*") if f.is_file())
    return True


def compose_builds() -> list[tuple[Path, Path]]:
    """(context, Dockerfile) of each image docker-compose.yml builds."""
    builds = set()
    for service in yaml.safe_load(COMPOSE_FILE.read_text())["services"].values():
        build = service.get("build")
        if build:
            context = (COMPOSE_FILE.parent / build["context"]).resolve()
            builds.add((context, (context / build.get("dockerfile", "Dockerfile")).resolve()))
    return sorted(builds)


def test_compose_builds_both_dockerfiles_from_the_repository():
    assert compose_builds() == [(REPO, DOCKERFILE), (REPO, REPO / "docker" / "Dockerfile.kafka")]


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.kafka"])
def test_copy_sources_are_in_the_build_context(dockerfile):
    """Every local COPY/ADD source exists in the context and is not left out by .dockerignore, and
    every file a RUN reads from a copied folder was copied too."""
    path = REPO / "docker" / dockerfile
    ignore = DockerIgnore((REPO / ".dockerignore").read_text())
    missing = []
    copies = copy_instructions(path)
    assert copies, f"no COPY/ADD in {dockerfile}"
    for word, flags, sources, dest in copies:
        if any(f.startswith("--from") for f in flags):
            continue  # from another build stage, not from the context
        for src in sources:
            if re.match(r"(https?|git)://|git@", src):
                continue  # a download, not the context
            if any(ch in src for ch in "*?["):
                if not any(context_sees(REPO, ignore, str(m.relative_to(REPO))) for m in REPO.glob(src)):
                    missing.append(f"{word} {src}: nothing in the build context matches")
            elif not context_sees(REPO, ignore, src):
                missing.append(f"{word} {src}: " + ("left out by .dockerignore" if (REPO / src).exists()
                                                    else "no such file in the build context"))
        # A RUN that reads DEST/<path> of a copied folder needs <path> in the context too.
        if len(sources) == 1 and not re.match(r"https?://", sources[0]):
            runs = " ".join(i for i in dockerfile_instructions(path) if i.upper().startswith("RUN "))
            for rel in re.findall(re.escape(dest.rstrip("/")) + r"/([\w.][\w./-]*)", runs):
                if not context_sees(REPO, ignore, str(Path(sources[0]) / rel)):
                    missing.append(f"RUN reads {dest.rstrip('/')}/{rel}: {Path(sources[0]) / rel} not in the context")
    assert not missing, f"{dockerfile}:\n" + "\n".join(missing)


def test_pip_install_of_the_context_has_what_it_needs():
    """`pip install` of the copied context needs pyproject.toml, the readme it names, the packages
    and their package data (the K-Means recording the trainer uses by default)."""
    import tomllib

    ignore = DockerIgnore((REPO / ".dockerignore").read_text())
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    needed = ["pyproject.toml", project["project"]["readme"], "shared/__init__.py", "models/__init__.py",
              "services/__init__.py", "models/kmeans/data/kafka_load.csv"]
    for package, globs in project["tool"]["setuptools"]["package-data"].items():
        folder = package.replace(".", "/")
        for pattern in globs:
            matches = sorted(REPO.glob(f"{folder}/{pattern}"))
            assert matches, f"package data {package}: {pattern} matches no file"
            needed += [str(m.relative_to(REPO)) for m in matches]
    assert "models/kmeans/data/kafka_load.csv" in needed, "the K-Means recording is not package data"
    left_out = [rel for rel in needed if not context_sees(REPO, ignore, rel)]
    assert not left_out, f"not in the build context: {left_out}"


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.kafka"])
def test_dockerfile_builds_without_buildkit(dockerfile):
    """docker-compose v1 and `DOCKER_BUILDKIT=0` use the classic builder, which rejects BuildKit-only
    syntax: COPY/ADD --chmod/--link/..., RUN --mount, heredocs, a `# syntax=` frontend."""
    path = REPO / "docker" / dockerfile
    text = path.read_text()
    problems = [f"{word} {flag}" for word, flags, _, _ in copy_instructions(path)
                for flag in flags if flag.split("=", 1)[0] in BUILDKIT_ONLY_FLAGS]
    problems += [i for i in dockerfile_instructions(path) if re.match(r"RUN\s+--(mount|network|security)", i, re.IGNORECASE)]
    problems += [line for line in text.splitlines() if re.search(r"<<-?\s*['\"]?[A-Z]+", line)]
    if re.match(r"\s*#\s*syntax\s*=", text):
        problems.append("# syntax= directive")
    assert not problems, f"{dockerfile} needs BuildKit: {problems}"


def test_dockerignore_matching():
    ignore = DockerIgnore("**/__pycache__\n*.egg-info\nbroker/*\n!broker/jmx-exporter.yaml\n/tests\n")
    assert ignore.excluded("__pycache__/x.pyc") and ignore.excluded("shared/__pycache__/a.pyc")
    assert ignore.excluded("anomstream.egg-info/PKG-INFO") and not ignore.excluded("sub/anomstream.egg-info")
    assert ignore.excluded("broker/pom.xml") and not ignore.excluded("broker/jmx-exporter.yaml")
    assert ignore.excluded("tests/data/x.csv") and not ignore.excluded("shared/tests.py")
    assert DockerIgnore("broker\n").excluded("broker/jmx-exporter.yaml")


def dockerfile_requirements(extras: str) -> list[str]:
    """What the Dockerfile's dependency layer installs for build arg EXTRAS, computed by running its
    own RUN line's Python on this pyproject.toml (ARG values are environment variables in a RUN)."""
    runs = " ".join(i for i in dockerfile_instructions(DOCKERFILE) if i.upper().startswith("RUN "))
    code = re.search(r'python -c "(.*?)" +>', runs).group(1)
    code = code.replace("/tmp/build/pyproject.toml", str(REPO / "pyproject.toml"))  # as the shell passes it
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "EXTRAS": extras},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.split("\n")


def test_service_image_has_no_tensorflow_and_the_trainer_image_has_it():
    services = dockerfile_requirements("")
    trainer_args = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["trainer"]["build"]["args"]
    trainer = dockerfile_requirements(trainer_args["EXTRAS"])
    assert any(r.startswith("numpy") for r in services) and any(r.startswith("confluent-kafka") for r in services)
    assert not any("tensorflow" in r for r in services), services
    assert any(r.startswith("tensorflow-cpu") for r in trainer), trainer
    # Every service but the trainer runs the TensorFlow-free image.
    compose = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    for name in ("detector", "logdetector", "rules", "alerter"):
        assert compose[name]["image"] == "anomstream:latest" and "args" not in compose[name].get("build", {})
