// A real third-party authorization server on loopback for tokensmith's provider tests.
//   node server.mjs CONFIG.json
// CONFIG: {"port": 0, "host": "127.0.0.1", "clients": [oidc-provider client metadata, ...]}
// Prints one line of JSON {"issuer": ...} on stdout once listening. Clients come from the config so other
// test suites can share this server with their own clients.
import { readFileSync } from 'node:fs';
import { createServer } from 'node:http';
import Provider from 'oidc-provider';

const config = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const host = config.host || '127.0.0.1';

const server = createServer();
server.listen(config.port || 0, host, () => {
  const { port } = server.address();
  const issuer = `http://${host}:${port}`;
  const provider = new Provider(issuer, {
    clients: config.clients,
    features: {
      clientCredentials: { enabled: true },
      introspection: { enabled: true },
      revocation: { enabled: true },
      devInteractions: { enabled: false },
    },
    clientAuthMethods: ['client_secret_basic', 'client_secret_post', 'client_secret_jwt', 'private_key_jwt', 'none'],
    // client assertions must be fresh: at most a minute old, never reused (the default replay check)
    clockTolerance: 0,
  });
  provider.on('server_error', (ctx, err) => console.error('server_error', err));
  provider.on('grant.error', (ctx, err) => console.error('grant.error', err.message, err.error_description || ''));
  server.on('request', provider.callback());
  console.log(JSON.stringify({ issuer }));
});
process.on('SIGTERM', () => server.close(() => process.exit(0)));
