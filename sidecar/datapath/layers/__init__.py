"""The request path's layers, one concern a module; their public names re-exported (`from .layers import X`)."""

# Not compiled (setup.py compiles the modules): importing the package imports every layer, base first.
from .base import Balance, Layer, _Lane
from .trace import StartTrace
from .ratelimit import RateLimit, limit_inbound
from .authorize import Authorize, authorized
from .route import Route, RouteByHost, RouteFn, RouteTo, host_index, route_by_host
from .traffic import Traffic
from .rules import Rules
from .timeout import Timeout
from .fault import Fault
from .breaker import Breaker
from .retries import Retries
from .metrics import Metrics, metric_labels
from .mirror import Mirror
from .balance import LeastRequest, TrafficBalance, balance_least_request, balance_traffic
from . import (
    authorize, balance, base, breaker, fault, metrics, mirror, ratelimit, retries, route, rules, timeout, trace,
    traffic,
)

# each concern's module in chain order (sidecar.datapath.engine re-exports their names)
MODULES = (base, metrics, trace, ratelimit, authorize, route, traffic, rules, timeout, fault, breaker, retries, mirror,
           balance)

__all__ = ["Authorize", "Balance", "Breaker", "Fault", "Layer", "LeastRequest", "Metrics", "Mirror", "RateLimit",
           "Retries", "Route", "RouteByHost", "RouteFn", "RouteTo", "Rules", "StartTrace", "Timeout", "Traffic",
           "TrafficBalance", "_Lane", "authorized", "balance_least_request", "balance_traffic", "host_index",
           "limit_inbound", "metric_labels", "route_by_host"]
