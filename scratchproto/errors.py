"""The one exception type that means "the user asked for something impossible".

run.py turns it into a one-line message and a non-zero exit; anything else is a bug and keeps
its traceback. It is a ValueError so library users can catch it the usual way.
"""


class UserError(ValueError):
    pass
