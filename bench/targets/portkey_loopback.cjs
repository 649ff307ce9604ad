// Preloaded into the Portkey gateway (node -r): its start-server.js listens on
// every interface with no option to change it; the benchmark must listen on
// loopback only, so a listen() without a host gets 127.0.0.1.
'use strict';
const net = require('node:net');
const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function patchedListen(...args) {
  if (typeof args[0] === 'number' || (typeof args[0] === 'string' && /^\d+$/.test(args[0]))) {
    if (args.length === 1 || args[1] === undefined || args[1] === null || typeof args[1] === 'function') {
      const cb = typeof args[1] === 'function' ? args[1] : args[2];
      args = cb ? [args[0], '127.0.0.1', cb] : [args[0], '127.0.0.1'];
    }
  } else if (args[0] && typeof args[0] === 'object' && args[0].port !== undefined && !args[0].host && !args[0].path) {
    args[0] = Object.assign({}, args[0], { host: '127.0.0.1' });
  }
  return listen.apply(this, args);
};
