"""The ETOS-compatible HTTP API (FastAPI): `environment-provider api` serves `app.create_app(settings)`."""
