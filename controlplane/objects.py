"""Defensive reading of Kubernetes objects given as plain camelCase dicts.

Objects come from a hand-edited YAML file or from the API server, and either may hold anything:
lists where mappings belong, ``None``, numbers as strings. The translation must never raise on
them; instead every problem becomes an :class:`ObjectError` that names the object and the field
path (``spec.ports[1].port``), so that one log line tells an operator exactly what to fix. The
helpers here do the type checking and the error recording once, so the translation reads like
the API reference instead of a thicket of ``isinstance`` checks.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dataplane.table import IPAddress

ObjectKey = tuple[str, str]  # (namespace, name); namespace "" for cluster-scoped kinds


class Severity(enum.Enum):
    """How bad a problem is: errors drop something the user asked for, warnings don't."""

    ERROR = "error"
    WARNING = "warning"


@dataclass(frozen=True, order=True)
class ObjectRef:
    """Which object a problem is about.

    ``location`` is where the object sat in the input (``#3``, ``#0.items[2]``); it is printed
    only when the object has no name, because then it is the only way to find it.
    """

    kind: str
    namespace: str = ""
    name: str = ""
    location: str = ""

    def __str__(self) -> str:
        kind = self.kind or "object"
        if self.name:
            return f"{kind} {self.namespace}/{self.name}" if self.namespace else f"{kind} {self.name}"
        where = f" at {self.location}" if self.location else ""
        ns = f" in namespace {self.namespace}" if self.namespace else ""
        return f"{kind} <unnamed{where}>{ns}"


@dataclass(frozen=True)
class ObjectError:
    """One problem found in one object, precise enough to act on without reading any code."""

    ref: ObjectRef
    field: str  # path inside the object, e.g. "spec.ports[1].port"; "" = the whole object
    message: str
    severity: Severity = Severity.ERROR

    @property
    def kind(self) -> str:
        return self.ref.kind

    @property
    def namespace(self) -> str:
        return self.ref.namespace

    @property
    def name(self) -> str:
        return self.ref.name

    def __str__(self) -> str:
        where = f"{self.ref} {self.field}" if self.field else str(self.ref)
        return f"{where}: {self.message}"


def join(path: str, key: str | int) -> str:
    """Extend a field path the way kubectl and the API server's validation messages print it."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    if key and all(c.isalnum() or c in "_-" for c in key) and not key[0].isdigit():
        return f"{path}.{key}" if path else key
    # Label and annotation keys contain dots and slashes: quote them so the path stays readable.
    return f'{path}["{key}"]'


def describe(value: object) -> str:
    """A short, safe rendering of an offending value for an error message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


class Fields:
    """Typed access to one object's fields that records an error instead of raising.

    Each getter returns a default when the field is missing (no error: optional fields are the
    norm in Kubernetes) and records an error when it is present with the wrong type.
    """

    def __init__(self, ref: ObjectRef, errors: list[ObjectError]) -> None:
        self.ref = ref
        self.errors = errors
        self.failed = False  # set by error(): lets a caller drop the object after reading it all

    def error(self, path: str, message: str, severity: Severity = Severity.ERROR) -> None:
        if severity is Severity.ERROR:
            self.failed = True
        self.errors.append(ObjectError(self.ref, path, message, severity))

    def warn(self, path: str, message: str) -> None:
        self.error(path, message, Severity.WARNING)

    def mapping(self, obj: Any, key: str, path: str) -> dict[str, Any]:
        """A nested mapping, or {} when absent or not a mapping."""
        value = obj.get(key) if isinstance(obj, Mapping) else None
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.error(join(path, key), f"must be a mapping, got {describe(value)}")
            return {}
        return dict(value)

    def sequence(self, obj: Any, key: str, path: str) -> list[Any]:
        """A nested list, or [] when absent or not a list."""
        value = obj.get(key) if isinstance(obj, Mapping) else None
        if value is None:
            return []
        if not isinstance(value, list | tuple):
            self.error(join(path, key), f"must be a list, got {describe(value)}")
            return []
        return list(value)

    def string(self, obj: Any, key: str, path: str, default: str = "") -> str:
        value = obj.get(key) if isinstance(obj, Mapping) else None
        if value is None:
            return default
        if not isinstance(value, str):
            self.error(join(path, key), f"must be a string, got {describe(value)}")
            return default
        return value

    def boolean(self, obj: Any, key: str, path: str, default: bool | None = None) -> bool | None:
        value = obj.get(key) if isinstance(obj, Mapping) else None
        if value is None:
            return default
        if not isinstance(value, bool):
            self.error(join(path, key), f"must be true or false, got {describe(value)}")
            return default
        return value

    def integer(self, obj: Any, key: str, path: str, lo: int, hi: int) -> int | None:
        """An int in lo..hi, or None when absent or invalid (invalid is recorded).

        Strings of digits are refused on purpose: the API server refuses them too, and accepting
        them here would make the file source accept what the cluster would not.
        """
        value = obj.get(key) if isinstance(obj, Mapping) else None
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.error(join(path, key), f"must be an integer in {lo}..{hi}, got {describe(value)}")
            return None
        if not lo <= value <= hi:
            self.error(join(path, key), f"must be in {lo}..{hi}, got {value}")
            return None
        return value

    def string_map(self, obj: Any, key: str, path: str) -> dict[str, str]:
        """Labels and annotations: string keys to string values; bad pairs are dropped."""
        out: dict[str, str] = {}
        for k, v in self.mapping(obj, key, path).items():
            if not isinstance(k, str):
                self.error(join(path, key), f"key {describe(k)} must be a string")
            elif v is None:
                out[k] = ""  # kubectl prints an empty value as null after a round trip
            elif not isinstance(v, str):
                self.error(join(join(path, key), k), f"must be a string, got {describe(v)}")
            else:
                out[k] = v
        return out


def parse_ip(value: object) -> tuple[IPAddress | None, str]:
    """Parse an IP address in the strict form the API server stores; return (ip, why-not).

    Zone ids (``fe80::1%eth0``) and IPv4-mapped IPv6 addresses are refused: neither can be a
    cluster address, and the second would let one address appear under two families.
    """
    if not isinstance(value, str):
        return None, f"must be an IP address string, got {describe(value)}"
    if "%" in value:
        return None, f"must not carry a zone id, got {describe(value)}"
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        return None, f"is not a valid IP address: {describe(value)}"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return None, f"must not be an IPv4-mapped IPv6 address, got {describe(value)}"
    return ip, ""


def parse_frontend_ip(value: object) -> tuple[IPAddress | None, str]:
    """Parse a service VIP (cluster, external or load-balancer IP); return (ip, why-not).

    The unspecified address is reserved: NodePort frontends use it to mean "every node address".
    """
    ip, why = parse_ip(value)
    if ip is None:
        return None, why
    if ip.is_unspecified:
        return None, "must not be the unspecified address (0.0.0.0 / ::)"
    if ip.is_multicast:
        return None, "must not be a multicast address"
    return ip, ""


def parse_endpoint_ip(value: object, family: str) -> tuple[IPAddress | None, str]:
    """Parse a backend address of an EndpointSlice with this addressType; return (ip, why-not).

    Refuses what the API server refuses for endpoints, and an address of the other family.
    """
    ip, why = parse_ip(value)
    if ip is None:
        return None, why
    if ip.is_unspecified:
        return None, "must not be the unspecified address"
    if ip.is_loopback:
        return None, "must not be a loopback address"
    if ip.is_link_local:
        return None, "must not be a link-local address"
    if ip.is_multicast:
        return None, "must not be a multicast address"
    if ip_family(ip) != family:
        return None, f"{ip} is not an {family} address (addressType {family})"
    return ip, ""


def ip_family(ip: IPAddress) -> str:
    """The EndpointSlice addressType / Service ipFamilies spelling of an address's family."""
    return "IPv6" if ip.version == 6 else "IPv4"
