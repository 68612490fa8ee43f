"""One error type for everything the user can fix: bad data, bad config, a missing model."""


class UserError(Exception):
    """A problem the user can fix. The CLI prints the message as one paragraph and exits with status 2."""

    exit_code = 2


class NothingToDo(UserError):
    """Nothing is left to do (a resumed run that already finished): the CLI prints the message and exits with 0."""

    exit_code = 0
