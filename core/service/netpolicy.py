"""Which network addresses a webhook may be delivered to (the SSRF guard).

A worker that POSTs to a user's URL sits inside the operator's network, next to the database, the
broker and, in a cloud, the instance metadata service. So a target must be a globally routable
address, or lie inside a network that the operator lists explicitly
(ROBUSTIFY_WEBHOOK_ALLOW_NETWORKS); an allow-list, never a deny-list of "private" ranges, because
the ranges that are not global are many and keep growing (100.64.0.0/10, site-local fec0::/10, ...).

IPv6 forms that carry an IPv4 address (IPv4-mapped ::ffff:a.b.c.d, IPv4-compatible ::a.b.c.d,
6to4 2002::/16, Teredo 2001::/32, NAT64 64:ff9b::/96) are judged by every address they carry.

Some targets are refused even inside an allowed network: the metadata services (169.254.0.0/16 and
the providers' others) and the service's own database and broker ports.
"""
from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# What ROBUSTIFY_WEBHOOK_ALLOW_PRIVATE=1 (the older, coarser switch) stands for: the RFC 1918
# ranges, loopback and IPv6 unique-local addresses. Metadata and the service's ports stay refused.
PRIVATE_NETWORKS: tuple[str, ...] = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "127.0.0.0/8", "::1/128",
                                     "fc00::/7")

# Never a webhook target, whatever the allow-list says.
NEVER_NETWORKS: tuple[IPNetwork, ...] = tuple(ipaddress.ip_network(n) for n in (
    "169.254.0.0/16",      # link-local, with the AWS/GCP/Azure metadata service at 169.254.169.254
    "fe80::/10",           # IPv6 link-local
    "fd00:ec2::254/128",   # AWS metadata over IPv6
    "100.100.100.200/32",  # Alibaba Cloud metadata
    "0.0.0.0/8", "::/128",  # "this host"
    "224.0.0.0/4", "ff00::/8",  # multicast
    "255.255.255.255/32",
))
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def carried_addresses(ip: IPAddress) -> list[IPAddress]:
    """`ip` and every IPv4 address it embeds (mapped, compatible, 6to4, Teredo, NAT64)."""
    out: list[IPAddress] = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            out.append(ip.ipv4_mapped)
        if ip.sixtofour is not None:
            out.append(ip.sixtofour)
        if ip.teredo is not None:
            out.extend(ip.teredo)
        if ip in _NAT64:
            out.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        elif int(ip) >> 32 == 0 and int(ip) > 1:  # IPv4-compatible ::a.b.c.d (deprecated, still routed by some stacks)
            out.append(ipaddress.IPv4Address(int(ip)))
    return out


def _is_global(ip: IPAddress) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:  # fec0::/10: deprecated, not global
        return False
    return ip.is_global and not ip.is_multicast


def parse_networks(spec: str | Iterable[str]) -> tuple[IPNetwork, ...]:
    """Networks from a comma-separated string or a list; a ValueError names a bad entry."""
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec)]
    nets: list[IPNetwork] = []
    for item in filter(None, items):
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not a network (write it as an address or CIDR, e.g. 10.0.0.0/8)") from None
    return tuple(nets)


@dataclass(frozen=True)
class TargetPolicy:
    """The operator's allow-list plus the (address, port) pairs of the service's own database and broker."""

    allowed: tuple[IPNetwork, ...] = ()
    protected: frozenset[tuple[IPAddress, int]] = field(default_factory=frozenset)
    protected_ports: frozenset[int] = frozenset()

    def problem(self, ip: IPAddress, port: int) -> str | None:
        """Why `ip:port` must not receive a webhook, or None when it may."""
        addresses = carried_addresses(ip)
        for a in addresses:
            if any(a in net for net in NEVER_NETWORKS):
                return f"{ip} is a link-local, metadata, multicast or unspecified address, never a webhook target"
        for a in addresses:
            if (a, port) in self.protected or (a.is_loopback and port in self.protected_ports):
                return f"{ip}:{port} is this service's own database or broker"
        for a in addresses:
            if not (_is_global(a) or any(a in net for net in self.allowed)):
                return (f"{ip} is not a globally routable address (loopback, private, shared or reserved) and is "
                        "outside ROBUSTIFY_WEBHOOK_ALLOW_NETWORKS")
        return None


def _endpoints(url: str, default_port: int) -> set[tuple[IPAddress, int]]:
    """The (address, port) pairs a database or broker URL points at; none for a file-backed one."""
    parts = urlsplit(url)
    if not parts.hostname:
        return set()
    try:
        port = parts.port or default_port
        infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError, ValueError):
        return set()
    return {(ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]), port) for info in infos}


@lru_cache(maxsize=8)
def target_policy(allow_networks: str, allow_private: bool, database_url: str, broker_url: str) -> TargetPolicy:
    """The policy that the settings describe (cached: the database and broker hosts are resolved once)."""
    allowed = parse_networks(allow_networks) + (parse_networks(PRIVATE_NETWORKS) if allow_private else ())
    protected = _endpoints(database_url, 5432) | _endpoints(broker_url, 6379)
    return TargetPolicy(allowed=allowed, protected=frozenset(protected),
                        protected_ports=frozenset(port for _, port in protected))
