"""What `docker build` reads: a Dockerfile's instructions, the images docker-compose.yml builds, and
the build context as the client sends it after `.dockerignore`.

The context is listed by docker-py's `docker.utils.build.exclude_paths`: the code that
docker-compose 1.29 (CI's, the classic builder) runs to tar the context, a port of Docker's own
matcher (moby's fileutils/patternmatcher: Go's filepath.Match per path, `**` for any number of
folders, `!` takes a path back in, the last matching pattern decides, a folder's pattern covers
what is under it, the Dockerfile and .dockerignore are always sent). Where the two could differ
(docker-py folds case and reads `[!x]` as a negated class) `dockerignore_patterns` refuses the
pattern, so what passes here passes with the docker CLI and compose v2 too.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import posixpath
import re
import shutil
import subprocess
from pathlib import Path, PurePosixPath

import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER_DIR = REPO / "docker"
COMPOSE_FILE = DOCKER_DIR / "docker-compose.yml"

# Flags only BuildKit knows; the classic builder (docker-compose v1, DOCKER_BUILDKIT=0) fails on them.
BUILDKIT_ONLY_COPY_FLAGS = ("--chmod", "--link", "--parents", "--exclude", "--checksum", "--keep-git-dir")
BUILDKIT_ONLY_RUN_FLAGS = ("--mount", "--network", "--security")
REMOTE_SOURCE = re.compile(r"(https?|git)://|git@")

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


def compose_env() -> dict[str, str]:
    """The caller's environment less the variables that would change what is resolved."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANOMSTREAM_", "COMPOSE_"))}
    env.pop("KAFKA_BOOTSTRAP_SERVERS", None)
    return env


def instructions(path: Path) -> list[str]:
    """The instructions of a Dockerfile: continuation lines joined, comment lines left out (Docker
    drops them inside a continued instruction too)."""
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    return [i.strip() for i in re.sub(r"\\[ \t]*\n", " ", "\n".join(lines)).splitlines() if i.strip()]


def copy_instructions(path: Path) -> list[tuple[str, list[str], list[str], str]]:
    """(COPY or ADD, flags, sources, destination) of each COPY/ADD instruction."""
    copies = []
    for instruction in instructions(path):
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


def buildkit_only(path: Path) -> list[str]:
    """What in a Dockerfile the classic builder refuses: a `# syntax=`/`# check=` frontend
    directive, COPY/ADD --chmod/--link/..., RUN --mount/--network/--security, heredocs."""
    text = path.read_text()
    problems = []
    for line in text.splitlines():  # parser directives: comments at the very top only
        if not line.startswith("#"):
            break
        if re.match(r"#\s*(syntax|check)\s*=", line, re.IGNORECASE):
            problems.append(line.strip())
    problems += [f"{word} {flag}" for word, flags, _, _ in copy_instructions(path)
                 for flag in flags if flag.split("=", 1)[0].lower() in BUILDKIT_ONLY_COPY_FLAGS]
    for instruction in instructions(path):
        word, _, rest = instruction.partition(" ")
        if word.upper() == "RUN" and rest.lstrip().split("=", 1)[0].lower() in BUILDKIT_ONLY_RUN_FLAGS:
            problems.append(instruction)
        if word.upper() in ("RUN", "COPY", "ADD") and re.search(r"(?<!<)<<-?\s*['\"]?[A-Za-z_]\w*['\"]?(\s|$)", rest):
            problems.append(f"heredoc: {instruction[:80]}")
    return problems


def compose_builds(compose_file: Path = COMPOSE_FILE) -> list[tuple[Path, Path]]:
    """(context, Dockerfile) of each image a compose file builds, as its `build:` keys say."""
    builds = set()
    for service in yaml.safe_load(compose_file.read_text())["services"].values():
        build = service.get("build")
        if isinstance(build, str):
            build = {"context": build}
        if build:
            context = (compose_file.parent / build["context"]).resolve()
            builds.add((context, (context / build.get("dockerfile", "Dockerfile")).resolve()))
    return sorted(builds)


def _docker_py():
    """docker-py's context walker; a clear failure where the test extra is not installed (a bare
    `import docker` would find tests/docker, a folder without __init__.py, instead)."""
    if importlib.util.find_spec("docker") is None or importlib.util.find_spec("docker.utils") is None:
        raise AssertionError("docker-py is not installed (the build-context check uses its .dockerignore "
                             "matcher): .venv/bin/pip install -e '.[test]'")
    from docker.utils.build import exclude_paths

    return exclude_paths


def dockerignore_patterns(context: Path) -> list[str]:
    """The context's .dockerignore patterns, read as docker-py's APIClient.build reads them (lines
    stripped, blank and `#` lines left out). A pattern on which docker-py and the docker CLI could
    disagree (upper case: docker-py folds case; a character class: `[!x]` is negated only in
    docker-py) is refused."""
    path = context / ".dockerignore"
    if not path.exists():
        return []
    patterns = [p for p in (line.strip() for line in path.read_text().splitlines()) if p and not p.startswith("#")]
    unsure = [p for p in patterns if p != p.lower() or "[" in p]
    assert not unsure, (f"{path}: patterns that docker-compose v1 (docker-py) and the docker CLI may read "
                        f"differently (case, character classes): {unsure}")
    return patterns


def context_paths(context: Path, dockerfile: Path) -> set[str]:
    """Every path (file or folder, relative, '/'-separated) the client sends as the build context."""
    exclude_paths = _docker_py()
    rel_dockerfile = dockerfile.relative_to(context).as_posix()
    return set(exclude_paths(str(context), list(dockerignore_patterns(context)), dockerfile=rel_dockerfile))


def _wildcard_match(path: str, pattern: str) -> bool:
    """Go's filepath.Match, as COPY matches a wildcard source: segment by segment, `*` within one."""
    p, q = PurePosixPath(path).parts, PurePosixPath(pattern).parts
    return len(p) == len(q) and all(fnmatch.fnmatchcase(a, b) for a, b in zip(p, q))


def missing_sources(context: Path, dockerfile: Path) -> list[str]:
    """Each local COPY/ADD source of `dockerfile` that the build would not find in `context` (not
    there, or left out by .dockerignore), with the reason; a folder source must bring at least
    one file. Sources of another stage (--from) and downloads (ADD URL) are not the context's."""
    sent = context_paths(context, dockerfile)
    files = {p for p in sent if (context / p).is_file()}
    problems = []
    for word, flags, sources, _dest in copy_instructions(dockerfile):
        if any(f.startswith("--from") for f in flags):
            continue
        for src in sources:
            if REMOTE_SOURCE.match(src):
                continue
            rel = posixpath.normpath(src.lstrip("/") or ".")
            if rel == ".":
                continue  # the whole context
            if any(ch in rel for ch in "*?["):
                if not any(_wildcard_match(p, rel) for p in sent):
                    problems.append(f"{word} {src}: nothing in the build context matches")
                continue
            brings = [f for f in files if f == rel or f.startswith(rel + "/")]
            if brings:
                continue
            if not (context / rel).exists():
                why = "no such file in the build context"
            elif (context / rel).is_dir() and rel in sent:
                why = "every file under it is left out by .dockerignore"
            else:
                why = "left out by .dockerignore"
            problems.append(f"{word} {src}: {why}")
    return problems
