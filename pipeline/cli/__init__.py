"""One module per CLI area; each has `register(commands)` adding its subcommands.

A subcommand sets `handler=` (a function of the parsed args returning an exit code) with
`set_defaults`. Handlers import heavy modules lazily so `deco --help` stays fast.
"""
