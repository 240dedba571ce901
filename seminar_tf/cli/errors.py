"""The error a user can fix, shared by the command modules."""


class UsageError(Exception):
    """A problem the user can fix; printed as one line."""
