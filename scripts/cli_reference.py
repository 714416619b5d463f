"""Regenerate the option tables of docs/cli.md from the argparse definitions (between the
`generated` markers; the rest of the file is written by hand).  Run: .venv/bin/python
scripts/cli_reference.py  (tests/test_docs.py checks the file is up to date)."""

import argparse
import os
import sys

from migrator.cli import build_parser

DOC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "cli.md")
BEGIN, END = "<!-- generated: begin -->", "<!-- generated: end -->"


def tables(skip: tuple[str, ...] = ("scenario",)) -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out = []
    for name, sp in sub.choices.items():
        if name in skip:
            continue
        out += [f"## `migrator {name}`", "", " ".join((sp.description or "").split()), "",
                "| option | meaning |", "| --- | --- |"]
        for a in sp._actions:
            if not a.option_strings or "-h" in a.option_strings:
                continue
            opt = ", ".join(a.option_strings)
            if a.nargs != 0:
                opt += " " + (a.metavar or a.dest.upper())
            text = " ".join((a.help or "").split()).replace("|", "\\|")
            if a.choices:
                text += f" (one of {', '.join(a.choices)})"
            if a.required:
                text = "required. " + text
            out.append(f"| `{opt}` | {text} |")
        out.append("")
    return "\n".join(out)


def render(doc: str) -> str:
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n\n{tables()}\n{END}{tail}"


if __name__ == "__main__":
    with open(DOC) as f:
        text = f.read()
    new = render(text)
    if "--check" in sys.argv:
        sys.exit(0 if new == text else 1)
    with open(DOC, "w") as f:
        f.write(new)
