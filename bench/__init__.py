"""Benchmarks for port-broker: run on purpose with `bench/run`, never by the test suite.

They measure the claims the project makes (a handed-over socket is as fast as one bound
directly; a proxy is not; grants and cold starts are cheap; a worker restart refuses
nothing) side by side in one run, on the same real processes the tests use: the broker
under `systemd-socket-activate` as an unprivileged uid, Node workers as `nobody`.

Module map: `stage` (namespace, runtime, processes), `stats`, `datapath` (wrk against
five contenders), `handoff` (grants, the exec CLI, cold start), `handoff_client` (the
trio load client, run as nobody), `restart` (worker restarts under load), `profiling`
(what dominates a missed budget), `report` (budgets, Markdown, JSON), `chart`, `runner`.
The processes, runtime and helpers are the tests' own (`tests.harness`).
"""
