"""flows: Prefect flows that chain the pipelines, and the `sora` command line (the top layer)."""
