"""Paths shared by the msim tests (a uniquely named module: `conftest` is ambiguous once other
test folders have their own)."""

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
KERNELS = Path(__file__).resolve().parent / "kernels"
if str(REPO_ROOT) not in sys.path:  # msim is a repository-root tool, not an installed package
    sys.path.insert(0, str(REPO_ROOT))
