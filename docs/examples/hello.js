// A minimal Node worker for port-broker.
//
//   port-broker exec http -- node hello.js     serves on the socket the broker hands over
//   PORT=8080 node hello.js                    serves on a port of its own (development)
//
// `port-broker exec` places the sockets at fd 3, 4, ... and sets LISTEN_FDS, as systemd
// does; Node listens on an inherited socket with listen({fd}).
'use strict';
const http = require('node:http');

const inherited = Number(process.env.LISTEN_FDS || 0);
const server = http.createServer((request, response) => {
  response.setHeader('content-type', 'text/plain');
  response.end(`hello from node: pid ${process.pid}, uid ${process.getuid()}, ` +
               `client ${request.socket.remoteAddress}\n`);
});
server.listen(inherited > 0 ? { fd: 3 } : Number(process.env.PORT || 8080), () => {
  const where = inherited > 0 ? `fd 3 (${process.env.LISTEN_FDNAMES})` : server.address().port;
  console.log(`listening on ${where}`);
});
for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => server.close(() => process.exit(0)));
}
