"""The pipeline's shared pieces, below the stage scripts and flows/: errors and file writing (common), the
params schema (config), lineage and provenance records, image checks (images), the raw-data layout (rawdata)
and its ingest, and the torchrun relaunch of pretraining (launch). Imports ssl_models, never stages.X or flows."""
