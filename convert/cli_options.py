"""Command-line options whose help text lists the registry's families or configurations.

The list is read from the mapping files only when ``--help`` is shown, so starting a command does not
parse every mapping before its real work begins.
"""

from __future__ import annotations

from typing import Callable

import click


class ListedOption(click.Option):
    """A ``click.Option`` whose help holds ``{names}``, filled from ``listing()`` when shown."""

    def __init__(self, *args, listing: Callable[[], list[str]], **kwargs):
        super().__init__(*args, **kwargs)
        self._listing = listing

    def get_help_record(self, ctx):
        if self.help and "{names}" in self.help:
            self.help = self.help.replace("{names}", ", ".join(self._listing()))
        return super().get_help_record(ctx)


def families() -> list[str]:
    from . import registry

    return registry.family_names()


def configurations() -> list[str]:
    from . import registry

    return registry.configuration_names()
