"""Turn a compose file's services into the ContainerInfo records meshd would see; no Docker involved.

`containers_from_compose` is pure (a compose mapping in, ContainerInfo records out);
`read_compose_file` only reads and parses the YAML file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from meshcore.labels import COMPOSE_PROJECT, COMPOSE_SERVICE, ContainerInfo

_MAX_RANGE = 1024  # refuse to expand absurd port ranges


class ComposeError(ValueError):
    """The compose file cannot be read or is not shaped like a compose file."""


def read_compose_file(path: str | Path) -> dict[str, Any]:
    """Read and parse a compose file; raises ComposeError with a clear message."""
    import yaml  # imported here to keep `meshctl --help` fast

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ComposeError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise ComposeError(f"{p}: is a directory, not a compose file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ComposeError(f"{p}: cannot read: {exc}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ComposeError(f"{p}: not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise ComposeError(f"{p}: expected a mapping at the top level (with a 'services' key)")
    return doc


def normalize_project_name(name: str) -> str:
    """Compose's project name rules: lowercase, only [a-z0-9_-], starting with a letter or digit."""
    value = re.sub(r"[^a-z0-9_-]", "", name.lower())
    value = value.lstrip("_-")
    return value or "default"


def project_name(compose_path: str | Path, doc: dict[str, Any], override: str | None = None) -> str:
    """The compose project: `override`, else the file's top-level `name:`, else its directory's name."""
    if override:
        return normalize_project_name(override)
    if isinstance(doc.get("name"), str) and doc["name"].strip():
        return normalize_project_name(doc["name"])
    return normalize_project_name(Path(compose_path).resolve().parent.name)


def label_value(value: Any) -> str:
    """A compose label value as Docker stores it (a string)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def service_labels(service: str, raw: Any) -> dict[str, str]:
    """`labels:` in mapping form or list form (`["key=value", ...]`)."""
    if raw is None:
        return {}
    if isinstance(raw, dict):
        return {str(k): label_value(v) for k, v in raw.items()}
    if isinstance(raw, list):
        out = {}
        for item in raw:
            if not isinstance(item, str):
                raise ComposeError(f"service {service}: labels: list entries must be 'key=value' strings, got {item!r}")
            key, _, value = item.partition("=")
            out[key.strip()] = value
        return out
    raise ComposeError(f"service {service}: labels: expected a mapping or a list")


def _port_range(service: str, where: str, text: str) -> list[int]:
    text = text.strip()
    m = re.fullmatch(r"(\d+)(?:-(\d+))?", text)
    if not m:
        raise ComposeError(f"service {service}: {where}: {text!r} is not a port or port range")
    low = int(m.group(1))
    high = int(m.group(2)) if m.group(2) else low
    if high < low or high - low >= _MAX_RANGE:
        raise ComposeError(f"service {service}: {where}: bad port range {text!r}")
    return list(range(low, high + 1))


def _split_protocol(text: str) -> tuple[str, str]:
    spec, _, proto = text.partition("/")
    return spec, (proto.strip().lower() or "tcp")


def _expose_ports(service: str, raw: Any) -> list[int]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ComposeError(f"service {service}: expose: expected a list")
    ports: list[int] = []
    for item in raw:
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise ComposeError(f"service {service}: expose: {item!r} is not a port")
        spec, proto = _split_protocol(str(item))
        if proto == "tcp":
            ports.extend(_port_range(service, "expose", spec))
    return ports


def _published_ports(service: str, raw: Any) -> list[int]:
    """The container side of `ports:` entries, short ("[ip:]host:container[/proto]") and long syntax."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ComposeError(f"service {service}: ports: expected a list")
    ports: list[int] = []
    for item in raw:
        if isinstance(item, dict):
            if "target" not in item:
                raise ComposeError(f"service {service}: ports: long syntax entry without 'target': {item!r}")
            if str(item.get("protocol", "tcp")).lower() != "tcp":
                continue
            ports.extend(_port_range(service, "ports", str(item["target"])))
        elif isinstance(item, (int, str)) and not isinstance(item, bool):
            spec, proto = _split_protocol(str(item))
            if proto != "tcp":
                continue
            # The container side is always last; ':' also separates an optional host IP ([::1] too).
            ports.extend(_port_range(service, "ports", spec.rsplit(":", 1)[-1]))
        else:
            raise ComposeError(f"service {service}: ports: {item!r} is not a port mapping")
    return ports


def containers_from_compose(doc: dict[str, Any], project: str) -> list[ContainerInfo]:
    """One ContainerInfo per compose service, named after the service, as meshd would read it."""
    services = doc.get("services")
    if services is None:
        raise ComposeError("no 'services' section")
    if not isinstance(services, dict):
        raise ComposeError("'services' must be a mapping of service name to service")
    out = []
    for name, body in services.items():
        name = str(name)
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise ComposeError(f"service {name}: expected a mapping")
        labels = service_labels(name, body.get("labels"))
        labels[COMPOSE_PROJECT] = project
        labels[COMPOSE_SERVICE] = name
        ports: list[int] = []
        for port in _expose_ports(name, body.get("expose")) + _published_ports(name, body.get("ports")):
            if port not in ports:
                ports.append(port)
        out.append(ContainerInfo(id=name, name=name, labels=labels, exposed_ports=tuple(sorted(ports)),
                                 network_mode=str(body.get("network_mode") or "")))
    return out
