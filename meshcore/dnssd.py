"""The DNS-SD record of a mesh instance (RFC 6763): TXT keys both ways; pure, standard library only."""

from __future__ import annotations

from .snapshot import Announcement

SERVICE_TYPE = "_mesh._tcp.local."
TXT_KEYS = ("service", "version", "identity", "protocol", "container")


def instance_name(container_id: str) -> str:
    """The DNS-SD instance name of an app container (short id, unique on a host)."""
    return f"{container_id[:12]}.{SERVICE_TYPE}"


def encode_txt(ann: Announcement) -> dict[str, str]:
    """TXT key/values for an announcement (RFC 6763 section 6: short keys, one value each)."""
    return {"service": ann.service, "version": ann.version, "identity": ann.identity,
            "protocol": ann.protocol, "container": ann.instance}


def decode_txt(properties: dict, addresses: list[str], port: int) -> list[Announcement]:
    """Announcements (one per IPv4 address) from a resolved record; [] when a key is missing."""
    txt = {}
    for key, value in properties.items():
        k = key.decode() if isinstance(key, bytes) else str(key)
        if value is None:
            continue
        txt[k] = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
    if any(not txt.get(k) for k in TXT_KEYS) or not 0 < port < 65536:
        return []
    return [Announcement(instance=txt["container"], service=txt["service"], version=txt["version"],
                         address=addr, port=port, identity=txt["identity"], protocol=txt["protocol"])
            for addr in sorted(addresses) if "." in addr]
