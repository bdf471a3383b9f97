"""The one exception for problems the user can fix: missing or damaged data, an unreadable or
hostile checkpoint, impossible settings. Its message is the whole story; the scripts' shared
`cli.run_job` prints it as one `error: ...` line and exits with status 1, no traceback."""


class UserError(Exception):
    pass


def require(ok, message):
    if not ok:
        raise UserError(message)
