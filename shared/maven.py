"""Jars from Maven Central by `mvn dependency:copy-dependencies` on a pom of the repository (the
local broker's, the Spark Kafka connector's): nothing is built, the runtime classpath is copied."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def copy_dependencies(pom: Path, out: Path, *flags: str) -> None:
    """The runtime dependencies of `pom` into `out` (extra `flags` for the dependency plugin)."""
    if shutil.which("mvn") is None:
        raise RuntimeError(f"Maven (mvn) is needed to fetch the jars of {pom}")
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mvn", "-q", "-B", "-f", str(pom), "dependency:copy-dependencies",
         f"-DoutputDirectory={out}", "-DincludeScope=runtime", *flags],
        check=True,
    )
