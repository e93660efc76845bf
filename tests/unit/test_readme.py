"""README.md stays the user's document: short, no history, and every name it gives exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer

from meshcore.labels import KNOWN_LABELS
from meshcore.policy import POLICY_LABELS, UNLIMITED
from meshctl.cli import app as meshctl_app

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
MAX_LINES = 300

# A bare word of 7-40 hex digits with a digit and a letter in it: how git names a commit.
COMMIT_LIKE = re.compile(r"(?<![\w/.-])(?=[0-9a-f]*[0-9])(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}(?![\w/-])")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
MAKE_TARGET = re.compile(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", re.M)
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*$", re.M)


def _text() -> str:
    return README.read_text(encoding="utf-8")


def _code_snippets(text: str) -> list[str]:
    """Inline code spans and the lines of fenced code blocks: where commands are written."""
    snippets, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif fenced:
            snippets.append(line)
        else:
            snippets.extend(CODE_SPAN.findall(line))
    return snippets


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _words_after(snippet: str, command: str) -> list[list[str]]:
    """The words following each `command` in a snippet, up to a shell operator or comment; a
    table's escaped `\\|` between alternatives (`allow\\|deny`) becomes `,`."""
    found = []
    for match in re.finditer(rf"(?<![\w-]){command}\s+([^#&|;]*)", snippet.replace("\\|", ",")):
        found.append(match.group(1).split())
    return found


def test_readme_is_short():
    lines = _text().count("\n")
    assert lines < MAX_LINES, f"README.md has {lines} lines; keep it under {MAX_LINES}"


def test_readme_cites_no_commit():
    hashes = COMMIT_LIKE.findall(_text())
    assert not hashes, f"README.md names commits {hashes}: development history goes to docs/PERFORMANCE.md"


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.name)
def test_no_path_leaves_the_repository(path: Path):
    text = path.read_text(encoding="utf-8")
    for target in [*LINK.findall(text), *CODE_SPAN.findall(text)]:
        if "../" not in target or "://" in target:
            continue
        resolved = (path.parent / target.split("#")[0]).resolve()
        assert resolved.is_relative_to(ROOT), f"{path.name} points outside the repository: {target}"


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.name)
def test_relative_links_exist(path: Path):
    text = path.read_text(encoding="utf-8")
    anchors = {_anchor(h) for h in HEADING.findall(text)}
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target):
            continue
        file_part, _, fragment = target.partition("#")
        if file_part:
            assert (path.parent / file_part).exists(), f"{path.name} links to a missing {target}"
        elif fragment:
            assert fragment in anchors, f"{path.name} links to a missing heading #{fragment}"


def test_every_make_target_named_exists():
    targets = set(MAKE_TARGET.findall((ROOT / "Makefile").read_text(encoding="utf-8")))
    named = {word for snippet in _code_snippets(_text()) for words in _words_after(snippet, "make")
             for word in words[:1] if "=" not in word}
    assert named, "README.md names no make target: the regex no longer finds them"
    assert named <= targets, f"README.md names make targets the Makefile lacks: {sorted(named - targets)}"


def test_every_meshctl_command_and_option_named_exists():
    root = typer.main.get_command(meshctl_app)
    checked = 0
    for snippet in _code_snippets(_text()):
        for words in _words_after(snippet, "meshctl"):
            if not words or not re.fullmatch(r"[a-z][a-z-]*", words[0]):
                continue  # `docker exec meshd meshctl ...`
            cmd = root
            for word in words:
                names = word.split(",")
                sub = getattr(cmd, "commands", {})
                if not all(re.fullmatch(r"[a-z][a-z-]*", n) for n in names) or not set(names) & set(sub):
                    break
                assert set(names) <= set(sub), f"`meshctl ... {word}`: {cmd.name} has no {set(names) - set(sub)}"
                cmd = sub[names[0]]
            assert cmd is not root, f"`{snippet}`: no such meshctl command"
            options = {opt for param in cmd.params for opt in param.opts}
            for flag in re.findall(r"(?<![\w-])--[a-z][a-z-]*", " ".join(words)):
                assert flag in options, f"`{snippet}`: meshctl {cmd.name} has no {flag}"
            checked += 1
    assert checked >= 20, f"only {checked} meshctl commands found in README.md"


def _table_defaults(text: str) -> dict[str, str]:
    """label -> its default as README.md's label tables write it."""
    rows = re.findall(r"^\| `(mesh\.[^|]+?)` \| ([^|]+?) \|", text, re.M)
    defaults = {}
    for cell, default in rows:
        for label in re.findall(r"mesh\.[a-z0-9.-]+", cell):
            defaults[label] = default
    return defaults


def _plain(default: str) -> str:
    value = default.strip().strip("`").replace("2³²−1", str(UNLIMITED))
    return "-" if value == "—" else value


def test_label_tables_match_the_decoders():
    defaults = _table_defaults(_text())
    missing = (set(KNOWN_LABELS) | {name for name, _, _ in POLICY_LABELS}) - set(defaults)
    assert not missing, f"labels missing from README.md's tables: {sorted(missing)}"
    wrong = {name: (_plain(defaults[name]), default) for name, default, _ in POLICY_LABELS
             if _plain(defaults[name]) != default}
    assert not wrong, f"README.md's defaults differ from meshcore.policy.POLICY_LABELS: {wrong}"


def test_every_meshd_setting_is_documented():
    source = (ROOT / "meshd" / "app.py").read_text(encoding="utf-8")
    compose = (ROOT / "compose" / "meshd.yml").read_text(encoding="utf-8")
    names = set(re.findall(r"""env\.get\(["'](MESHD?_[A-Z_]+)["']""", source))
    names |= set(re.findall(r"^\s+(MESHD?_[A-Z_]+):", compose, re.M))
    assert len(names) >= 10, f"found only {sorted(names)}: the patterns no longer match"
    undocumented = {name for name in names if f"`{name}`" not in _text()}
    assert not undocumented, f"meshd settings missing from README.md: {sorted(undocumented)}"
