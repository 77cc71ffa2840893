"""pipelines: Ray stages that wrap `sora` (Ray Data, Ray Train, Ray Serve). Never imports prefect."""
