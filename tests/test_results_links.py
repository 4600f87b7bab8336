"""Every committed result the docs name exists: README, ARCHITECTURE, the shipped recipes' comments and the
eval scripts cite files under eval/results/ as evidence, and a citation of a file that was never written (or
was renamed) is a claim nobody can check."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CITED = re.compile(r"eval/results/([A-Za-z0-9_.{},/-]+?\.(?:\{[a-z,]+\}|md|json|png))(?![A-Za-z0-9_<])")


def cited_results() -> dict[str, set[str]]:
    """{path under eval/results: the files citing it}; ``name.{md,json}`` counts as each file."""
    sources = [REPO / "README.md", REPO / "ARCHITECTURE.md", *(REPO / "llmopt" / "recipes").glob("*.yaml")]
    sources += sorted((REPO / "eval").glob("*.py"))
    out: dict[str, set[str]] = {}
    for src in sources:
        for m in CITED.finditer(src.read_text()):
            name = m.group(1)
            if "{" in name and not name.endswith("}"):
                continue  # a pattern such as eval/results/{name}.md, not one file
            stem, _, exts = name.partition(".{")
            names = [f"{stem}.{e}" for e in exts.rstrip("}").split(",")] if exts else [name]
            for n in names:
                out.setdefault(n, set()).add(str(src.relative_to(REPO)))
    return out


def test_cited_results_exist():
    cited = cited_results()
    assert len(cited) > 20  # the pattern still finds the citations
    missing = {n: sorted(srcs) for n, srcs in cited.items() if not (REPO / "eval" / "results" / n).is_file()}
    assert not missing, f"cited but not committed under eval/results/: {missing}"


def test_results_name_no_machine_paths():
    """Committed results name files relative to the repository (or by their role), never this machine's."""
    machine = re.compile(r"(?<![\w.])/(?:tmp|work|root|home)/")
    found = [
        str(p.relative_to(REPO))
        for p in sorted((REPO / "eval" / "results").rglob("*"))
        if p.suffix in {".md", ".json"} and machine.search(p.read_text())
    ]
    assert not found, f"results naming this machine's paths: {found}"
