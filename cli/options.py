"""Command-line options generated from ``engine.Config``: one per field, help, choices and default from there.

argparse holds no defaults (``SUPPRESS``), so an option the user did not give never reaches ``Config``,
whose own defaults apply. ``nst stylize``, ``nst compare``, ``nst serve`` and ``torchrun -m scale.tiled``
take their settings this way.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Optional, Sequence

from engine.config import Config

# Fields the CLI exposes under a shorter name.
SHORT = {"size": ["-s"], "steps": ["-n"]}


def add_config_options(parser: argparse.ArgumentParser, only: Optional[Sequence[str]] = None) -> None:
    """One option per ``Config`` field (or the fields in ``only``), help and default taken from the field."""
    group = parser.add_argument_group("settings (defaults come from engine.Config)")
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        if only is not None and f.name not in only:
            continue
        kind = hints[f.name]
        flags = SHORT.get(f.name, []) + ["--" + f.name.replace("_", "-")]
        kwargs = {"help": f.metadata.get("help", ""), "default": argparse.SUPPRESS, "dest": f.name}
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        if "tuple" in str(kind):
            item = float if "float" in str(kind) else str
            kwargs["type"] = _list_of(item)
            kwargs["metavar"] = "A,B,..."
        else:
            plain = typing.get_args(kind)[0] if typing.get_origin(kind) is typing.Union else kind  # Optional[int]
            kwargs["type"] = {int: int, float: float}.get(plain, str)
        if f.default is not None:  # None defaults explain themselves in their help
            default = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
            kwargs["help"] += f" (default: {default})"
        group.add_argument(*flags, **kwargs)


def _list_of(item):
    def parse(text: str):
        parts = [p.strip() for p in text.split(",") if p.strip()]
        try:
            return tuple(item(p) for p in parts)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None

    return parse


def config_from_args(args: argparse.Namespace) -> Config:
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if hasattr(args, f.name)}
    return Config(**given)  # its messages name --options: main() runs under cli_wording()
