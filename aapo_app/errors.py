"""User-facing errors.

Every problem a user can fix (a bad config value, a missing file or column, a batch size that does
not divide) is raised as :class:`AapoError` with a one-line message that names the field and says
what to do. The CLI prints it as ``error: <message>`` and exits with status 2, without a traceback.
"""


class AapoError(Exception):
    """A problem with the user's input, reported in one line; the CLI exits with status 2."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
