"""Helpers behind smoothgrad.py, model.py, train.py and evaluate_saliency.py."""
import argparse


class InputError(ValueError):
    """Bad user input: the scripts report it in one line and exit with code 2."""


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse that reports bad arguments in one line (exit code 2); the usage is in --help."""

    def error(self, message):
        self.exit(2, '%s: error: %s\n' % (self.prog, message))
