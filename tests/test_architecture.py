"""The house rules ARCHITECTURE.md states that a reader can check in the source: the layer contracts (import-linter,
also run by `make check`), the environment read in one place, modules of a readable size, comments that point at
public sources only."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("neuron", "neuron_cli", "producer", "worker", "neuron_models", "db", "review")


def sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_the_layer_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    res = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-3000:]
    assert "0 broken" in res.stdout


def test_only_the_settings_module_reads_the_environment():
    reads = re.compile(r"\bos\.environ\b|\bos\.getenv\b|\bgetenv\(")
    found = [f"{p.relative_to(ROOT)}:{n}" for p in sources() if p != ROOT / "neuron" / "settings.py"
             for n, line in enumerate(p.read_text().splitlines(), 1) if reads.search(line)]
    assert found == [], "read the variable in neuron.settings.Settings.from_env and pass it down"


def test_no_source_module_is_past_800_lines():
    long = {str(p.relative_to(ROOT)): n for p in sources() if (n := len(p.read_text().splitlines())) > 800}
    assert long == {}


def test_comments_cite_public_sources_not_documents_outside_the_repository():
    private = re.compile(r"\bNOTES \d|\bSTYLE \d|\bthe seed's\b|\bsnag \d|\(issue \d")
    found = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}" for p in [*sources(), *sorted((ROOT / "tests").glob("*.py"))]
             for n, line in enumerate(p.read_text().splitlines(), 1) if private.search(line)]
    assert found == []
