"""Layering: the import-linter contracts of pyproject.toml ([tool.importlinter]) hold.

shared imports nothing from models or services; models imports no service and no Kafka client;
no service imports another service or the offline jobs (services.jobs may import the services)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from helpers import REPO_ROOT


def test_import_contracts_are_kept():
    lint_imports = Path(sys.executable).parent / "lint-imports"
    assert lint_imports.exists(), f"{lint_imports} is missing: install the test extra (pip install -e '.[test]')"
    result = subprocess.run([str(lint_imports), "--config", str(REPO_ROOT / "pyproject.toml"), "--no-cache"],
                            check=False, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"lint-imports exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    assert "broken" not in result.stdout.lower().replace("0 broken", ""), result.stdout
