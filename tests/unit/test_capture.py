"""sidecar.capture.build_capture_rules: the iptables-restore script of transparent capture."""

from __future__ import annotations

import pytest

from sidecar.capture import IN_CHAIN, OUT_CHAIN, PROXY_UID, build_capture_rules


def lines(script: str) -> list[str]:
    return [ln for ln in script.splitlines() if ln and not ln.startswith("#")]


def chain_rules(script: str, chain: str) -> list[str]:
    return [ln for ln in lines(script) if ln.startswith(f"-A {chain} ")]


def test_script_shape():
    script = build_capture_rules(8080)
    ls = lines(script)
    assert ls[0] == "*nat"
    assert ls[-1] == "COMMIT"
    assert ls.count("COMMIT") == 1
    assert script.endswith("\n")   # iptables-restore wants the last line terminated
    assert f":{OUT_CHAIN} - [0:0]" in ls and f":{IN_CHAIN} - [0:0]" in ls
    # the chain declarations come before any rule
    first_rule = next(i for i, ln in enumerate(ls) if ln.startswith("-A"))
    assert all(not ln.startswith(":") for ln in ls[first_rule:])


def test_outbound_order_uid_and_loopback_before_redirect():
    rules = chain_rules(build_capture_rules(8080), OUT_CHAIN)
    uid = rules.index(f"-A {OUT_CHAIN} -m owner --uid-owner 1337 -j RETURN")
    loopback = rules.index(f"-A {OUT_CHAIN} -d 127.0.0.0/8 -j RETURN")
    redirect = rules.index(f"-A {OUT_CHAIN} -p tcp -j REDIRECT --to-ports 15001")
    assert uid < redirect and loopback < redirect
    assert redirect == len(rules) - 1
    assert PROXY_UID == 1337


def test_output_jumps_to_mesh_chain():
    assert "-A OUTPUT -p tcp -j MESH_OUTPUT" in lines(build_capture_rules(8080))


@pytest.mark.parametrize("port", [80, 8080, 5432])
def test_app_port_redirected_to_inbound(port):
    ls = lines(build_capture_rules(port))
    assert f"-A PREROUTING -p tcp -j {IN_CHAIN}" in ls
    assert chain_rules("\n".join(ls), IN_CHAIN) == [
        f"-A {IN_CHAIN} -p tcp --dport {port} -j REDIRECT --to-ports 15006"]
    # nothing of the inbound side sends to the outbound listener or vice versa
    assert not any("15006" in ln for ln in chain_rules("\n".join(ls), OUT_CHAIN))


def test_custom_proxy_uid():
    rules = chain_rules(build_capture_rules(8080, proxy_uid=2000), OUT_CHAIN)
    assert rules[0] == f"-A {OUT_CHAIN} -m owner --uid-owner 2000 -j RETURN"
    assert not any("1337" in r for r in rules)


def test_excluded_outbound_ports_return_before_redirect():
    rules = chain_rules(build_capture_rules(8080, exclude_outbound_ports=(5432, 6379)), OUT_CHAIN)
    redirect = rules.index(f"-A {OUT_CHAIN} -p tcp -j REDIRECT --to-ports 15001")
    for port in (5432, 6379):
        assert rules.index(f"-A {OUT_CHAIN} -p tcp --dport {port} -j RETURN") < redirect
    assert len(chain_rules(build_capture_rules(8080), OUT_CHAIN)) == len(rules) - 2


# ---- DNS capture ---------------------------------------------------------------------------------

def test_dns_queries_to_dockers_resolver_go_to_the_dns_proxy():
    from sidecar.capture import DNS_CHAIN
    ls = lines(build_capture_rules(8080))
    assert f":{DNS_CHAIN} - [0:0]" in ls
    # Inserted at the top of OUTPUT: Docker's `-A OUTPUT -d 127.0.0.11/32 -j DOCKER_OUTPUT` DNAT is
    # already there (we restore with --noflush) and would take the query first.
    assert f"-I OUTPUT 1 -d 127.0.0.11/32 -j {DNS_CHAIN}" in ls
    assert not any(ln.startswith("-A OUTPUT") and DNS_CHAIN in ln for ln in ls)
    assert chain_rules("\n".join(ls), DNS_CHAIN) == [
        f"-A {DNS_CHAIN} -m owner --uid-owner 1337 -j RETURN",   # the sidecar's forwarded queries pass
        f"-A {DNS_CHAIN} -p udp --dport 53 -j REDIRECT --to-ports 15053",
        f"-A {DNS_CHAIN} -p tcp --dport 53 -j REDIRECT --to-ports 15053",
    ]


def test_dns_capture_follows_the_proxy_uid_and_port_and_can_be_off():
    from sidecar.capture import DNS_CHAIN
    script = build_capture_rules(8080, proxy_uid=2000, dns_port=5353)
    assert chain_rules(script, DNS_CHAIN)[0] == f"-A {DNS_CHAIN} -m owner --uid-owner 2000 -j RETURN"
    assert all(r.endswith("--to-ports 5353") for r in chain_rules(script, DNS_CHAIN)[1:])
    off = build_capture_rules(8080, dns_port=None)
    assert DNS_CHAIN not in off and "127.0.0.11" not in off
    assert chain_rules(off, OUT_CHAIN) == chain_rules(build_capture_rules(8080), OUT_CHAIN)


def test_ipv6_rules_reject_the_app_port_from_all_but_loopback():
    from sidecar.capture import IN6_CHAIN, build_ipv6_rules

    ls = lines(build_ipv6_rules(8080))
    assert ls[0] == "*filter" and ls[-1] == "COMMIT" and f":{IN6_CHAIN} - [0:0]" in ls
    assert f"-A INPUT -p tcp -j {IN6_CHAIN}" in ls
    assert chain_rules("\n".join(ls), IN6_CHAIN) == [
        f"-A {IN6_CHAIN} -i lo -j RETURN",
        f"-A {IN6_CHAIN} -p tcp --dport 8080 -j REJECT --reject-with tcp-reset"]
    assert build_ipv6_rules(80).endswith("\n")


@pytest.mark.parametrize("text, expected", [
    ("", []),
    ("00000000000000000000000000000001 01 80 10 80       lo\n", []),
    ("00000000000000000000000000000001 01 80 10 80       lo\n"
     "fd6d6573686200000000000000000002 2f 40 00 80     eth0\n"
     "fe800000000000000042acfffe120002 2f 40 20 80     eth0\n"
     "fe800000000000000042acfffe130002 30 40 20 80     eth1\n", ["eth0", "eth1"]),
    ("garbage\n", []),
])
def test_ipv6_interfaces_of_proc_net_if_inet6(text, expected):
    from sidecar.capture import ipv6_interfaces

    assert ipv6_interfaces(text) == expected
