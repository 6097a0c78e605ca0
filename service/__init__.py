"""bitplan service: REST API, job store, task queue, pipeline and CLI."""
