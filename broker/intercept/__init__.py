"""`port-broker exec --intercept`: the supervisor that gives an unmodified program's
bind() to a held port the held socket (seccomp user notification).

A program of its own, with its own rules: x86_64 only, ctypes for the system calls
Python lacks, standard library otherwise; started by the command line after the
sockets are acquired (`supervisor.run_intercepted`), never imported by the broker or by
a plain `exec`. Its modules, by job: `supervisor` (the loop: notifications, signals,
reaping), `bindings` (which held socket a bind() gets: pure decisions), `seccomp` (the
kernel's ABI), `tracee` (what is done to the traced program), `spawn` (starting it
under the filter), `notes` (what is said on stderr later), `idmap` (newuidmap and
newgidmap for it).

Must never: import the broker's daemon, trio or pydantic.
"""
