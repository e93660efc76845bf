"""A small blocking client of meshd's admin API (standard library only, fast to import)."""

from __future__ import annotations

import json
import os
from typing import Any

DEFAULT_API = "http://127.0.0.1:15014"
API_ENV = "MESHD_API"
DEFAULT_TIMEOUT = 3.0
TOKEN_ENV = "MESHD_ADMIN_TOKEN"
TOKEN_FILE_ENV = "MESHD_ADMIN_TOKEN_FILE"
# Where meshd writes its admin token (<state dir>/admin.token): meshd on the host, or the state volume
# of compose/meshd.yml (project `meshd`) as the host's root sees it.
DEFAULT_TOKEN_FILES = ("/var/lib/meshd/admin.token",
                       "/var/lib/docker/volumes/meshd_meshd-state/_data/admin.token")


def load_admin_token(token_file: str | None = None) -> str | None:
    """meshd's admin token: $MESHD_ADMIN_TOKEN, else the first readable of `token_file`,
    $MESHD_ADMIN_TOKEN_FILE and the default locations; None when there is none."""
    token = os.environ.get(TOKEN_ENV, "").strip()
    if token:
        return token
    candidates = [p for p in (token_file, os.environ.get(TOKEN_FILE_ENV)) if p] or list(DEFAULT_TOKEN_FILES)
    for path in candidates:
        try:
            with open(path, encoding="ascii") as f:
                token = f.read().strip()
        except (OSError, UnicodeDecodeError):
            continue
        if token:
            return token
    return None


class MeshdUnreachable(RuntimeError):
    """meshd's admin API did not answer at `url`."""

    def __init__(self, url: str, reason: str):
        super().__init__(f"meshd is not reachable at {url}: {reason}")
        self.url = url
        self.reason = reason


class MeshdApiError(RuntimeError):
    """meshd answered, but not with what the API promises (HTTP error status or bad JSON)."""

    def __init__(self, url: str, message: str, status: int | None = None, error: str | None = None):
        super().__init__(f"meshd admin API {url}: {message}")
        self.url = url
        self.status = status
        self.error = error  # meshd's own explanation (the `error` field of its JSON answer)


def resolve_base_url(api: str | None) -> str:
    """The admin API base URL: the explicit value, else $MESHD_API, else the default; no trailing '/'."""
    url = (api or os.environ.get(API_ENV) or DEFAULT_API).strip()
    if "://" not in url:
        url = "http://" + url
    return url.rstrip("/")


class MeshdClient:
    """GETs JSON documents from meshd's admin API."""

    def __init__(self, base_url: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                 token: str | None = None, token_file: str | None = None):
        self.base_url = resolve_base_url(base_url)
        self.timeout = timeout
        self.token = token or load_admin_token(token_file)

    def get_json(self, path: str) -> Any:
        """GET `path` and return its decoded JSON; raises MeshdUnreachable or MeshdApiError."""
        return self.request("GET", path)

    def post_json(self, path: str, body: dict[str, Any]) -> Any:
        """POST a JSON object to `path` and return the decoded JSON answer."""
        return self.request("POST", path, body)

    def request(self, method: str, path: str, payload: dict[str, Any] | None = None) -> Any:
        """One API call; raises MeshdUnreachable, or MeshdApiError carrying meshd's `error` text."""
        import urllib.error
        import urllib.request

        url = self.base_url + path
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = None
        if payload is not None:
            data = json.dumps(payload).encode()
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                body = response.read()
        except urllib.error.HTTPError as exc:
            detail = ""
            try:
                detail = exc.read().decode("utf-8", "replace").strip()[:500]
            except Exception:  # noqa: BLE001 - best effort detail only
                pass
            error = None
            try:
                error = json.loads(detail).get("error")
            except (ValueError, AttributeError):
                pass
            raise MeshdApiError(url, f"HTTP {exc.code} {exc.reason}" + (f": {detail}" if detail else ""),
                                status=exc.code, error=error) from None
        except urllib.error.URLError as exc:
            raise MeshdUnreachable(self.base_url, str(getattr(exc, "reason", exc))) from None
        except (TimeoutError, ConnectionError, OSError) as exc:
            raise MeshdUnreachable(self.base_url, str(exc) or type(exc).__name__) from None
        try:
            return json.loads(body)
        except ValueError as exc:
            raise MeshdApiError(url, f"response is not JSON: {exc}") from None

    def status(self) -> dict[str, Any]:
        """`GET /v1/status`."""
        return self._object("/v1/status")

    def services(self) -> dict[str, Any]:
        """`GET /v1/services`."""
        return self._object("/v1/services")

    def snapshot(self) -> dict[str, Any]:
        """`GET /v1/snapshot`."""
        return self._object("/v1/snapshot")

    def _object(self, path: str) -> dict[str, Any]:
        data = self.get_json(path)
        if not isinstance(data, dict):
            raise MeshdApiError(self.base_url + path, f"expected a JSON object, got {type(data).__name__}")
        return data
