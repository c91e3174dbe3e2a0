"""The top layer: Prefect flows and deployments that run the DVC pipeline, and the ``sslcook`` console script."""
