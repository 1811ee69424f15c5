"""Errors that the command line turns into exit status 2 with one line on standard error."""


class InputError(Exception):
    """Bad input from the user: a file, key or value that is wrong.

    The message is one line that names the culprit and what was expected. The CLI prints it and exits 2,
    without a traceback.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
