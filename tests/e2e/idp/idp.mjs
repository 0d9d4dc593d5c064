// A real OpenID Provider (panva/oidc-provider) for corral's end-to-end tests.
// oidc-provider is pinned to 8.x: 9.x supports only Node 22+ (it warns on 20, and needs
// URL.parse, which early Node 20 releases lack).
//
//   node idp.mjs CONFIG.json
//
// CONFIG.json: {
//   "port": 0,                       // 0 = any free port
//   "jwks": {"keys": [...]},         // private JWKs, each with kid and alg; the first one signs
//   "clients": [{"client_id", "client_secret", "groups",
//                "token_endpoint_auth_method"?}],   // default client_secret_basic
//   "audiences": ["corral", "other"],  // optional; resource indicator urn:<aud> -> aud <aud>
//   "ttl": 300                       // optional; access token lifetime in seconds
// }
//
// Prints exactly one line on stdout, the issuer (http://127.0.0.1:PORT), once it listens;
// everything else goes to stderr so the reader of that line never sees anything more.
// GET /_test/jwks_fetches -> {"count": N}: how many times the JWKS was fetched.

import { readFileSync } from 'node:fs';
import { createServer } from 'node:http';

// oidc-provider prints its NOTICEs with console.info, i.e. on stdout: send them to stderr.
console.log = console.info = console.debug = console.error;

const config = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const signer = config.jwks.keys[0];
const audiences = new Set(config.audiences ?? ['corral', 'other']);
const ttl = config.ttl ?? 300;
const groupsOf = new Map(config.clients.map((c) => [c.client_id, c.groups]));

// Import after the console redirect, in case the module says something while loading.
const { default: Provider, errors } = await import('oidc-provider');

// The issuer names the port, so the port must be known before the Provider exists:
// listen first, then attach the provider's handler.
const server = createServer();
await new Promise((resolve, reject) => {
  server.once('error', reject);
  server.listen(config.port ?? 0, '127.0.0.1', resolve);
});
const issuer = `http://127.0.0.1:${server.address().port}`;

const provider = new Provider(issuer, {
  jwks: config.jwks,
  clients: config.clients.map((c) => ({
    client_id: c.client_id,
    client_secret: c.client_secret,
    token_endpoint_auth_method: c.token_endpoint_auth_method ?? 'client_secret_basic',
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
  })),
  // The default (RS256) would make every client invalid when the key set has no RSA key.
  clientDefaults: { id_token_signed_response_alg: signer.alg },
  features: {
    devInteractions: { enabled: false }, // no browser flows here
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      // RFC 8707 wants an absolute URI, so a bare "corral" is refused (invalid_target);
      // a request without `resource` is for corral, as a plain client_credentials call would be.
      defaultResource: async () => 'urn:corral',
      // Only meaningful for code/refresh grants, which these clients cannot use.
      useGrantedResource: async () => true,
      async getResourceServerInfo(ctx, resource) {
        const aud = resource.startsWith('urn:') ? resource.slice(4) : undefined;
        if (!audiences.has(aud)) throw new errors.InvalidTarget();
        return {
          audience: aud,
          scope: '', // client_credentials filters requested scopes against this; none are used
          accessTokenFormat: 'jwt',
          accessTokenTTL: ttl,
          jwt: { sign: { alg: signer.alg, kid: signer.kid } },
        };
      },
    },
  },
  // Spread into the JWT payload before iss/aud/exp/jti, so it cannot override those.
  async extraTokenClaims(ctx, token) {
    const groups = groupsOf.get(token.clientId);
    return groups === undefined ? undefined : { groups };
  },
  ttl: { ClientCredentials: ttl },
  cookies: { keys: ['e2e-only'] }, // unused without browser flows; silences a startup warning
});

// In front of the provider's routes: the test-only counter and its endpoint.
let jwksFetches = 0;
provider.use(async (ctx, next) => {
  if (ctx.method === 'GET' && ctx.path === '/_test/jwks_fetches') {
    ctx.body = { count: jwksFetches };
    return;
  }
  await next();
  if (ctx.oidc?.route === 'jwks') jwksFetches += 1; // set by the provider's router
});

server.on('request', provider.callback());
process.stdout.write(`${issuer}\n`);
