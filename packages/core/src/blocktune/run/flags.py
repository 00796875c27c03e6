"""RunConfig's fields as command-line flags: each field is a flag spelled from its name (`lora_rank`:
--lora-rank; a bool --X, or --no-X where it defaults to true) in its section's group of --help,
with its help, default and choices; and `--set KEY=VALUE` for any field, typed as the field is."""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
from typing import Any

from blocktune.errors import ConfigError
from blocktune.run.config import FIELDS, SECTIONS, toml_value, typed

__all__ = ["add_setting_flags", "given_settings", "parse_sets", "flag_of"]

_FLAG_TYPES = {"int": int, "float": float}


def flag_of(f: dataclasses.Field) -> str:
    """The flag of a setting: --lora-rank for lora_rank; a bool that defaults to true: --no-progress."""
    name = f.name.replace("_", "-")
    return f"--no-{name}" if f.type == "bool" and f.default is True else f"--{name}"


def _default_text(f: dataclasses.Field) -> str:
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if f.type == "bool" or value in ("", None):
        return ""
    return f"(default: {toml_value(f, value)!r})"


def _add_flag(group: argparse._ArgumentGroup, f: dataclasses.Field) -> None:
    help_text = " ".join(t for t in (f.metadata["help"], _default_text(f)) if t).replace("%", "%%")
    kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": help_text or None}
    if f.type == "bool":
        kwargs.update(action="store_const", const=not f.default)
    elif f.type == "list[str]":
        kwargs.update(nargs="+", metavar="NAME")
    else:
        kwargs["type"] = _FLAG_TYPES.get(f.type, str)
        if f.metadata["choices"]:
            kwargs["choices"] = [c for c in f.metadata["choices"] if c != ""]
        elif f.type == "Budget":
            kwargs["metavar"] = "BYTES"
    group.add_argument(flag_of(f), **kwargs)


def add_setting_flags(parser: argparse.ArgumentParser,
                      names: tuple[str, ...] | None = None) -> dict[str, argparse._ArgumentGroup]:
    """A flag for each RunConfig field (or those in `names`; not those the run sets itself), in
    one argument group per section; the groups, by section, for the command's own flags."""
    groups = {s: parser.add_argument_group(s) for s in SECTIONS} if names is None else {}
    for f in FIELDS.values():
        if f.metadata["flag"] and (names is None or f.name in names):
            _add_flag(groups.get(f.metadata["section"], parser), f)
    return groups


def given_settings(a: argparse.Namespace, names: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The settings given as flags (those left out are None), as given: each is typed here first
    so that a bad value's message names its flag, but passed on unconverted, because a converted
    value can be None (`--device-budget inf`: no limit), which `RunConfig.load` reads as not given."""
    given = {n: getattr(a, n) for n in (names or FIELDS) if getattr(a, n, None) is not None}
    for n, value in given.items():
        typed(FIELDS[n], value, where=f"{flag_of(FIELDS[n])}: ")
    return given


def parse_sets(items: list[str]) -> dict[str, Any]:
    """`--set key=value` pairs as RunConfig settings, each typed as its field: the value is read
    as TOML (numbers, true/false, lists, quoted strings), else (and for a string setting that
    TOML reads as another type) taken as the text."""
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not key:
            raise ConfigError(f"--set {item!r}: write it as key=value, e.g. --set lora_rank=16")
        if key not in FIELDS:
            raise ConfigError(f"--set {item!r}: {key!r} is not a setting; `blocktune finetune --print-config` "
                              "lists them")
        try:
            parsed = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = value
        if FIELDS[key].type == "str" and not isinstance(parsed, str):
            parsed = value
        out[key] = typed(FIELDS[key], parsed, where="--set ")
    return out

