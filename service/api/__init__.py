"""The HTTP face of the engine: the app, its dependencies, routes, schemas and errors (the only place an
engine error becomes an HTTP status)."""
