"""The README a learner follows: short, every link and figure there, the Chinese README in step
with it, and no placeholder left. Reads files only: no network, no model, well under a second.

- README.md stays at most 12 KiB; the long material lives in docs/*.md.
- Every relative link and image in README.md, README.zh-CN.md and docs/*.md points to a file
  that exists (and, for `file.md#anchor`, to a heading of that file).
- README.md links to README.zh-CN.md, which must exist and link back.
- Every command in README.md's ```bash blocks appears, as a whole line, in a code block of
  README.zh-CN.md (comments after `#` may be translated, the command may not).
- No ⟪TBD ...⟫ marker is left for a reader to find.
"""
import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
README_ZH = os.path.join(ROOT, "README.zh-CN.md")
DOCS = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
MAX_README_BYTES = 12 * 1024
MARKER = "\u27eaTBD"                                   # "⟪TBD"

FENCE = re.compile(r"^(```|~~~)([^\n]*)\n(.*?)^\1[ \t]*$", re.M | re.S)       # group 2: info string, 3: body
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")   # [text](target "title")
REF_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.M)
HTML_SRC = re.compile(r"<(?:img|a|source)\b[^>]*?\b(?:src|href)\s*=\s*[\"']([^\"']+)[\"']", re.I)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")    # http:, https:, mailto:, ...


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def rel(path):
    return os.path.relpath(path, ROOT)


def prose(text):
    """The text without fenced code blocks and inline code, where [x](y) is not a link."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def link_targets(text):
    body = prose(text)
    return LINK.findall(body) + REF_LINK.findall(body) + HTML_SRC.findall(body)


def heading_anchors(text):
    """GitHub's anchors for the headings of a markdown file: lower case, punctuation dropped,
    spaces to hyphens; a repeated heading gets -1, -2, ..."""
    anchors, seen = set(), {}
    for line in FENCE.sub("", text).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def command_lines(text, lang=None):
    """Lines of the fenced code blocks (only those whose info string is `lang`, if given), with a
    trailing `# comment` and surrounding blanks removed; empty and comment-only lines skipped."""
    commands = []
    for m in FENCE.finditer(text):
        if lang is not None and m.group(2).strip().split(" ")[0] != lang:
            continue
        for line in m.group(3).splitlines():
            command = re.split(r"(?:^|\s)#", line, maxsplit=1)[0].strip()
            if command:
                commands.append(command)
    return commands


def pages():
    return [README] + ([README_ZH] if os.path.exists(README_ZH) else []) + DOCS


# ----- the tests -----

def test_readme_is_short():
    size = os.path.getsize(README)
    assert size <= MAX_README_BYTES, (f"README.md is {size:,} bytes, over {MAX_README_BYTES:,}: "
                                      "move a section into docs/ and link it")


def test_docs_exist_and_readme_links_every_one():
    assert DOCS, "docs/*.md: none found"
    linked = {os.path.normpath(os.path.join(ROOT, t.split("#")[0])) for t in link_targets(read(README))}
    unlinked = [rel(d) for d in DOCS if os.path.normpath(d) not in linked]
    assert not unlinked, f"README.md does not link {unlinked}"


@pytest.mark.parametrize("page", pages(), ids=rel)
def test_relative_links_and_images_exist(page):
    text, folder, broken = read(page), os.path.dirname(page), []
    for target in link_targets(text):
        if SCHEME.match(target):
            continue                                     # the web: not checked offline
        path, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(folder, path)) if path else page
        if not os.path.exists(dest):
            broken.append(f"{target} (no file {rel(dest)})")
        elif anchor and dest.endswith(".md") and anchor not in heading_anchors(read(dest)):
            broken.append(f"{target} (no heading #{anchor} in {rel(dest)})")
    assert not broken, f"{rel(page)}: broken links: {broken}"


def test_readme_and_chinese_readme_link_each_other():
    assert "README.zh-CN.md" in [t.split("#")[0] for t in link_targets(read(README))], \
        "README.md has no link to README.zh-CN.md"
    assert os.path.exists(README_ZH), "README.zh-CN.md is missing (the Chinese README, linked from README.md)"
    assert "README.md" in [t.split("#")[0] for t in link_targets(read(README_ZH))], \
        "README.zh-CN.md has no link back to README.md"


def test_every_readme_command_is_in_the_chinese_readme():
    commands = command_lines(read(README), lang="bash")
    assert commands, "README.md: no ```bash commands found (the quick start?)"
    assert os.path.exists(README_ZH), "README.zh-CN.md is missing"
    zh = set(command_lines(read(README_ZH)))
    missing = [c for c in commands if c not in zh]
    assert not missing, f"README.zh-CN.md lacks these commands of README.md (as whole lines in code blocks): {missing}"


def test_quick_start_commands_are_the_promised_ones():
    commands = command_lines(read(README), lang="bash")
    for c in ("pip install -r requirements.txt && python train.py && python sample.py --label 7",
              "pip install -r requirements.txt && python -m pytest -q tests"):
        assert c in commands, f"README.md: quick-start command missing: {c}"


@pytest.mark.parametrize("page", [README, README_ZH] + DOCS, ids=rel)
def test_no_placeholder_left(page):
    if not os.path.exists(page):
        pytest.fail(f"{rel(page)} is missing")
    left = [f"{rel(page)}:{i}: {line.strip()}" for i, line in enumerate(read(page).splitlines(), 1)
            if MARKER in line]
    assert not left, "placeholders still to fill in:\n" + "\n".join(left)


# ----- the helpers above, on known input (so a test that cannot fail is caught here) -----

def test_helpers_on_known_markdown():
    text = ("# Top\n## `python train.py`\n## Top\nSee [a](docs/x.md#top-1) and ![b](docs/y.png \"t\"),"
            " `[not](a-link)`, <img src='z.gif'> and [w](https://example.com).\n[ref]: r.md\n"
            "```bash\npython a.py --x 1   # comment\n# only a comment\n\n```\n"
            "```\n[code](not-a-link)\n```\n")
    assert sorted(link_targets(text)) == sorted(["docs/x.md#top-1", "docs/y.png", "z.gif", "https://example.com",
                                                 "r.md"])
    assert heading_anchors(text) == {"top", "python-trainpy", "top-1"}
    assert command_lines(text, lang="bash") == ["python a.py --x 1"]
    assert command_lines(text) == ["python a.py --x 1", "[code](not-a-link)"]
