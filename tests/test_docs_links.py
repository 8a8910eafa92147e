"""Every relative link in the repository's markdown reaches a file, and every #anchor a heading of it.

Results tables and notes link to each other by section; a moved or renamed section must not leave a reader at a
dead link. Anchors follow GitHub's rule (lower case, punctuation dropped, spaces to hyphens, -1, -2 for repeats).
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
# [text](target) outside code; images too. Targets with a scheme (http:, mailto:) are not checked here.
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_FENCE = re.compile(r"^\s*(```|~~~)")
_CODE_SPAN = re.compile(r"`[^`]*`")


def _markdown_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "*.md"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout.split()
    return [ROOT / p for p in out if (ROOT / p).is_file()]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading anchors on its text
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def _prose_lines(path: Path) -> list[str]:
    lines, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        fence = bool(_FENCE.match(line))
        fenced ^= fence
        lines.append("" if fenced or fence else line)
    return lines


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for line in _prose_lines(path):
        m = _HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def broken_links(files: list[Path]) -> list[str]:
    cache: dict[Path, set[str]] = {}
    problems = []
    for path in files:
        for number, line in enumerate(_prose_lines(path), 1):
            for target in _LINK.findall(_CODE_SPAN.sub("", line)):
                if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):
                    continue
                file_part, _, anchor = target.partition("#")
                dest = (path.parent / file_part).resolve() if file_part else path
                where = f"{path.relative_to(ROOT)}:{number}: {target}"
                if not dest.exists():
                    problems.append(f"{where} (no such file)")
                elif anchor and dest.suffix == ".md":
                    if dest not in cache:
                        cache[dest] = anchors(dest)
                    if anchor not in cache[dest]:
                        problems.append(f"{where} (no heading with that anchor)")
    return problems


def test_slugs_follow_githubs_rule():
    assert slug("Real-time evaluation: `so101-eval-realtime` (`make eval-realtime`)") == \
        "real-time-evaluation-so101-eval-realtime-make-eval-realtime"
    assert slug("Coherent sampling (`--candidates`)") == "coherent-sampling---candidates"
    assert slug("Ablations: the paper's Tables I-IV") == "ablations-the-papers-tables-i-iv"


def test_the_checker_finds_a_dead_file_and_a_dead_anchor(tmp_path):
    (tmp_path / "a.md").write_text("# Top\n\n## Part two\n\n[ok](#part-two) [ok](b.md#b) [x](#gone)\n"
                                   "```\n[not a link](nowhere.md)\n```\n[x](c.md) `[code](nowhere.md)`\n")
    (tmp_path / "b.md").write_text("# B\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        problems = broken_links([tmp_path / "a.md"])
    finally:
        ROOT = saved
    assert problems == ["a.md:5: #gone (no heading with that anchor)", "a.md:9: c.md (no such file)"]


def test_links_reach_their_files_and_sections():
    files = _markdown_files()
    assert len(files) > 20  # the README, docs/ and the packages' READMEs
    assert broken_links(files) == []
