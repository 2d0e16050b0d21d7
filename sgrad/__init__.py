"""Helpers behind smoothgrad.py, model.py and train.py."""


class InputError(ValueError):
    """Bad user input: the scripts report it in one line and exit with code 2."""
