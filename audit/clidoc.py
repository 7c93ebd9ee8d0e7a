"""docs/commands.md, written from the CLI itself so the page cannot drift from the options the commands take.

    python -m audit.clidoc > docs/commands.md

``tests/test_docs.py`` fails when the committed page differs from what this prints.
"""

from __future__ import annotations

import typer.main

from .cli import app

# The topic page that explains each command's behaviour in prose (relative to docs/).
TOPICS = {
    "demo": ("the bundled toy world", "toy-world.md"),
    "targets": ("real models", "real-models.md"),
    "toy build": ("the bundled toy world", "toy-world.md"),
    "toy data": ("the bundled toy world", "toy-world.md"),
    "export": ("the compiled runtime", "runtime.md"),
    "features": ("data formats: the feature store", "data-formats.md#the-feature-store"),
    "train": ("verdicts: training the heads", "verdicts.md#training-the-heads"),
    "evaluate": ("verdicts: evaluation", "verdicts.md#evaluation"),
    "check": ("verdicts: what a verdict says", "verdicts.md#what-a-verdict-says"),
    "scan": ("verdicts: what a verdict says", "verdicts.md#what-a-verdict-says"),
    "report": ("HTML reports", "reports.md"),
    "experiment": ("the study's results", "RESULTS.md"),
    "serve-target": ("HTTP targets", "http.md"),
    "serve": ("the auditing service", "service.md"),
    "evidence verify": ("the auditing service: the evidence log", "service.md#the-evidence-log"),
    "evidence export": ("the auditing service: the evidence log", "service.md#the-evidence-log"),
}


def _commands(group, prefix=()):
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            yield from _commands(cmd, prefix + (name,))
        else:
            yield " ".join(prefix + (name,)), cmd


def _option_cell(param) -> str:
    names = " / ".join(f"`{o}`" for o in list(param.opts) + list(param.secondary_opts))
    return names


def _default_cell(param) -> str:
    if param.required:
        return "required"
    if param.is_flag and not param.secondary_opts:
        return ""
    d = param.default
    if d is None or d == "":
        return ""
    if param.secondary_opts:
        return f"`{param.opts[0] if d else param.secondary_opts[0]}`"
    return f"`{d}`"


def _cell(text: str | None) -> str:
    return " ".join((text or "").split()).replace("|", "\\|")


def _usage(name: str, cmd) -> str:
    parts = [f"audit {name}"]
    for p in cmd.params:
        if p.param_type_name == "argument":
            parts.append(p.name.upper())
    for p in cmd.params:
        if p.param_type_name == "option" and p.required:
            parts.append(f"{p.opts[0]} {p.name.upper()}")
    if any(p.param_type_name == "option" and not p.required and p.name != "help" for p in cmd.params):
        parts.append("[OPTIONS]")
    return " ".join(parts)


def render() -> str:
    root = typer.main.get_command(app)
    found = dict(_commands(root))
    # The order of the data flow (as TOPICS lists them); commands added later come last.
    cmds = [(n, found[n]) for n in TOPICS if n in found] + [(n, c) for n, c in found.items() if n not in TOPICS]
    lines = [
        "# Commands and options",
        "",
        "Every command of `audit`, with every option it takes. This page is written by `python -m audit.clidoc >",
        "docs/commands.md` from the CLI itself; `audit COMMAND --help` prints the same. Global options go before the",
        "command: `audit --verbose COMMAND ...` logs progress details. Exit codes and error messages:",
        "[robustness.md](robustness.md#exit-codes).",
        "",
        "| command | what it does |",
        "|---|---|",
    ]
    for name, cmd in cmds:
        anchor = "audit-" + name.replace(" ", "-")
        lines.append(f"| [`audit {name}`](#{anchor}) | {_cell((cmd.help or '').split(chr(10) + chr(10))[0])} |")
    for name, cmd in cmds:
        lines += ["", f"## audit {name}", "", _cell(cmd.help), "", "```", _usage(name, cmd), "```", ""]
        args = [p for p in cmd.params if p.param_type_name == "argument"]
        for p in args:
            lines.append(f"- `{p.name.upper()}`: {_cell(getattr(p, 'help', ''))}")
        if args:
            lines.append("")
        lines += ["| option | default | meaning |", "|---|---|---|"]
        for p in cmd.params:
            if p.param_type_name != "option" or p.name == "help":
                continue
            lines.append(f"| {_option_cell(p)} | {_default_cell(p)} | {_cell(p.help)} |")
        if name in TOPICS:
            title, page = TOPICS[name]
            lines += ["", f"More: [{title}]({page})."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(), end="")
