"""The executor: the only package that imports Ray (see `runner`)."""
