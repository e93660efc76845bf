"""SPIFFE ID parsing, identity matching and the renewal schedule (meshcore.identity)."""

from __future__ import annotations

import pytest

from meshcore.identity import (
    SpiffeId, is_spiffe_id, match_identity, parse_spiffe_id, parse_trust_domain, renew_at, should_renew,
)
from meshcore.labels import spiffe_id

WEB = "spiffe://mesh.local/ns/shop/sa/web"
DB = "spiffe://mesh.local/ns/shop/sa/db"


@pytest.mark.parametrize("text, trust_domain, path", [
    ("spiffe://mesh.local/ns/shop/sa/web", "mesh.local", "/ns/shop/sa/web"),
    ("spiffe://mesh.local", "mesh.local", ""),
    ("spiffe://example.org/a", "example.org", "/a"),
    ("spiffe://my_td-1.example/A.b-c_D/0", "my_td-1.example", "/A.b-c_D/0"),
    ("spiffe://mesh.local/ns/my_project/sa/web", "mesh.local", "/ns/my_project/sa/web"),
    ("spiffe://td/...", "td", "/..."),  # "..." is an ordinary segment, only "." and ".." are not
])
def test_parse_valid(text, trust_domain, path):
    sid = parse_spiffe_id(text)
    assert sid == SpiffeId(trust_domain, path)
    assert str(sid) == text
    assert is_spiffe_id(text)


@pytest.mark.parametrize("text, problem", [
    ("", "empty"),
    ("http://mesh.local/ns/a/sa/b", "must start with"),
    ("SPIFFE://mesh.local/a", "lowercase"),
    ("spiffe:/mesh.local/a", "must start with"),
    ("spiffe://", "empty trust domain"),
    ("spiffe:///a", "empty trust domain"),
    ("spiffe://Mesh.Local/a", "invalid characters"),
    ("spiffe://mesh.local:8080/a", "port"),
    ("spiffe://user@mesh.local/a", "user info"),
    ("spiffe://mesh.local/", "must not end with '/'"),
    ("spiffe://mesh.local/a/", "empty segment"),
    ("spiffe://mesh.local//a", "empty segment"),
    ("spiffe://mesh.local/a/./b", "'.' segment"),
    ("spiffe://mesh.local/a/../b", "'..' segment"),
    ("spiffe://mesh.local/a b", "invalid characters"),
    ("spiffe://mesh.local/a%2Fb", "percent"),
    ("spiffe://mesh.local/a?x=1", "query"),
    ("spiffe://mesh.local/a#frag", "fragment"),
    ("spiffe://mesh.local/caf\u00e9", "invalid characters"),
    ("spiffe://" + "a" * 256, "longer than 255"),
    ("spiffe://td/" + "a" * 2048, "longer than 2048"),
])
def test_parse_invalid_names_the_problem(text, problem):
    with pytest.raises(ValueError, match=problem.replace("(", r"\(").replace("?", r"\?")):
        parse_spiffe_id(text)
    assert not is_spiffe_id(text)


def test_parse_rejects_non_strings():
    with pytest.raises(ValueError):
        parse_spiffe_id(None)  # type: ignore[arg-type]


def test_mesh_layout_fields_and_labels_agree():
    sid = parse_spiffe_id(spiffe_id("mesh.local", "shop", "web"))
    assert (sid.namespace, sid.service, sid.segments) == ("shop", "web", ("ns", "shop", "sa", "web"))
    other = parse_spiffe_id("spiffe://mesh.local/custom/path")
    assert (other.namespace, other.service) == (None, None)


def test_parse_trust_domain():
    assert parse_trust_domain("mesh.local") == "mesh.local"
    with pytest.raises(ValueError, match="invalid characters"):
        parse_trust_domain("Mesh.Local")


@pytest.mark.parametrize("peer_uris, allowed, expected", [
    ([WEB], {WEB}, WEB),
    ([WEB], {DB}, None),
    ([WEB], set(), None),
    ([], {WEB}, None),
    ([WEB, DB], {WEB, DB}, None),                         # two SPIFFE IDs: ambiguous, refused
    (["https://example.com/x", WEB], {WEB}, WEB),          # other URI schemes are ignored
    (["spiffe://mesh.local/ns/shop/sa/web/"], {"spiffe://mesh.local/ns/shop/sa/web/"}, None),  # invalid
    (["spiffe://mesh.local/ns/shop/sa/WEB"], {WEB}, None),  # case-sensitive path
    ([WEB], {"spiffe://mesh.local/ns/shop/*"}, WEB),        # segment-prefix pattern
    ([WEB], {"spiffe://mesh.local/ns/sho/*"}, None),        # patterns match whole segments
    (["spiffe://mesh.local/ns/shop"], {"spiffe://mesh.local/ns/shop/*"}, None),
    ([WEB], {"spiffe://*"}, None),                          # not a valid pattern: matches nothing
    (["spiffe://other.td/ns/shop/sa/web"], {WEB}, None),    # other trust domain
    ([WEB], [WEB], WEB),                                    # any collection works
])
def test_match_identity(peer_uris, allowed, expected):
    assert match_identity(peer_uris, allowed) == expected


NB, NA = 1_000.0, 2_000.0  # a certificate valid for 1000 s


@pytest.mark.parametrize("rand, share, jitter, expected", [
    (0.5, 0.5, 0.1, 1_500.0),   # no jitter at rand 0.5: half the lifetime
    (0.0, 0.5, 0.1, 1_400.0),   # -10 % of the lifetime
    (1.0, 0.5, 0.1, 1_600.0),   # +10 %
    (0.25, 0.5, 0.1, 1_450.0),
    (0.5, 0.8, 0.0, 1_800.0),
    (1.0, 0.95, 0.2, 2_000.0),  # clamped: never after expiry
    (0.0, 0.05, 0.2, 1_000.0),  # clamped: never before not_before
    (0.0, 0.0, 0.0, 1_000.0),
    (1.0, 1.0, 0.0, 2_000.0),
])
def test_renew_at_table(rand, share, jitter, expected):
    assert renew_at(NB, NA, rand, share, jitter) == pytest.approx(expected)


def test_renew_at_spreads_over_the_jitter_window():
    times = [renew_at(NB, NA, i / 100) for i in range(101)]
    assert times == sorted(times)
    assert min(times) == pytest.approx(1_400.0) and max(times) == pytest.approx(1_600.0)
    assert all(NB <= t <= NA for t in times)


@pytest.mark.parametrize("args, problem", [
    ((2_000.0, 1_000.0, 0.5), "later than"),
    ((1_000.0, 1_000.0, 0.5), "later than"),
    ((NB, NA, 1.5), "rand"),
    ((NB, NA, -0.1), "rand"),
    ((NB, NA, float("nan")), "finite"),
    ((NB, float("inf"), 0.5), "finite"),
])
def test_renew_at_rejects_bad_input(args, problem):
    with pytest.raises(ValueError, match=problem):
        renew_at(*args)


@pytest.mark.parametrize("kwargs, problem", [
    ({"share": 1.5}, "share"), ({"share": -0.1}, "share"), ({"jitter": -0.1}, "jitter"),
])
def test_renew_at_rejects_bad_policy(kwargs, problem):
    with pytest.raises(ValueError, match=problem):
        renew_at(NB, NA, 0.5, **kwargs)


@pytest.mark.parametrize("now, rand, expected", [
    (1_000.0, 0.5, False),   # just issued
    (1_499.9, 0.5, False),
    (1_500.0, 0.5, True),    # at the renewal point
    (1_399.0, 0.0, False),
    (1_400.0, 0.0, True),    # early draw
    (1_599.0, 1.0, False),   # late draw
    (2_500.0, 1.0, True),    # expired: certainly renew
    (500.0, 0.5, False),     # clock behind not_before
])
def test_should_renew(now, rand, expected):
    assert should_renew(now, NB, NA, rand) is expected
