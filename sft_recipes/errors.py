"""One error type for everything the user can fix: bad data, bad config, a missing model; and how to tell a full
disk."""
import errno


class UserError(Exception):
    """A problem the user can fix. The CLI prints the message as one paragraph and exits with status 2."""

    exit_code = 2


class NothingToDo(UserError):
    """Nothing is left to do (a resumed run that already finished): the CLI prints the message and exits with 0."""

    exit_code = 0


NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def no_space(e: BaseException) -> bool:
    """A full disk (or quota): an OSError's errno, or the text of the errors safetensors, tokenizers and torch.save
    raise, which carry none ("... (os error 28)", "file write failed")."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in NO_SPACE or any(
                text in str(e) for text in ("No space left on device", "Disk quota exceeded", "file write failed",
                                            *(f"(os error {n})" for n in NO_SPACE))):
            return True
        e = e.__cause__ or e.__context__
    return False
