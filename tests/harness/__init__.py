"""The test harness, shared by the tests and bench/ (imported as `tests.harness.*`).

- `runtime`: the world-readable runtime brokers and workers of other uids run.
- `processes`: real processes as real users, the session's private network, a broker
  under the real `systemd-socket-activate`.
- `inprocess`: a real `Broker` in the test's own trio run, on real sockets.
- `box`: a real systemd booted as PID 1 in throw-away namespaces.
- `installed`: a box with port-broker installed from the checkout (`.ci/install`'s way).
- `debian`: the Debian package, built by `.ci/package` and installed with apt in a box.

Test modules import from here, never from one another.
"""
