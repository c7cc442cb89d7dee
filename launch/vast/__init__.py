"""Rented clusters on vast.ai: rent, set up, train detached, fetch the run, tear down.

One job per module: `checks` (every string from the user or the provider, before it reaches a shell,
a file or an ssh config), `state` (the run's record on disk: a RunState and its Phase), `provider`
(the vastai SDK, whose answers count only when the HTTP status and the body both say success),
`transport` (ssh, tar, the console), `provision` (offers, creates, waits, destroys, confirms),
`fetch` (the run dir and its checkpoints, verified and bounded), `node` (the node side, standard
library only, with the money guard) and `commands` (the user's commands and the one teardown).
"""
