"""The webhook target policy: an allow-list of networks, with metadata and the service's own
database and broker refused whatever the list says (issue: SSRF gaps)."""
import ipaddress

import pytest

from core.service.netpolicy import PRIVATE_NETWORKS, TargetPolicy, carried_addresses, parse_networks

ip = ipaddress.ip_address


@pytest.mark.parametrize("address", [
    "100.100.100.200", "::ffff:100.100.100.200",   # cloud metadata in 100.64.0.0/10, plain and IPv4-mapped
    "fec0::1",                                     # site-local
    "2002:7f00:1::",                               # 6to4 around 127.0.0.1
    "64:ff9b::7f00:1",                             # NAT64 around 127.0.0.1
    "::7f00:1",                                    # IPv4-compatible 127.0.0.1
    "2001:0:4136:e378:8000:63bf:3fff:fdd2",        # Teredo (carries 192.0.2.45, documentation range)
    "169.254.169.254", "127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "::1", "fd00::1",
    "100.64.0.1", "0.0.0.0", "224.0.0.1", "198.18.0.1",
])
def test_every_address_that_is_not_global_is_refused_by_default(address):
    assert TargetPolicy().problem(ip(address), 443) is not None


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_global_addresses_are_allowed(address):
    assert TargetPolicy().problem(ip(address), 443) is None


def test_the_allow_list_opens_only_its_networks_and_never_metadata_or_the_service_ports():
    policy = TargetPolicy(allowed=parse_networks("10.0.0.0/8, 127.0.0.0/8"),
                          protected=frozenset({(ip("10.0.0.9"), 5432)}), protected_ports=frozenset({5432, 6379}))
    assert policy.problem(ip("10.2.3.4"), 8080) is None
    assert policy.problem(ip("127.0.0.1"), 8080) is None
    assert policy.problem(ip("192.168.1.1"), 8080) is not None          # not listed
    assert "database or broker" in policy.problem(ip("127.0.0.1"), 6379)
    assert "database or broker" in policy.problem(ip("10.0.0.9"), 5432)
    assert policy.problem(ip("10.0.0.9"), 80) is None                   # the same host, another port
    wide = TargetPolicy(allowed=parse_networks(["0.0.0.0/0", "::/0"]))
    assert "metadata" in wide.problem(ip("169.254.169.254"), 80)
    assert "metadata" in wide.problem(ip("100.100.100.200"), 80)
    assert "metadata" in wide.problem(ip("fd00:ec2::254"), 80)


def test_private_shorthand_and_bad_networks():
    nets = parse_networks(PRIVATE_NETWORKS)
    assert ipaddress.ip_network("fc00::/7") in nets and len(nets) == len(PRIVATE_NETWORKS)
    with pytest.raises(ValueError, match="not a network"):
        parse_networks("10.0.0.0/8,example.com")


def test_embedded_ipv4_addresses_are_found():
    assert ip("127.0.0.1") in carried_addresses(ip("2002:7f00:1::"))
    assert ip("100.100.100.200") in carried_addresses(ip("::ffff:100.100.100.200"))
    assert ip("127.0.0.1") in carried_addresses(ip("64:ff9b::7f00:1"))


def test_a_bad_allow_list_stops_the_settings_naming_the_entry():
    from pydantic import ValidationError

    from core.service.settings import Settings

    with pytest.raises(ValidationError, match="'foo' is not a network"):
        Settings(webhook_allow_networks="10.0.0.0/8,foo")
