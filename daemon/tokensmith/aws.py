"""boto3 clients for the AWS source and sink, and the one place botocore errors are converted.

botocore retries on its own by default; the keeper is the layer that retries, so each client makes
exactly one attempt with bounded connect/read timeouts. Messages are built from the error code and
HTTP status only: AWS error text is not vetted."""

from __future__ import annotations

from typing import Any

from tokensmith.errors import ConfigError, TokensmithError

try:
    import boto3
    import botocore.exceptions as boto_exc
    from botocore.awsrequest import AWSHTTPConnectionPool, AWSHTTPSConnectionPool
    from botocore.config import Config
except ImportError as exc:  # a file- or Vault-only install
    raise ConfigError("the config uses AWS Secrets Manager but boto3 is not installed: "
                      "pip install 'tokensmith[aws]'") from exc

from tokensmith.configview import AWS_TIMEOUT
from tokensmith.deadline import limit, watched_pool_classes

RETRYABLE_CODES = {"ThrottlingException", "Throttling", "TooManyRequestsException", "RequestLimitExceeded",
                   "RequestThrottled", "SlowDown", "InternalServiceError", "InternalServiceErrorException",
                   "InternalFailure", "ServiceUnavailable", "RequestTimeout", "RequestTimeoutException"}
NOT_CONFIGURED = (boto_exc.NoCredentialsError, boto_exc.PartialCredentialsError, boto_exc.NoRegionError)


WATCHED_POOLS = watched_pool_classes(AWSHTTPConnectionPool, AWSHTTPSConnectionPool)


class DeadlineSender:
    """botocore's HTTP session with each request and its whole response within one deadline (urllib3's
    timeouts are per recv: an endpoint dripping bytes would hold the caller for ever). botocore has no
    public hook for its connection classes, hence the private attributes, checked by the tests."""

    def __init__(self, http, seconds: float):
        self._http = http
        self.seconds = seconds
        http._pool_classes_by_scheme = WATCHED_POOLS  # proxy managers made later
        http._manager.pool_classes_by_scheme = WATCHED_POOLS

    def send(self, request):
        with limit(self.seconds) as call:
            try:
                reply = self._http.send(request)
            except boto_exc.BotoCoreError as exc:
                if call.expired:
                    raise boto_exc.ReadTimeoutError(endpoint_url=request.url, error=exc) from exc
                raise
            if call.expired:  # the reaper cut what looked like the end of the response (endless trailers)
                raise boto_exc.ReadTimeoutError(endpoint_url=request.url, error="deadline passed")
            return reply

    def __getattr__(self, name):
        return getattr(self._http, name)


def make_client(service: str, config, pool_size: int = 10, timeout: float | None = None) -> Any:
    """config: the `aws:` section (model or view), None when the config has none; timeout overrides its."""
    timeout = timeout or (config.timeout if config is not None else AWS_TIMEOUT)
    region, endpoint_url = (config.region, config.endpoint_url) if config is not None else (None, None)
    # total_max_attempts counts the first request; botocore's "max_attempts" counts retries only
    settings = Config(retries={"total_max_attempts": 1, "mode": "standard"}, connect_timeout=timeout,
                      read_timeout=timeout, max_pool_connections=max(pool_size, 10))
    try:
        # a Session per client: boto3's default session is not thread-safe, its clients are
        client = boto3.session.Session().client(service, region_name=region, endpoint_url=endpoint_url,
                                                config=settings)
    except boto_exc.NoRegionError as exc:
        raise ConfigError("no AWS region: set aws.region or AWS_REGION") from exc
    except (boto_exc.BotoCoreError, ValueError) as exc:
        raise ConfigError(f"cannot create the AWS {service} client ({type(exc).__name__})") from exc
    endpoint = client._endpoint
    endpoint.http_session = DeadlineSender(endpoint.http_session, timeout)
    return client


def error_code(exc: BaseException) -> str | None:
    if isinstance(exc, boto_exc.ClientError):
        return exc.response.get("Error", {}).get("Code")
    return None


def map_client_error(exc: Exception, client: str | None, what: str,
                     error_cls: type[TokensmithError]) -> TokensmithError:
    """The tokensmith error for a botocore exception; use as `raise map_client_error(...) from exc`."""
    if isinstance(exc, boto_exc.ClientError):
        code = error_code(exc) or "unknown error"
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        retryable = code in RETRYABLE_CODES or (isinstance(status, int) and status >= 500)
        return error_cls(f"{what}: AWS {code}" + (f" (HTTP {status})" if status else ""), client=client,
                         retryable=retryable)
    if isinstance(exc, NOT_CONFIGURED):
        return error_cls(f"{what}: no usable AWS credentials or region ({type(exc).__name__})", client=client,
                         retryable=False)
    if isinstance(exc, boto_exc.SSLError):
        return error_cls(f"{what}: TLS verification with the AWS endpoint failed", client=client, retryable=False)
    if isinstance(exc, (boto_exc.ConnectionError, boto_exc.HTTPClientError)):
        kind = "timed out" if isinstance(exc, (boto_exc.ConnectTimeoutError, boto_exc.ReadTimeoutError)) \
            else "cannot reach the AWS endpoint"
        return error_cls(f"{what}: {kind}", client=client, retryable=True)
    if isinstance(exc, boto_exc.ParamValidationError):
        return error_cls(f"{what}: invalid request parameters", client=client, retryable=False)
    if isinstance(exc, boto_exc.BotoCoreError):
        return error_cls(f"{what}: AWS client error ({type(exc).__name__})", client=client, retryable=True)
    return error_cls(f"{what}: unexpected {type(exc).__name__}", client=client, retryable=False)
