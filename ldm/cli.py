"""What the command lines (main.py, sample.py, scripts/) share: how ``--help`` shows defaults."""
from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each default once: not where the help already says it in words ("(default: the
    config's name)"), nor where there is none to show (None, an empty string or list, a switch's False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is False or action.default in (None, "", [], argparse.SUPPRESS) or "default" in text:
            return text
        return super()._get_help_string(action)
