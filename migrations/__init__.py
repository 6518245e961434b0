"""Alembic migrations of the lineage schema (installed as `pipeline.migrations`)."""
