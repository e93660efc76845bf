"""Mesh-wide tracing and access-log settings (`TelemetrySettings`, pushed in every snapshot): their
decoding from meshd's environment and the snapshot, and the access-log decision they drive.

Pure, standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

ACCESS_OFF, ACCESS_ERRORS, ACCESS_SAMPLED, ACCESS_FULL = "off", "errors", "sampled", "full"
ACCESS_LOG_MODES = (ACCESS_OFF, ACCESS_ERRORS, ACCESS_SAMPLED, ACCESS_FULL)
DEFAULT_SAMPLING = 1.0        # percent, Istio's default (meshConfig defaultConfig.tracing.sampling)
# Failures only by default: the lines an operator reads (Envoy users' common status/flag filter), and
# nothing per successful request on the hot path (bench/RESULTS.md, "Cost of metrics and tracing").
DEFAULT_ACCESS_LOG = ACCESS_ERRORS


class SettingsError(ValueError):
    """A telemetry setting that is not valid; the message names it."""


@dataclass(frozen=True)
class TelemetrySettings:
    """Mesh-wide tracing and access-log settings, pushed in every snapshot."""

    sampling: float = DEFAULT_SAMPLING      # percent of new traces sampled, 0-100
    otlp_endpoint: str | None = None        # external OTLP/HTTP collector (Jaeger, Tempo), .../v1/traces
    access_log: str = DEFAULT_ACCESS_LOG    # off | errors | sampled (sampled traces and errors) | full

    @property
    def rate(self) -> float:
        return self.sampling / 100.0


def decode_otlp_endpoint(value: str) -> str:
    """An OTLP/HTTP traces URL from `http(s)://host[:port][/path]`; a bare base gets `/v1/traces`
    (OTLP 1.0 default path)."""
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SettingsError(f"otlp endpoint: {value!r} is not an http(s)://host[:port] URL")
    try:
        parts.port
    except ValueError:
        raise SettingsError(f"otlp endpoint: {value!r} has a bad port") from None
    if parts.query or parts.fragment:
        raise SettingsError(f"otlp endpoint: {value!r} must not have a query or fragment")
    path = parts.path.rstrip("/") or "/v1/traces"
    return f"{parts.scheme}://{parts.netloc}{path}"


def decode_sampling(value: Any) -> float:
    """A sampling percentage 0-100 from a number or text (`"10"`, `"0.5"`, `"10%"`)."""
    text = str(value).strip().rstrip("%")
    try:
        rate = float(text)
    except ValueError:
        raise SettingsError(f"sampling: {value!r} is not a percentage") from None
    if not 0.0 <= rate <= 100.0 or rate != rate:
        raise SettingsError(f"sampling: {value!r} is not between 0 and 100")
    return rate


def decode_access_log(value: Any) -> str:
    mode = str(value).strip().lower()
    if mode not in ACCESS_LOG_MODES:
        raise SettingsError(f"access log: {value!r} is not one of {', '.join(ACCESS_LOG_MODES)}")
    return mode


def decode_settings(raw: Any, base: TelemetrySettings = TelemetrySettings()) -> TelemetrySettings:
    """Settings from a JSON object (`sampling`, `otlp_endpoint`, `access_log`), unspecified keys
    from `base`; `otlp_endpoint` null or "" clears it. Raises SettingsError naming the key."""
    if not isinstance(raw, dict):
        raise SettingsError("telemetry: expected an object")
    unknown = set(raw) - {"sampling", "otlp_endpoint", "access_log"}
    if unknown:
        raise SettingsError(f"telemetry: unknown setting {sorted(unknown)[0]!r}")
    sampling = decode_sampling(raw["sampling"]) if "sampling" in raw else base.sampling
    endpoint = base.otlp_endpoint
    if "otlp_endpoint" in raw:
        value = raw["otlp_endpoint"]
        if value is not None and not isinstance(value, str):
            raise SettingsError("otlp endpoint: expected a URL or null")
        endpoint = decode_otlp_endpoint(value) if value else None
    access = decode_access_log(raw["access_log"]) if "access_log" in raw else base.access_log
    return TelemetrySettings(sampling=sampling, otlp_endpoint=endpoint, access_log=access)


def encode_settings(settings: TelemetrySettings) -> dict:
    return {"sampling": settings.sampling, "otlp_endpoint": settings.otlp_endpoint,
            "access_log": settings.access_log}


def should_log_access(mode: str, sampled: bool, status: int, flags: str, no_flags: str = "-") -> bool:
    """Whether one finished request is access-logged: `full` always, `errors` when it failed (5xx,
    no response, or any response flag), `sampled` when it failed or its trace is sampled, `off` never."""
    if mode == ACCESS_FULL:
        return True
    if mode == ACCESS_OFF:
        return False
    failed = status >= 500 or status == 0 or flags != no_flags
    return failed or (sampled and mode == ACCESS_SAMPLED)
