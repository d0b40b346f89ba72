"""The images build: every COPY/ADD source of every Dockerfile reaches the build context after
.dockerignore (listed with docker-py's matcher, the one docker-compose 1.29 tars the context with),
the contexts and Dockerfiles are the ones docker-compose.yml names, and no Dockerfile needs BuildKit
(CI's docker-compose 1.29 uses the classic builder). The unit tests at the end show that each check
fails where it should, on throwaway contexts."""

from __future__ import annotations

import posixpath
import re
import tomllib
from pathlib import Path

import pytest
from dockerfile import (
    COMPOSE_FILE,
    DOCKER_DIR,
    REPO,
    buildkit_only,
    compose_builds,
    context_paths,
    copy_instructions,
    dockerignore_patterns,
    instructions,
    missing_sources,
)

BUILDS = compose_builds(COMPOSE_FILE)


def test_compose_builds_every_dockerfile_from_the_repository():
    """Each Dockerfile under docker/ is built by a compose service (so none escapes the checks below),
    with the repository as its context."""
    dockerfiles = sorted(DOCKER_DIR.glob("Dockerfile*"))
    assert dockerfiles, "no Dockerfile under docker/"
    assert sorted(df for _, df in BUILDS) == dockerfiles
    assert {context for context, _ in BUILDS} == {REPO}


@pytest.mark.parametrize("context, dockerfile", BUILDS, ids=[df.name for _, df in BUILDS])
def test_copy_sources_are_in_the_build_context(context, dockerfile):
    assert copy_instructions(dockerfile), f"no COPY/ADD in {dockerfile.name}"
    problems = missing_sources(context, dockerfile)
    assert not problems, f"{dockerfile.name} would not build:\n" + "\n".join(problems)


@pytest.mark.parametrize("context, dockerfile", BUILDS, ids=[df.name for _, df in BUILDS])
def test_files_a_run_reads_from_a_copied_folder_were_copied(context, dockerfile):
    """A RUN that reads DEST/<path> of a folder copied to DEST (`cp -r /tmp/build/src/rules ...`)
    needs <path> in the context too."""
    sent = context_paths(context, dockerfile)
    runs = " ".join(i for i in instructions(dockerfile) if i.upper().startswith("RUN "))
    missing = []
    for _word, flags, sources, dest in copy_instructions(dockerfile):
        if len(sources) != 1 or re.match(r"(https?|git)://", sources[0]) or any(f.startswith("--from") for f in flags):
            continue
        for rel in re.findall(re.escape(dest.rstrip("/")) + r"/([\w.][\w./-]*)", runs):
            path = posixpath.normpath(posixpath.join(sources[0].lstrip("/"), rel))
            if not any(p == path or p.startswith(path + "/") for p in sent):
                missing.append(f"RUN reads {dest.rstrip('/')}/{rel}: {path} is not in the context")
    assert not missing, "\n".join(missing)


def test_pip_install_of_the_context_has_what_it_needs():
    """`pip install` of the copied context needs pyproject.toml, the readme it names, the packages
    and their package data (the K-Means recording the trainer uses by default)."""
    sent = context_paths(REPO, DOCKER_DIR / "Dockerfile")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    needed = ["pyproject.toml", project["project"]["readme"], "shared/__init__.py", "models/__init__.py",
              "services/__init__.py", "models/kmeans/data/kafka_load.csv"]
    for package, globs in project["tool"]["setuptools"]["package-data"].items():
        folder = package.replace(".", "/")
        for pattern in globs:
            matches = sorted(REPO.glob(f"{folder}/{pattern}"))
            assert matches, f"package data {package}: {pattern} matches no file"
            needed += [m.relative_to(REPO).as_posix() for m in matches]
    assert "models/kmeans/data/kafka_load.csv" in needed, "the K-Means recording is not package data"
    left_out = [rel for rel in needed if rel not in sent]
    assert not left_out, f"not in the build context: {left_out}"


def test_the_context_leaves_out_local_state_and_secrets():
    sent = context_paths(REPO, DOCKER_DIR / "Dockerfile")
    for rel in (".env", ".venv", ".anomstream", ".git", "tests", "models/artifacts"):
        assert rel not in sent, f"{rel} is sent to the Docker daemon"


def test_env_files_anywhere_stay_out_of_the_context(tmp_path):
    """A settings file with cluster credentials (.env, docker/.env, x.env) is never sent to the
    daemon, wherever it lies: the repository's .dockerignore applied to a context that has them."""
    (tmp_path / ".dockerignore").write_text((REPO / ".dockerignore").read_text())
    secrets = [".env", "docker/.env", "rules/.env", "cluster.env", "sub/dir/prod.env"]
    context, dockerfile = make_context(tmp_path, {rel: "ANOMSTREAM_SASL_PASSWORD=x\n" for rel in secrets},
                                       None, "FROM scratch\n", "docker/Dockerfile")
    assert not set(secrets) & context_paths(context, dockerfile)


@pytest.mark.parametrize("dockerfile", sorted(DOCKER_DIR.glob("Dockerfile*")), ids=lambda p: p.name)
def test_dockerfile_builds_without_buildkit(dockerfile):
    """The design: no BuildKit-only syntax, so the classic builder (CI's docker-compose 1.29,
    DOCKER_BUILDKIT=0) builds both images; neither the compose file nor the README asks for BuildKit."""
    assert not buildkit_only(dockerfile), f"{dockerfile.name} needs BuildKit: {buildkit_only(dockerfile)}"


# --- The checks fail where they should --------------------------------------------------------


def make_context(tmp_path: Path, files: dict[str, str], dockerignore: str | None, dockerfile: str,
                 dockerfile_at: str = "Dockerfile") -> tuple[Path, Path]:
    for rel, text in {**files, dockerfile_at: dockerfile}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    if dockerignore is not None:
        (tmp_path / ".dockerignore").write_text(dockerignore)
    return tmp_path, tmp_path / dockerfile_at


def test_a_source_left_out_by_dockerignore_is_reported(tmp_path):
    files = {"data/x.csv": "1\n", "app.py": ""}
    dockerfile = "FROM scratch\nCOPY app.py /app/\nCOPY data/x.csv /data/x.csv\n"
    assert missing_sources(*make_context(tmp_path, files, None, dockerfile)) == []
    (tmp_path / ".dockerignore").write_text("# comment\ndata\n")
    assert missing_sources(tmp_path, tmp_path / "Dockerfile") == ["COPY data/x.csv: left out by .dockerignore"]


def test_the_issue_17_images_would_have_failed(tmp_path):
    """The images of issue 17 copied tests/data/kafka_load.csv and broker/jmx-exporter.yaml while
    .dockerignore left out `tests` and `broker`: both are reported."""
    files = {"tests/data/kafka_load.csv": "t,v\n", "broker/jmx-exporter.yaml": "rules: []\n",
             "broker/pom.xml": "<project/>\n"}
    dockerfile = ("FROM python:3.11-slim\nCOPY tests/data/kafka_load.csv /app/\n"
                  "COPY --chown=appuser:appuser broker/jmx-exporter.yaml /opt/jmx/\n")
    problems = missing_sources(*make_context(tmp_path, files, "tests\nbroker\ndocker\n", dockerfile,
                                             "docker/Dockerfile"))
    assert problems == ["COPY tests/data/kafka_load.csv: left out by .dockerignore",
                        "COPY broker/jmx-exporter.yaml: left out by .dockerignore"]


@pytest.mark.parametrize("dockerignore, copied, missing", [
    # `!` takes a file back in; the rest of the folder stays out.
    ("broker/*\n!broker/keep.yaml\n", "broker/keep.yaml", False),
    ("broker/*\n!broker/keep.yaml\n", "broker/pom.xml", True),
    # The last matching pattern decides.
    ("!broker/keep.yaml\nbroker\n", "broker/keep.yaml", True),
    ("broker\n!broker/keep.yaml\n", "broker/keep.yaml", False),
    # `**` is any number of folders, none included; patterns are relative to the context root.
    ("**/secret.txt\n", "deep/down/secret.txt", True),
    ("**/secret.txt\n", "secret.txt", True),
    ("/deep/down\n", "deep/down/secret.txt", True),
    ("down\n", "deep/down/secret.txt", False),  # not at the root: no match
    ("deep/*/secret.txt\n", "deep/down/secret.txt", True),
    ("*.yaml\n", "broker/keep.yaml", False),  # `*` stays within one folder
    ("broker/*.yaml\n", "broker/keep.yaml", True),
    ("broker/?eep.yaml\n", "broker/keep.yaml", True),
])
def test_dockerignore_semantics(tmp_path, dockerignore, copied, missing):
    files = {"broker/keep.yaml": "", "broker/pom.xml": "", "deep/down/secret.txt": "", "secret.txt": ""}
    context, dockerfile = make_context(tmp_path, files, dockerignore, f"FROM scratch\nCOPY {copied} /x\n")
    assert bool(missing_sources(context, dockerfile)) == missing, missing_sources(context, dockerfile)


def test_missing_files_empty_folders_and_wildcards_are_reported(tmp_path):
    files = {"conf/a.yaml": "", "conf/b.yaml": "", "app.py": ""}
    dockerfile = ("FROM scratch\nCOPY --from=build /out /out\nADD https://example.invalid/x.jar /x.jar\n"
                  "COPY nothing.txt /\nCOPY conf /conf\nCOPY conf/*.json /conf/\nCOPY [\"app.py\", \"/app/\"]\n"
                  "COPY . /src\n")
    problems = missing_sources(*make_context(tmp_path, files, "conf/*\n", dockerfile))
    assert problems == ["COPY nothing.txt: no such file in the build context",
                        "COPY conf: every file under it is left out by .dockerignore",
                        "COPY conf/*.json: nothing in the build context matches"]


def test_the_dockerfile_is_sent_even_where_dockerignore_leaves_its_folder_out(tmp_path):
    context, dockerfile = make_context(tmp_path, {"app.py": ""}, "docker\n", "FROM scratch\nCOPY app.py /\n",
                                       "docker/Dockerfile")
    assert "docker/Dockerfile" in context_paths(context, dockerfile)
    assert missing_sources(context, dockerfile) == []


@pytest.mark.parametrize("pattern", ["Secret.txt", "conf/[ab].yaml", "conf/[!a].yaml"])
def test_patterns_read_differently_by_docker_py_and_the_docker_cli_are_refused(tmp_path, pattern):
    (tmp_path / ".dockerignore").write_text(pattern + "\n")
    with pytest.raises(AssertionError, match="may read differently"):
        dockerignore_patterns(tmp_path)


@pytest.mark.parametrize("snippet", [
    "# syntax=docker/dockerfile:1\nFROM scratch\n",
    "FROM scratch\nCOPY --chmod=755 run.sh /run.sh\n",
    "FROM scratch\nCOPY --link app.py /app/\n",
    "FROM scratch\nADD --checksum=sha256:00 https://example.invalid/x /x\n",
    "FROM scratch\nRUN --mount=type=cache,target=/root/.cache pip install x\n",
    "FROM scratch\nRUN <<EOF\necho hi\nEOF\n",
    "FROM scratch\nCOPY <<-'EOT' /etc/x.conf\nkey=value\nEOT\n",
])
def test_buildkit_only_syntax_is_found(tmp_path, snippet):
    (tmp_path / "Dockerfile").write_text(snippet)
    assert buildkit_only(tmp_path / "Dockerfile")


def test_classic_builder_syntax_passes(tmp_path):
    (tmp_path / "Dockerfile").write_text(
        "# a comment\nFROM python:3.11-slim\nARG EXTRAS=\"\"\nCOPY --chown=1:1 a b /x/\n"
        "ADD --chown=appuser:appuser https://example.invalid/x.jar /x.jar\n"
        "RUN echo $((1 << 2)) && python -c \"print(1 <<2)\"\n"
        "HEALTHCHECK --interval=10s CMD [\"python\", \"-c\", \"0\"]\n")
    assert buildkit_only(tmp_path / "Dockerfile") == []
