"""The one base class of the errors selftune raises on purpose.

Every such error's message names what is wrong and what to do about it ("model folder ... has
no config.json: run `selftune setup`"), so the CLI prints it as one line and exits 1 instead of
showing a traceback. Each package's errors also keep the built-in class they always had
(ValueError, RuntimeError, ...), so existing `except ValueError` code keeps working.

It lives in `tools/`, the bottom layer, because every package may import it.
"""


class SelftuneError(Exception):
    """An error whose message says what went wrong and how to fix it."""
