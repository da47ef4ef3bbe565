"""The documents (README.md, docs/*.md) against the repository: every relative link resolves to a file in it, no
document names a path outside it, and every table of benchmark figures equals the committed record it cites.

A table of figures is announced by an HTML comment naming its record, then the table:

    <!-- headline: results/bench_tiny/summary.json -->     (README.md: exactly one, the headline)
    <!-- figures: results/bench_tiny/summary.json -->      (any document)

Each column header must be one this module knows (COLUMNS); each cell must equal the record's value formatted as
that column formats it. Swapping the README's headline for another benchmark is the comment's path plus the
table this module prints for it:

    .venv/bin/python tests/test_docs.py results/bench_standard/summary.json
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
README_MAX_LINES = 250

LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_LINK = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']""")
FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.DOTALL | re.MULTILINE)
CODE_SPAN = re.compile(r"`[^`\n]*`")
URL = re.compile(r"\b(?:https?|mailto|ftp)://\S+|\bmailto:\S+")
# an absolute filesystem path: a slash that starts a token (not `a/b`, `~/x`, `</tag>` or a URL's `//`) followed by
# a name; `~/...` (a user's own directory, e.g. OPTBENCH_CONFIG_PATH's example) is allowed
ABSOLUTE = re.compile(r"(?<![\w.~/:<>\-\]\)\\*$^])/[A-Za-z_][\w.\-]*(?:/[\w.\-<>]*)*")
PARENT = re.compile(r"(?<![\w.])(?:\.\./)+[\w.\-/<>]*")
FORBIDDEN = ("../shared", "/work/")
TABLE_NOTE = re.compile(r"<!--\s*(headline|figures):\s*(\S+)\s*-->")


def documents(root: Path = REPO) -> list[Path]:
    """README.md and every docs/*.md (the other helpers' files included, whenever they exist)."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def slugs(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", text).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        s = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


def links(doc: Path) -> list[str]:
    """Every link target of a document outside code: Markdown links and images, HTML src/href."""
    text = CODE_SPAN.sub("", FENCE.sub("", doc.read_text()))
    return [m.group(1) for m in LINK.finditer(text)] + [m.group(1) for m in HTML_LINK.finditer(text)]


def ignored(root: Path, paths: list[Path]) -> set[Path]:
    """The paths git ignores (they exist here but not in a clone); empty outside a git checkout."""
    if not paths or not (root / ".git").exists():
        return set()
    rel = "\n".join(str(p.relative_to(root)) for p in paths)
    # exit 1 = nothing ignored, which is the good case: check=False, the listed paths are the answer
    proc = subprocess.run(["git", "-C", str(root), "check-ignore", "--stdin"], input=rel, capture_output=True,
                          text=True, check=False)
    return {root / line for line in proc.stdout.splitlines() if line}


def broken_links(root: Path = REPO) -> list[str]:
    """'doc: target (why)' for each relative link that does not resolve to a file of the repository."""
    bad, found = [], []
    for doc in documents(root):
        for target in links(doc):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http(s), mailto: not files
                continue
            path_part, _, anchor = target.partition("#")
            dest = (doc.parent / path_part).resolve() if path_part else doc
            where = f"{doc.relative_to(root)}: {target}"
            if not dest.is_relative_to(root.resolve()):
                bad.append(f"{where} (outside the repository)")
            elif not dest.exists():
                bad.append(f"{where} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in slugs(dest.read_text()):
                bad.append(f"{where} (no heading with anchor #{anchor})")
            else:
                found.append((where, dest))
    ignored_here = ignored(root.resolve(), [d for _, d in found])
    bad += [f"{where} (git-ignored: absent from a clone)" for where, d in found if d in ignored_here]
    return bad


def outside_paths(root: Path = REPO) -> list[str]:
    """'doc:line: text' for each path a document names outside the repository: the forbidden prefixes, an
    absolute filesystem path, or a ../ path that climbs out of the repository from the document's folder."""
    bad = []
    for doc in documents(root):
        for n, line in enumerate(doc.read_text().splitlines(), 1):
            where = f"{doc.relative_to(root)}:{n}"
            bad += [f"{where}: {s}" for s in FORBIDDEN if s in line]
            bare = URL.sub("", line)
            bad += [f"{where}: {m.group(0)}" for m in ABSOLUTE.finditer(bare)]
            for m in PARENT.finditer(bare):
                dest = (doc.parent / m.group(0)).resolve()
                if not dest.is_relative_to(root.resolve()):
                    bad.append(f"{where}: {m.group(0)}")
    return bad


# --- tables of figures ------------------------------------------------------------------------------------------

def _g2(x: float | None) -> str:
    return "-" if x is None else f"{x:.2g}"


def _loss(e: dict | None) -> str:
    """As the report's cell: a null median is +inf (at least half of the seeds diverged, docs/protocol.md 5.6), a
    null interval has fewer than 2 finite seeds."""
    if not e:
        return "-"
    lo, hi = ("-" if x is None else f"{x:.3f}" for x in e["ci"])
    return f"{'diverged' if e['median'] is None else format(e['median'], '.3f')} [{lo}, {hi}]"


def _diff(v: dict | None, is_ref: bool) -> str:
    if v is None:
        return "(reference)" if is_ref else "-"  # no test: fewer than 2 seeds finite in both arms
    if v["mean_diff"] is None or v["ci"][0] is None:
        return "undefined"
    return f"{v['mean_diff']:+.3f} [{v['ci'][0]:+.3f}, {v['ci'][1]:+.3f}]"


def _speedup(a: dict[str, Any], budgets: list[int]) -> str:
    """The full budget's data-equivalent speedup when interpolated, else the largest budget's that is, labelled."""
    full = a.get("data_equivalent_speedup")
    if not full or full.get("value") is None:
        return "-"
    if not full["extrapolated"]:
        return f"{full['value']:.2f}"
    by = a.get("data_equivalent_by_budget") or {}
    for b in sorted(budgets, reverse=True):
        x = by.get(str(b))
        if x and x["value"] is not None and not x["extrapolated"]:
            return f"{x['value']:.2f} at {b} steps"
    return f"{full['value']:.2f} (extrapolated)"


def _chosen(setting: dict | None) -> str:
    short = {"optimizer.lr": "lr", "optimizer.weight_decay": "wd"}
    if not setting:
        return "-"
    return ", ".join(f"{short.get(k, k.rsplit('.', 1)[-1])} {v:.2g}" for k, v in setting.items())


def columns(s: dict[str, Any]) -> dict[str, Callable[[str, dict], str]]:
    """Every column header a table of figures may use, with how it formats an arm of summary.json `s`."""
    ref, budgets = s["reference"], s["workload"]["budgets"]

    def vs(a: dict) -> dict | None:
        return a.get("vs_reference")

    return {
        "arm": lambda n, a: f"`{n}`",
        "variant of": lambda n, a: f"`{a['variant_of']}`" if a["variant_of"] else "-",
        "seeds": lambda n, a: str(a["n_seeds"]) + (f" ({k} diverged)" if (k := a.get("n_seeds_diverged")) else ""),
        "chosen": lambda n, a: _chosen(a["chosen"]),
        "end loss, median [95% CI of the mean]": lambda n, a: _loss(a["end_loss"]),
        f"paired diff vs `{ref}`, mean [95% CI]": lambda n, a: _diff(vs(a), n == ref),
        "paired diff vs its main arm, mean [95% CI]": lambda n, a: _diff(vs(a), False),
        "p one-sided / Holm": lambda n, a: "-" if vs(a) is None else f"{_g2(vs(a)['p'])} / {_g2(vs(a)['p_holm'])}",
        "Holm p": lambda n, a: "-" if vs(a) is None else _g2(vs(a)["p_holm"]),
        "detectable (80% power)": lambda n, a: "-" if vs(a) is None else _g2(vs(a)["mdd"]),
        "data-equivalent speedup": lambda n, a: _speedup(a, budgets),
        "step overhead": lambda n, a: "-" if a["step_overhead"] is None else f"{a['step_overhead']:.1%}",
        f"state / `{ref}`'s": lambda n, a: "-" if a["state_ratio"] is None else f"{a['state_ratio']:.2f}",
    }


def render(s: dict[str, Any], headers: list[str], arms: list[str]) -> list[str]:
    """The Markdown table of `arms` under `headers` (KeyError: a header this module does not know)."""
    cols = columns(s)
    rows = [[cols[h](a, s["arms"][a]) for h in headers] for a in arms]
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)] + ["| " + " | ".join(r) + " |"
                                                                              for r in rows]


def main_arms(s: dict[str, Any], record: Path | None = None) -> list[str]:
    """The main arms, reference first, in the declared order of the bench.json beside `record` (if any)."""
    names = [n for n, a in s["arms"].items() if not a["variant_of"]]
    bench = record.parent / "bench.json" if record else None
    order = json.loads(bench.read_text()).get("arm_order") or [] if bench and bench.is_file() else []
    return sorted(names, key=lambda n: (n != s["reference"], order.index(n) if n in order else len(order), n))


def tables(doc: Path) -> list[tuple[str, str, list[list[str]]]]:
    """(kind, record path, rows of cells, header first) for each announced table of figures in a document."""
    lines = doc.read_text().splitlines()
    out = []
    for i, line in enumerate(lines):
        m = TABLE_NOTE.search(line)
        if not m:
            continue
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        rows = []
        while j < len(lines) and lines[j].lstrip().startswith("|"):
            rows.append([c.strip() for c in lines[j].strip().strip("|").split("|")])
            j += 1
        out.append((m.group(1), m.group(2), [rows[0], *rows[2:]] if len(rows) > 2 else []))
    return out


def table_mismatches(root: Path = REPO) -> list[str]:
    bad = []
    for doc in documents(root):
        for kind, record, rows in tables(doc):
            where = f"{doc.relative_to(root)} ({kind}: {record})"
            if not rows:
                bad.append(f"{where}: no table follows the comment")
                continue
            s = json.loads((root / record).read_text())
            header, body = rows[0], rows[1:]
            unknown = [h for h in header if h not in columns(s)]
            if unknown or header[0] != "arm":
                bad.append(f"{where}: columns {unknown or header[:1]} are not checkable (known: {list(columns(s))})")
                continue
            arms = [r[0].strip("`") for r in body]
            mains = set(main_arms(s))
            variants = {n for n in s["arms"] if n not in mains}
            if set(arms) not in (mains, variants):
                bad.append(f"{where}: rows {arms} are neither every main arm {sorted(mains)} nor every variant "
                           f"{sorted(variants)} of the record")
                continue
            want = render(s, header, arms)[2:]
            for row, expected in zip(body, want):
                got = "| " + " | ".join(row) + " |"
                if got != expected:
                    bad.append(f"{where}:\n  document: {got}\n  record:   {expected}")
    return bad


# --- tests --------------------------------------------------------------------------------------------------------

def test_every_relative_link_resolves_to_a_file_of_the_repository():
    assert sum(len(links(d)) for d in documents()) >= 20, "the link scan found (almost) nothing: is it broken?"
    assert broken_links() == []


def test_no_document_names_a_path_outside_the_repository():
    assert outside_paths() == []


def test_the_readme_headline_equals_the_record_it_cites():
    notes = [t for t in tables(REPO / "README.md") if t[0] == "headline"]
    assert len(notes) == 1, "README.md needs exactly one <!-- headline: results/.../summary.json --> table"
    _, record, rows = notes[0]
    s = json.loads((REPO / record).read_text())
    assert [r[0].strip("`") for r in rows[1:]] == main_arms(s, REPO / record), "every main arm, declared order"
    assert any("diff" in h for h in rows[0]), "the headline's figure is each arm's paired difference"
    assert table_mismatches() == []


def test_every_table_of_figures_equals_its_record():
    assert sum(len(tables(d)) for d in documents()) >= 2
    assert table_mismatches() == []


def test_the_readme_is_short_and_points_into_every_document():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= README_MAX_LINES
    targets = {(REPO / t.partition("#")[0]).resolve() for t in links(REPO / "README.md")}
    missing = [str(d.relative_to(REPO)) for d in documents()[1:] if d.resolve() not in targets]
    assert missing == [], f"README.md links to none of {missing}"


def test_the_checks_catch_what_they_are_for(tmp_path):
    """A broken link, a link out of the repository, an absolute path and a wrong figure, each caught."""
    s = json.loads((REPO / "results/bench_tiny/summary.json").read_text())
    (tmp_path / "docs").mkdir()
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "s.json").write_text(json.dumps(s))
    table = render(s, ["arm", "Holm p"], main_arms(s))
    table[3] = re.sub(r"\| ([\d.]+) \|$", "| 0.5 |", table[3])  # the second arm's Holm p, wrong
    (tmp_path / "README.md").write_text("\n".join([
        "# t", "[ok](docs/a.md#a) [gone](docs/missing.md) [up](../x.md) [anchor](docs/a.md#nope)",
        "run `cat /etc/passwd` or ../../elsewhere; https://example.org/a/b is fine; so is ~/mine/conf",
        "<!-- headline: results/s.json -->", *table]))
    (tmp_path / "docs" / "a.md").write_text("# A\n[back](../README.md)\n")
    assert broken_links(tmp_path) == ["README.md: docs/missing.md (no such file)",
                                      "README.md: ../x.md (outside the repository)",
                                      "README.md: docs/a.md#nope (no heading with anchor #nope)"]
    assert [b.split(": ", 1)[1] for b in outside_paths(tmp_path)] == ["../x.md", "/etc/passwd", "../../elsewhere"]
    wrong = table_mismatches(tmp_path)
    assert len(wrong) == 1 and "0.5" in wrong[0], wrong


def test_a_table_of_a_diverged_arm_renders():
    """A record whose arm has most seeds diverged: summary.json holds a null median (+inf) and, below 2 finite
    seeds, a null interval and no paired test; the columns say so, never crash on the nulls."""
    s = json.loads((REPO / "results/bench_tiny/summary.json").read_text())
    arm = next(n for n in main_arms(s) if n != s["reference"])
    s["arms"][arm].update(n_seeds_diverged=2, vs_reference=None,
                          end_loss={**s["arms"][arm]["end_loss"], "median": None, "ci": [None, None]})
    heads = ["arm", "seeds", "end loss, median [95% CI of the mean]",
             f"paired diff vs `{s['reference']}`, mean [95% CI]"]
    row = next(r for r in render(s, heads, main_arms(s))[2:] if r.startswith(f"| `{arm}` "))
    assert row == f"| `{arm}` | {s['arms'][arm]['n_seeds']} (2 diverged) | diverged [-, -] | - |"


if __name__ == "__main__":  # print the README's headline table for another summary.json (the swap)
    record = json.loads((REPO / sys.argv[1]).read_text())
    heads = ["arm", "end loss, median [95% CI of the mean]", f"paired diff vs `{record['reference']}`, mean [95% CI]",
             "Holm p"]
    print(f"<!-- headline: {sys.argv[1]} -->")
    print("\n".join(render(record, heads, main_arms(record, REPO / sys.argv[1]))))
