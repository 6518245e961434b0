# One image for every pipeline process: worker, poller, sandbox, migrations, CLI.
# The package is installed as a wheel would be (not editable): migrations ship inside it.
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md alembic.ini ./
COPY pipeline ./pipeline
COPY migrations ./migrations
RUN pip wheel --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=build /wheels /wheels
RUN pip install /wheels/*.whl && rm -rf /wheels \
    && useradd --create-home --uid 10001 --user-group pipeline
# The working folder belongs to the user the processes run as: runs/ (galleries),
# assets/ and pipeline.db (embedded defaults) are written here.
WORKDIR /app
COPY --chown=pipeline:pipeline manifests ./manifests
RUN mkdir -p runs assets && chown pipeline:pipeline /app /app/runs /app/assets
USER pipeline
ENTRYPOINT ["pipeline"]
CMD ["--help"]
