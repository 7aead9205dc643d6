"""port-broker: hand privileged listening sockets held by systemd to unprivileged workers.

systemd binds the ports in `.socket` units and socket-activates the broker; a worker
asks over a Unix socket and, if the policy allows its user, group or unit, receives the
listening socket's file descriptor and accepts on it itself.

Must never: import anything (it holds the version only): `port-broker exec` and
`broker.client` are on a worker's start-up path. The broker's own heavy dependencies
(trio, pydantic, systemd) are imported by the modules that serve, never here.
"""

__version__ = "0.1.0"
