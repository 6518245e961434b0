# One image for every pipeline process: worker, poller, sandbox, migrations, CLI.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY pipeline ./pipeline
COPY migrations ./migrations
COPY manifests ./manifests
RUN pip install -e . && useradd --create-home pipeline
USER pipeline
ENTRYPOINT ["pipeline"]
CMD ["--help"]
