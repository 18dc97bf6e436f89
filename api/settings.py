"""Settings of the HTTP edge: authentication and limits (pydantic-settings, env prefix ``CONSERVE_``).

Separate from orchestrator.runtime.ServeSettings (the serving runtime's) so the API's knobs stay in api/;
`orchestrator serve` builds both from its flags and the environment.

Defaults and why:
- ``auth`` "auto": keys are required whenever serve binds a non-loopback address; "off" serves without keys
  (local development; serve says so at start), "on" requires keys on loopback too.
- ``auth_cache_ttl_s`` 5 s: a key checked against the database is trusted this long without asking again
  (the hot path stays free of SQL); a revoked key is refused at most this long after `keys revoke`.
- ``max_body_bytes`` 8 MiB: a prompt at a 131,072-token context is ~0.5 MB of text at ~4 characters per
  token (router.CHARS_PER_TOKEN); 16x room for JSON escaping, message structure and token-id prompts.
- ``header_timeout_s`` 10 s / ``body_timeout_s`` 30 s: a client on any working link sends a request's
  headers in well under a second; slow-loris connections are cut.
- ``max_connections`` 4096 / ``max_concurrent_requests`` 2048: open connections and completion requests in
  flight (streams included) before new ones get 503 with Retry-After; 2x the 1,000 concurrent streaming
  conversations serve held in the issue-13 test.
- per-tenant rate and token limits: off (0) by default, a single-tenant deployment is not throttled.
"""

from __future__ import annotations

import ipaddress
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["ApiSettings", "is_loopback"]


class ApiSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CONSERVE_", extra="ignore")

    auth: Literal["auto", "on", "off"] = Field(
        "auto", description="require API keys: auto (when binding a non-loopback address), on, off"
    )
    scrape_token: SecretStr | None = Field(
        None, description="bearer token that may read /metrics only (Prometheus); admin keys may too"
    )
    auth_cache_ttl_s: float = Field(5.0, ge=0, description="trust a checked key this long (revocation lag)")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="request body limit (413 above)")
    header_timeout_s: float = Field(10.0, gt=0, description="cut a connection whose headers take longer")
    body_timeout_s: float = Field(30.0, gt=0, description="408 when a request body takes longer to arrive")
    max_connections: int = Field(4096, ge=1, description="open connections; more get 503 + Retry-After")
    max_concurrent_requests: int = Field(
        2048, ge=1, description="completion requests in flight (streams included); more get 503 + Retry-After"
    )
    tenant_max_concurrent_requests: int = Field(
        0, ge=0, description="per tenant: completion requests in flight; more get 429 (0: no limit)"
    )
    tenant_requests_per_s: float = Field(
        0.0, ge=0, description="per tenant: sustained request rate, burst tenant_burst (0: no limit)"
    )
    tenant_burst: int = Field(20, ge=1, description="per tenant: requests allowed at once above the rate")
    tenant_tokens_per_min: int = Field(
        0, ge=0, description="per tenant: prompt + max_tokens (estimated) per minute; 429 above (0: no limit)"
    )
    retry_after_s: int = Field(1, ge=1, description="Retry-After of 503 answers when the server is full")

    def auth_required(self, host: str) -> bool:
        if self.auth == "auto":
            return not is_loopback(host)
        return self.auth == "on"


def is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name other than localhost, or 0.0.0.0 / :: (all interfaces)
