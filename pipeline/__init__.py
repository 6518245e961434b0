"""Batch asset pipeline for the Scenario API.

Manifests of prompts (YAML, in git) are expanded into items, submitted to Scenario by
Celery tasks, polled cheaply from SQL, downloaded into a bucket, and recorded with their
full lineage in a SQL database.
"""

__version__ = "0.1.0"
