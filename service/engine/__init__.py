"""The engine: models loaded, batched and run, with no HTTP in it (service.api is its HTTP face)."""
