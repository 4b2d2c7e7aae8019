"""The reference pages of the documentation, generated from the code so they cannot drift.

* :func:`commands_page`: every command and option of ``pipe``, walked from the typer app's
  command tree, with the help ``--help`` prints (usage, arguments, options, examples).
* :func:`config_page`: every configuration key of the configs a command reads (its
  ``--config`` preset and ``key=value`` overrides), with type, default and help, from the
  config dataclasses (:mod:`pipeline.config_doc`).

The documentation build calls them (``docs/hooks.py``); ``tests/test_docs.py`` checks that
every command, option and key appears.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import typer

from cli.app import app
from pipeline.config_doc import Key, keys


@dataclasses.dataclass(frozen=True)
class ConfigSource:
    """A command that reads a config dataclass, and how its keys are set."""

    command: str
    cls: Any
    how: str


def config_sources() -> list[ConfigSource]:
    from stages.embed.stage import EmbedConfig  # lazy: the stages import torch, `pipe --help` must not
    from stages.evaluate.stage import EvalConfig  # lazy: as above
    from stages.train.trainer import TrainConfig  # lazy: as above
    return [
        ConfigSource("train-adaptor", TrainConfig, "a YAML preset (`--config demo`, or a file) and `key=value` "
                     "overrides after the options (`optim.lr=1e-4 adaptor.mode=tokens`); options such as "
                     "`--dataset` set the key of the same name"),
        ConfigSource("evaluate", EvalConfig, "a YAML preset (`--config paper/rsna_classification`, or a file) "
                     "and `key=value` overrides (`heads.lrs=[1e-3,5e-4]`); options set the key of the same name"),
        ConfigSource("embed", EmbedConfig, "the options of `pipe embed` (`--batch-size` is `batch_size`), and "
                     "`EmbedConfig(...)` in Python (`stages.embed.run`); the keys without an option keep "
                     "their defaults on the command line"),
    ]


# ------------------------------------------------------------------------------------ commands
def walk(command: Any = None, ctx: Any = None, path: str = "pipe") -> Iterator[tuple[str, Any, Any]]:
    """(full name, command, context) for the app and every command under it, in `--help` order."""
    command = command or typer.main.get_command(app)
    ctx = command.make_context(path.rsplit(" ", 1)[-1], [], parent=ctx, resilient_parsing=True)
    yield path, command, ctx
    for name, sub in (getattr(command, "commands", None) or {}).items():
        if not sub.hidden:
            yield from walk(sub, ctx, f"{path} {name}")


def options(command: Any, ctx: Any) -> list[tuple[str, str, str]]:
    """(kind, the option as --help writes it, its help) for every visible parameter."""
    out = []
    for p in command.get_params(ctx):
        record = p.get_help_record(ctx)
        if record is None or getattr(p, "hidden", False):
            continue
        kind = "option" if p.param_type_name == "option" else "argument"
        out.append((kind, record[0], _plain(record[1])))
    return out


def option_help(command_name: str) -> dict[str, str]:
    """{parameter name: help} of one command, for config keys whose field has no comment."""
    for path, command, ctx in walk():
        if path == f"pipe {command_name}":
            return {p.name: _plain(p.get_help_record(ctx)[1]) for p in command.get_params(ctx)
                    if p.get_help_record(ctx) is not None}
    raise KeyError(command_name)


def commands_page() -> str:
    lines = ["# Commands", "", "Every command and option of `pipe`, generated from the command line's own definitions "
             "(what `pipe COMMAND --help` prints). Configuration keys, which `train-adaptor` and `evaluate` take "
             "as `key=value`, are listed in [Configuration](config.md).", ""]
    for path, command, ctx in walk():
        lines += _command_section(path, command, ctx)
    return "\n".join(lines) + "\n"


def _command_section(path: str, command: Any, ctx: Any) -> list[str]:
    level = "##" if path.count(" ") <= 1 else "###"
    out = [f"{level} `{path}`", "", _plain(command.help or ""), "", "```text",
           command.get_usage(ctx).removeprefix("Usage: "), "```", ""]
    params = options(command, ctx)
    if params:
        out += ["| | | |", "|---|---|---|"]
        out += [f"| {kind} | `{name}` | {_cell(help_)} |" for kind, name, help_ in params]
        out.append("")
    if getattr(command, "commands", None):
        subs = ", ".join(f"`{path} {n}`" for n, c in command.commands.items() if not c.hidden)
        out += [f"Commands: {subs}.", ""]
    if command.epilog:
        out += ["```text", _plain(command.epilog).strip(), "```", ""]
    return out


# ------------------------------------------------------------------------------------ configuration
def config_page() -> str:
    lines = ["# Configuration", "", "Every configuration key, generated from the config dataclasses: its type, its "
             "default and its help (the comment on its field in the source). Later sources win: the defaults, then "
             "a preset, then `key=value` overrides; an unknown key, a wrong type or a bad value is refused in one "
             "message that names every dotted key. Presets the installed package holds: `demo`, `demo_tokens`, "
             "`adaptor_paper` (or `paper`), `adaptor_tokens` (or `tokens`); the paper's evaluation recipes: "
             "`paper/rsna_classification`, `paper/covidx_classification`, `paper/siim_segmentation`, "
             "`paper/rsna_segmentation`.", ""]
    for source in config_sources():
        lines += _config_section(source)
    return "\n".join(lines) + "\n"


def _config_section(source: ConfigSource) -> list[str]:
    cls = source.cls
    out = [f"## `pipe {source.command}`: `{cls.__module__}.{cls.__name__}`", "", f"Set by {source.how}.", "",
           "| key | type | default | help |", "|---|---|---|---|"]
    out += [_key_row(k) for k in keys(cls, option_help(source.command))]
    out.append("")
    moved = getattr(cls, "MOVED", {})
    if moved:
        out += ["Keys that moved into a section are still read at their old place: "
                + ", ".join(f"`{old}` is `{new}`" for old, new in moved.items()) + ".", ""]
    renamed = _renamed(cls)
    if renamed:
        out += ["Keys that were renamed are refused with a message that gives the new key and the value that "
                "keeps the old meaning: " + ", ".join(f"`{k}`" for k in sorted(renamed)) + ".", ""]
    return out


def _renamed(cls: Any, prefix: str = "") -> set[str]:
    """The dotted keys a config (and its sections) refuses as renamed."""
    found = {prefix + k for k in getattr(cls, "RENAMED", {})}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.default):
            found |= _renamed(type(f.default), f"{prefix}{f.name}.")
    return found


def _key_row(k: Key) -> str:
    key = f"**`{k.key}`**" if k.section else f"`{k.key}`"
    default = "" if k.section else f"`{k.default}`"
    return f"| {key} | {_cell(k.type)} | {default} | {_cell(k.help)} |"


def _plain(text: str) -> str:
    """Help as a reader sees it in a terminal: rich's escaped brackets unescaped."""
    return text.replace("\\[", "[")


def _cell(text: str) -> str:
    """Text for a table cell: no line breaks, pipes escaped, angle brackets shown, not read as HTML."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;").replace("\n", " ")
