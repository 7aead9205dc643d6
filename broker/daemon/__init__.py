"""`port-broker serve`: the broker itself, a program with its own rules.

It runs long, unprivileged, on trio and systemd's libraries; its configuration is
validated with pydantic in a child interpreter (`loader`), never in the broker. Its
modules, by job, from the kernel up: `identity`, `activation`, `privileges` (kernel
facts); `policy`, `config`, `settings`, `loader` (the configuration); `connection`,
`admission`, `inflight`, `ledger`, `audit`, `journal`, `users`, `standing` (the rules,
the books, the configuration in force); `accepting`, `conversation`, `sdnotify`,
`reload`, `lifecycle`, `driver` (trio: moving bytes, keeping time, stopping); `start`
(serve's start-up).

Must never: be imported by a worker's path (`exec`, `list`, `status`), nor import the
`--intercept` supervisor.
"""
