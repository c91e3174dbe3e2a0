"""Helpers shared by the test modules: tiny models and workspaces, real image sets, the 2-process gloo harness
and the per-method checks. Imported as ``support.<module>`` (pytest puts tests/ on sys.path)."""

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
