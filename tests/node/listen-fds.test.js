// Unit tests of broker/node/listen-fds.js, run with node's own test runner
// (tests/test_node_helper.py runs `node --test` on this directory).
'use strict';
const test = require('node:test');
const assert = require('node:assert/strict');
const path = require('node:path');
const { listenFdList, listenFds, listenTarget } = require(
  path.join(__dirname, '..', '..', 'broker', 'node', 'listen-fds.js'));

const pid = 4242;

test('nothing passed: no sockets, the fallback port', () => {
  assert.deepEqual(listenFdList({ env: {}, pid }), []);
  assert.deepEqual(listenFds({ env: {}, pid }), {});
  assert.deepEqual(listenTarget('http', 8080, { env: {}, pid }), { port: 8080 });
});

test('named sockets from fd 3 on, in order', () => {
  const env = { LISTEN_FDS: '2', LISTEN_FDNAMES: 'http:https', LISTEN_PID: String(pid) };
  assert.deepEqual(listenFdList({ env, pid }), [
    { name: 'http', fd: 3 }, { name: 'https', fd: 4 }]);
  assert.deepEqual(listenFds({ env, pid }), { http: 3, https: 4 });
  assert.deepEqual(listenTarget('https', 8443, { env, pid }), { fd: 4 });
  assert.deepEqual(listenTarget('quic', 8443, { env, pid }), { port: 8443 });
});

test('a name passed twice (IPv4 and IPv6) maps to its first fd', () => {
  const env = { LISTEN_FDS: '2', LISTEN_FDNAMES: 'http:http', LISTEN_PID: String(pid) };
  assert.deepEqual(listenFds({ env, pid }), { http: 3 });
  assert.equal(listenFdList({ env, pid }).length, 2);
});

test('sockets meant for another process are not taken', () => {
  const env = { LISTEN_FDS: '1', LISTEN_FDNAMES: 'http', LISTEN_PID: '1' };
  assert.deepEqual(listenFds({ env, pid }), {});
  assert.deepEqual(listenFds({ env, pid, checkPid: false }), { http: 3 });
  assert.deepEqual(listenFds({ env, pid: 1 }), { http: 3 }); // podman, nspawn: pid 1
});

test('unnamed sockets are "unknown"; a single one serves any name', () => {
  const env = { LISTEN_FDS: '1', LISTEN_PID: String(pid) };
  assert.deepEqual(listenFds({ env, pid }), { unknown: 3 });
  assert.deepEqual(listenTarget('http', undefined, { env, pid }), { fd: 3 });
  const two = { LISTEN_FDS: '2', LISTEN_PID: String(pid) };
  assert.deepEqual(listenTarget('http', 80, { env: two, pid }), { port: 80 });
});

test('malformed LISTEN_FDS is nothing passed', () => {
  for (const value of ['', '0', '-1', 'x', 'NaN']) {
    assert.deepEqual(listenFdList({ env: { LISTEN_FDS: value }, pid }), [], value);
  }
});

test('no socket and no fallback port: an error that says what was passed', () => {
  const env = { LISTEN_FDS: '2', LISTEN_FDNAMES: 'a:b', LISTEN_PID: String(pid) };
  assert.throws(() => listenTarget('http', undefined, { env, pid }),
    { message: 'no socket named "http" was passed (passed: a, b) and no fallback port' });
});
