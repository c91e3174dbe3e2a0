"""DVC stages: one module per stage, each run as ``python -m stages.<name>`` from the workspace root.

A stage reads params.yaml (validated by :mod:`stages.workspace.config`), calls :mod:`ssl_models`, and writes its outputs
atomically together with a lineage record (:mod:`stages.workspace.lineage`).
"""
