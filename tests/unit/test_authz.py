"""Table of authorization decisions (meshcore.authz): deny wins, then allow rules, mesh.allow, default."""

from __future__ import annotations

import pytest

from meshcore.authz import (
    Policy, PolicyError, add_rule, decide, decode_allow_label, decode_policy, encode_policy, make_rule,
    remove_rules, source_name,
)

R = make_rule
DENY_OP = R("deny", "orders", "payments")
ALLOW_OP = R("allow", "orders", "payments")
DENY_ADMIN = R("deny", "*", "payments", "/admin")
ALLOW_POST_PAY = R("allow", "orders", "payments", "/pay", "post")


@pytest.mark.parametrize("policy, source, dest, method, path, label, allowed, reason", [
    (Policy(), "orders", "payments", "GET", "/", None, True, "default allow"),
    (Policy(default="deny"), "orders", "payments", "GET", "/", None, False, "default deny"),
    (Policy(rules=(DENY_OP,)), "orders", "payments", "GET", "/", None, False, "rule deny orders -> payments"),
    (Policy(rules=(DENY_OP,)), "users", "payments", "GET", "/", None, True, "default allow"),
    # explicit deny wins over an allow rule, whatever their order
    (Policy(rules=(ALLOW_OP, DENY_OP)), "orders", "payments", "GET", "/", None, False, "rule deny orders -> payments"),
    # allow rules beat the mesh.allow label and the default
    (Policy(default="deny", rules=(ALLOW_OP,)), "orders", "payments", "GET", "/", ("users",), True,
     "rule allow orders -> payments"),
    # the label: listed callers in, others out, whatever the default
    (Policy(), "orders", "payments", "GET", "/", ("orders", "gateway"), True, "mesh.allow of payments"),
    (Policy(), "users", "payments", "GET", "/", ("orders",), False, "users not in mesh.allow of payments"),
    (Policy(default="deny"), "gateway", "payments", "GET", "/", ("gateway",), True, "mesh.allow of payments"),
    # unauthenticated callers (permissive plaintext) match only `*` rules and never a label
    (Policy(), None, "payments", "GET", "/", ("orders",), False, "unauthenticated caller not in mesh.allow of payments"),
    (Policy(), None, "payments", "GET", "/", None, True, "default allow"),
    (Policy(rules=(DENY_OP,)), None, "payments", "GET", "/", None, True, "default allow"),
    (Policy(rules=(DENY_ADMIN,)), None, "payments", "GET", "/admin/x", None, False, "rule deny * -> payments /admin*"),
    # path prefix and method
    (Policy(rules=(DENY_ADMIN,)), "orders", "payments", "GET", "/adminx", None, False, "rule deny * -> payments /admin*"),
    (Policy(rules=(DENY_ADMIN,)), "orders", "payments", "GET", "/pay", None, True, "default allow"),
    (Policy(default="deny", rules=(ALLOW_POST_PAY,)), "orders", "payments", "POST", "/pay", None, True,
     "rule allow orders -> payments POST /pay*"),
    (Policy(default="deny", rules=(ALLOW_POST_PAY,)), "orders", "payments", "GET", "/pay", None, False, "default deny"),
    (Policy(default="deny", rules=(R("allow", "orders", "*"),)), "orders", "users", "GET", "/", None, True,
     "rule allow orders -> *"),
])
def test_decide(policy, source, dest, method, path, label, allowed, reason):
    d = decide(policy, source, dest, method, path, label)
    assert (d.allowed, d.reason) == (allowed, reason)


@pytest.mark.parametrize("args, fragment", [
    (("permit", "a", "b"), "action"),
    (("allow", "A", "b"), "source"),
    (("allow", "a", "b c"), "destination"),
    (("allow", "a", "b", "admin"), "path"),
    (("allow", "a", "b", "/x?y"), "path"),
    (("allow", "a", "b", None, "GE T"), "method"),
])
def test_bad_rules_name_the_field(args, fragment):
    with pytest.raises(PolicyError, match=fragment):
        make_rule(*args)


def test_wire_form_round_trip_and_strict_decoding():
    policy = Policy(default="deny", rules=(DENY_OP, ALLOW_POST_PAY))
    assert decode_policy(encode_policy(policy)) == policy
    for bad, fragment in [
        ([], "expected an object"), ({"default": "maybe", "rules": []}, "policies.default"),
        ({"default": "allow"}, "policies.rules"), ({"default": "allow", "rules": [1]}, "rules[0]"),
        ({"default": "allow", "rules": [], "x": 1}, "unknown field"),
        ({"default": "allow", "rules": [{"action": "allow", "source": "a", "destination": "b", "extra": 1}]},
         "unknown field 'extra'"),
        ({"default": "allow", "rules": [{"action": "allow", "source": "a"}]}, "rules[0].destination"),
    ]:
        with pytest.raises(PolicyError) as exc:
            decode_policy(bad)
        assert fragment in str(exc.value)


def test_add_replaces_the_opposite_action_and_remove():
    p = add_rule(Policy(), DENY_OP)
    p = add_rule(p, ALLOW_OP)
    assert p.rules == (ALLOW_OP,)              # `allow` after `deny` restores access
    assert add_rule(p, ALLOW_OP).rules == (ALLOW_OP,)
    p2, n = remove_rules(p, "orders", "payments")
    assert n == 1 and p2.rules == ()
    assert remove_rules(p, "users", "payments")[1] == 0


def test_allow_label_and_source_names():
    assert decode_allow_label(" orders, gateway ,orders") == ("gateway", "orders")
    with pytest.raises(PolicyError):
        decode_allow_label(" , ")
    assert source_name("spiffe://mesh.local/ns/shop/sa/orders") == "orders"
    assert source_name("spiffe://mesh.local/ns/mesh-system/sa/gateway") == "gateway"
    assert source_name("spiffe://mesh.local/other") is None
    assert source_name(None) is None
