// A real third-party authorization server on loopback for tokensmith's provider tests.
//   node server.mjs CONFIG.json
// CONFIG: {"port": 0, "host": "127.0.0.1", "clients": [oidc-provider client metadata, ...],
//          "tls": {"cert": PEM, "key": PEM, "ca": PEM},   (optional: https, asking for client certificates)
//          "auto_login": "ACCOUNT", "ttl": {"AccessToken": seconds, ...}}
// auto_login (test only, loopback only): every interaction of the authorization-code flow is completed at
// once as ACCOUNT, consenting to the scopes asked for, so a test can obtain a refresh token without a
// browser. Refresh tokens are rotated on every use (rotateRefreshToken), as for public clients by default.
// Prints one line of JSON {"issuer": ...} on stdout once listening. Clients come from the config so other
// test suites can share this server with their own clients.
import { X509Certificate } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { createServer as createTlsServer } from 'node:https';
import Provider from 'oidc-provider';

const config = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const host = config.host || '127.0.0.1';

const tls = config.tls;
const server = tls
  ? createTlsServer({ cert: tls.cert, key: tls.key, ca: tls.ca, requestCert: true, rejectUnauthorized: false })
  : createServer();
server.listen(config.port || 0, host, () => {
  const { port } = server.address();
  const issuer = `${tls ? 'https' : 'http'}://${host}:${port}`;
  const provider = new Provider(issuer, {
    clients: config.clients,
    features: {
      clientCredentials: { enabled: true },
      introspection: { enabled: true },
      revocation: { enabled: true },
      devInteractions: { enabled: false },
      mTLS: {
        enabled: Boolean(tls),
        tlsClientAuth: true,
        getCertificate(ctx) {
          const peer = ctx.socket.getPeerCertificate && ctx.socket.getPeerCertificate();
          return peer && peer.raw ? new X509Certificate(peer.raw) : undefined;
        },
        certificateAuthorized(ctx) { return ctx.socket.authorized === true; },
        certificateSubjectMatches(ctx, property, expected) {
          if (property !== 'tls_client_auth_subject_dn') return false;
          const peer = ctx.socket.getPeerCertificate();
          return Boolean(peer && peer.subject) && `CN=${peer.subject.CN}` === expected;
        },
      },
    },
    clientAuthMethods: ['client_secret_basic', 'client_secret_post', 'client_secret_jwt', 'private_key_jwt',
      ...(tls ? ['tls_client_auth'] : []), 'none'],
    ...(config.ttl ? { ttl: config.ttl } : {}),
    ...(config.auto_login ? { rotateRefreshToken: true } : {}),
    // client assertions must be fresh: at most a minute old, never reused (the default replay check)
    clockTolerance: 0,
  });
  provider.on('server_error', (ctx, err) => console.error('server_error', err));
  provider.on('grant.error', (ctx, err) => console.error('grant.error', err.message, err.error_description || '', err.error_detail || ''));
  provider.on('grant.success', (ctx) => console.error('grant.success', ctx.oidc.params.grant_type));
  provider.on('grant.revoked', () => console.error('grant.revoked'));
  const callback = provider.callback();
  server.on('request', config.auto_login ? (req, res) => {
    if (req.url.startsWith('/interaction/')) {
      autoInteraction(provider, config.auto_login, req, res).catch((err) => {
        console.error('interaction', err);
        res.statusCode = 500;
        res.end();
      });
    } else {
      callback(req, res);
    }
  } : callback);
  console.log(JSON.stringify({ issuer }));
});
async function autoInteraction(provider, accountId, req, res) {
  const { prompt, params, session, grantId } = await provider.interactionDetails(req, res);
  if (prompt.name === 'login') {
    await provider.interactionFinished(req, res, { login: { accountId } }, { mergeWithLastSubmission: false });
    return;
  }
  const grant = grantId ? await provider.Grant.find(grantId)
    : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
  grant.addOIDCScope(params.scope);
  await provider.interactionFinished(req, res, { consent: { grantId: await grant.save() } },
    { mergeWithLastSubmission: true });
}

process.on('SIGTERM', () => server.close(() => process.exit(0)));
