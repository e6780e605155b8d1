"""The Ironlink API: a tenant's fleet, its machines' status and telemetry, behind per-tenant API keys.

``api.app.create_app`` builds the FastAPI application; ``python -m api`` serves it (uvicorn).
"""
