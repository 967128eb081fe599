"""The one exception type users see as a one-line message (exit status 2)."""


class DllamaError(Exception):
    """A user-facing error: bad input, bad file, bad flag, unreachable peer.

    The CLI prints ``dllama: error: <message>`` and exits with status 2; no traceback.
    Raise it with a message that names what was wrong (the path, the flag, the value).
    """


class FormatError(DllamaError):
    """A model or tokenizer file that cannot be read: wrong magic, truncated, unknown key/type."""
