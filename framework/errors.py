"""The one exception type a user is meant to see: a one-line message naming the key or file."""


class SculptError(Exception):
    """Bad input or an unmet requirement. The CLI prints `sculpt: error: <message>` and exits 2.

    Messages start with the config key or file they are about, e.g.
    ``compressor.bits: 9 must be in [2, 8]``.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def one_line(exc: BaseException) -> str:
    """Collapse any exception's message to one line (Hydra's are multi-line)."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


class ConfigError(SculptError):
    """Raised by a plugin's constructor for a bad argument; the runner prefixes the config
    path of the node, so the user reads e.g. ``compressor.bits: 9 must be in [2, 8]``."""

    def __init__(self, argument: str, message: str):
        self.argument = argument
        self.detail = " ".join(str(message).split())
        super().__init__(f"{argument}: {self.detail}")
