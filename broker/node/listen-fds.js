// listen-fds.js: take listening sockets passed the systemd way (LISTEN_FDS,
// LISTEN_FDNAMES, LISTEN_PID), as `port-broker exec`, systemd, systemd-nspawn and
// podman pass them. No dependencies: copy this file next to your server.
//
//   const { listenTarget } = require('./listen-fds');
//   server.listen(listenTarget('http', 8080));   // the socket "http", else port 8080
//
// Node listens on an inherited socket with server.listen({ fd }); the fallback port is
// for development, when nothing was passed.
'use strict';

const LISTEN_FDS_START = 3; // SD_LISTEN_FDS_START

/**
 * The passed sockets in fd order: [{ name, fd }, ...]. Empty when none were passed, or
 * when LISTEN_PID names another process (the sockets were meant for it; a launcher
 * such as npm that starts node as a child does that: pass { checkPid: false }, or
 * start node directly). Without LISTEN_FDNAMES every name is "unknown", as in
 * sd_listen_fds_with_names(3).
 */
function listenFdList({ env = process.env, pid = process.pid, checkPid = true } = {}) {
  const count = Number.parseInt(env.LISTEN_FDS || '', 10);
  if (!Number.isInteger(count) || count <= 0) return [];
  if (checkPid && env.LISTEN_PID && Number.parseInt(env.LISTEN_PID, 10) !== pid) return [];
  const names = env.LISTEN_FDNAMES ? env.LISTEN_FDNAMES.split(':') : [];
  const list = [];
  for (let i = 0; i < count; i++) {
    list.push({ name: names[i] || 'unknown', fd: LISTEN_FDS_START + i });
  }
  return list;
}

/**
 * The passed sockets by name: { name: fd }. A name passed twice (an IPv4 and an IPv6
 * socket) maps to its first fd; use listenFdList() to see them all.
 */
function listenFds(options) {
  const byName = {};
  for (const { name, fd } of listenFdList(options)) {
    if (!(name in byName)) byName[name] = fd;
  }
  return byName;
}

/**
 * What to give server.listen(): { fd } of the socket called `name`, else { port:
 * fallbackPort }. If the sender named nothing (all "unknown") and passed exactly one
 * socket, that one is taken. Throws if neither a socket nor a fallback port exists.
 */
function listenTarget(name, fallbackPort, options) {
  const list = listenFdList(options);
  const named = list.find((entry) => entry.name === name);
  if (named) return { fd: named.fd };
  if (list.length === 1 && list[0].name === 'unknown') return { fd: list[0].fd };
  if (fallbackPort !== undefined && fallbackPort !== null) return { port: Number(fallbackPort) };
  const passed = list.map((entry) => entry.name).join(', ') || 'none';
  throw new Error(`no socket named "${name}" was passed (passed: ${passed}) and no fallback port`);
}

module.exports = { listenFdList, listenFds, listenTarget, LISTEN_FDS_START };
