"""Checks that every service a run needs answers, before the run is recorded.

A run that starts against an API nobody serves, a database that is down or a bucket that
does not exist would record items and then fail them one by one, often only after a long
retry loop that blames the items. These checks fail fast instead, with one line naming
the service: exit 4 (ServiceUnavailable) when it cannot be reached, exit 2 (ConfigError,
AuthError) when it answers but refuses the configuration.
"""

from __future__ import annotations

import logging
import time

from pipeline.errors import (
    ApiPermanentError,
    ApiTransientError,
    AuthError,
    ConfigError,
    ServiceUnavailable,
)
from pipeline.redact import shown
from pipeline.scenario import ScenarioClient
from pipeline.settings import Settings

logger = logging.getLogger(__name__)

#: Seconds one preflight request may take; the run's own requests use PIPELINE_HTTP_TIMEOUT.
API_TIMEOUT = 5.0
#: A transient failure (5xx, a dropped connection, a timeout) is tried again after this
#: pause, up to ATTEMPTS in all: a flaky network is not an outage, a dead port is.
RETRY_PAUSE = 0.5
ATTEMPTS = 3


def check_api(settings: Settings, key: str, secret: str, *, timeout: float = API_TIMEOUT) -> None:
    """One cheap authenticated GET (the newest job): the API answers and takes the key.

    Unreachable or failing: ServiceUnavailable naming "the Scenario API at <url>".
    401: AuthError. Answering, but not like the Scenario API (404, 400): ConfigError
    naming SCENARIO_API_URL. A 429 or a 403 for this one endpoint means it is there.
    """
    where = f"the Scenario API at {shown(settings.api_url)}"
    client = ScenarioClient(
        settings.api_url,
        key,
        secret,
        timeout=min(timeout, settings.http_timeout),
        read_retry=None,
        max_connections=1,
    )
    try:
        for attempt in range(1, ATTEMPTS + 1):
            try:
                next(client.iter_jobs(page_size=1), None)
                return
            except AuthError:
                raise
            except ApiTransientError as exc:
                status = exc.status_code
                if status == 429:
                    return  # it answered: throttled, but there
                if attempt < ATTEMPTS:
                    logger.info("preflight: %s; trying again", exc)
                    time.sleep(RETRY_PAUSE)
                    continue
                raise ServiceUnavailable(f"cannot reach {where}: {exc}") from None
            except ApiPermanentError as exc:
                if exc.status_code == 403:
                    return  # this key may not list jobs; it was accepted
                raise ConfigError(
                    f"SCENARIO_API_URL={shown(settings.api_url)}: {where} answered {exc} "
                    "(is it the API's base URL, e.g. https://api.cloud.scenario.com/v1?)"
                ) from None
    finally:
        client.close()
