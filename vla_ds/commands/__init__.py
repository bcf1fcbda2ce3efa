"""Subcommands of the `vla-ds` CLI (parsers here; the work lives in the library modules)."""
import argparse

HELP_FORMAT = argparse.ArgumentDefaultsHelpFormatter
