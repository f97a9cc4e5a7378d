"""The errors a user can cause. The entry point prints them as one line and exits non-zero."""


class LlamaZhError(Exception):
    """Bad input: a message naming the file, line or field, and what was expected."""
