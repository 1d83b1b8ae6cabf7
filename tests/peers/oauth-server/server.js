// OAuth 2 authorization server for credproxy's tests, built on @node-oauth/oauth2-server.
//
// It issues refresh tokens that rotate on every use and detects reuse: presenting a refresh
// token that was already exchanged revokes its whole token family (every access and refresh
// token descended from the same grant), the way Auth0, Okta and others do. Counters under
// /admin/stats let tests assert how many token requests were made and whether a family was
// ever revoked. The client-credentials grant is served too: each client's tokens form one
// family, and the `audience` and `resource` parameters of the last token request are kept.
//
//   node server.js --port 0 --access-lifetime 2
//
// prints `listening <port>` once ready. Endpoints:
//   POST /token                  the token endpoint (grant_type=refresh_token or
//                                client_credentials)
//   GET  /resource               200 when the bearer access token is valid, else 401
//   POST /admin/clients          {client_id, client_secret}
//   POST /admin/grant            {client_id, scope?} -> {access_token, refresh_token, expires_in}
//   POST /admin/revoke           {refresh_token}: revokes that token's family
//   POST /admin/mode             {down?: bool, delay_ms?: number, access_lifetime?: number}
//   GET  /admin/stats            counters
//   GET  /admin/token?access_token=T  {expires_at_ms} of a token this server issued (404 if not)
'use strict';

const http = require('http');
const crypto = require('crypto');
const OAuth2Server = require('@node-oauth/oauth2-server');
const { Request, Response } = OAuth2Server;

const args = process.argv.slice(2);
function arg(name, fallback) {
  const i = args.indexOf(`--${name}`);
  return i >= 0 ? args[i + 1] : fallback;
}

const clients = new Map();
const accessTokens = new Map();
const refreshTokens = new Map();
const families = new Map();
const mode = { down: false, delayMs: 0, accessLifetime: Number(arg('access-lifetime', '3600')) };
const stats = {
  token_requests: 0,
  issued: 0,
  invalid_grant: 0,
  other_errors: 0,
  reuse_detected: 0,
  family_revocations: 0,
  unavailable: 0,
  in_flight: 0,
  max_in_flight: 0,
  // Seconds of validity the previous access token had left when it was refreshed.
  remaining_at_refresh: [],
  client_credentials_issued: 0,
  // `audience` and `resource` of the last token request (null when absent).
  last_audience: null,
  last_resource: null,
};

function revokeFamily(family) {
  const f = families.get(family);
  if (!f || f.revoked) return;
  f.revoked = true;
  stats.family_revocations += 1;
  for (const [k, t] of accessTokens) if (t.family === family) accessTokens.delete(k);
  for (const t of refreshTokens.values()) if (t.family === family) t.revoked = true;
}

const model = {
  async getClient(clientId, clientSecret) {
    const c = clients.get(clientId);
    if (!c) return null;
    if (clientSecret !== null && clientSecret !== undefined && clientSecret !== c.secret) return null;
    return {
      id: c.id,
      grants: ['refresh_token', 'client_credentials'],
      accessTokenLifetime: mode.accessLifetime,
    };
  },
  // The client-credentials grant acts for the client itself: one token family per client.
  async getUserFromClient(client) {
    return { id: client.id, family: `client:${client.id}`, clientCredentials: true };
  },
  async getRefreshToken(refreshToken) {
    const t = refreshTokens.get(refreshToken);
    if (!t) return null;
    const family = families.get(t.family);
    if (family.revoked) return null;
    if (t.rotated) {
      // A rotated token presented again: a replay or two refreshers racing. Revoke the family.
      stats.reuse_detected += 1;
      revokeFamily(t.family);
      return null;
    }
    return t;
  },
  async revokeToken(token) {
    const t = refreshTokens.get(token.refreshToken);
    if (!t || t.rotated) return false;
    t.rotated = true;
    const previous = family(t.family).current;
    const left = previous ? (previous.accessTokenExpiresAt - Date.now()) / 1000 : null;
    if (left !== null) stats.remaining_at_refresh.push(left);
    return true;
  },
  async saveToken(token, client, user) {
    if (user.clientCredentials) {
      stats.client_credentials_issued += 1;
      const previous = family(user.family).current;
      if (previous) stats.remaining_at_refresh.push((previous.accessTokenExpiresAt - Date.now()) / 1000);
    }
    const record = { ...token, client, user, family: user.family };
    accessTokens.set(token.accessToken, record);
    if (token.refreshToken) {
      refreshTokens.set(token.refreshToken, { ...record, rotated: false });
    }
    family(user.family).current = record;
    stats.issued += 1;
    return record;
  },
  async getAccessToken(accessToken) {
    return accessTokens.get(accessToken) || null;
  },
};

function family(id) {
  if (!families.has(id)) families.set(id, { revoked: false, current: null });
  return families.get(id);
}

const oauth = new OAuth2Server({
  model,
  accessTokenLifetime: mode.accessLifetime,
  refreshTokenLifetime: 30 * 24 * 3600,
  alwaysIssueNewRefreshToken: true,
  allowExtendedTokenAttributes: false,
});

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}

function send(res, status, body, headers = {}) {
  res.writeHead(status, { 'content-type': 'application/json', 'cache-control': 'no-store', ...headers });
  res.end(JSON.stringify(body));
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function token(req, res, raw) {
  stats.token_requests += 1;
  stats.in_flight += 1;
  stats.max_in_flight = Math.max(stats.max_in_flight, stats.in_flight);
  try {
    if (mode.delayMs) await sleep(mode.delayMs);
    if (mode.down) {
      stats.unavailable += 1;
      return send(res, 503, { error: 'temporarily_unavailable' }, { 'retry-after': '1' });
    }
    const body = Object.fromEntries(new URLSearchParams(raw));
    stats.last_audience = body.audience ?? null;
    stats.last_resource = body.resource ?? null;
    const request = new Request({
      headers: req.headers,
      method: req.method,
      query: {},
      body,
    });
    const response = new Response({ headers: {} });
    try {
      const t = await oauth.token(request, response, {
        accessTokenLifetime: mode.accessLifetime,
        requireClientAuthentication: { refresh_token: true, client_credentials: true },
      });
      send(res, 200, {
        access_token: t.accessToken,
        token_type: 'Bearer',
        expires_in: Math.round((t.accessTokenExpiresAt - Date.now()) / 1000),
        ...(t.refreshToken ? { refresh_token: t.refreshToken } : {}),
        ...(t.scope ? { scope: [].concat(t.scope).join(' ') } : {}),
      });
    } catch (e) {
      if (e.name === 'invalid_grant') stats.invalid_grant += 1;
      else stats.other_errors += 1;
      send(res, e.code || 500, { error: e.name || 'server_error', error_description: e.message });
    }
  } finally {
    stats.in_flight -= 1;
  }
}

function grant(body) {
  const c = clients.get(body.client_id);
  if (!c) return [400, { error: 'unknown client' }];
  const familyId = crypto.randomUUID();
  family(familyId);
  const lifetime = body.access_lifetime || mode.accessLifetime;
  const record = {
    accessToken: crypto.randomBytes(20).toString('hex'),
    accessTokenExpiresAt: new Date(Date.now() + lifetime * 1000),
    refreshToken: crypto.randomBytes(20).toString('hex'),
    refreshTokenExpiresAt: new Date(Date.now() + 30 * 24 * 3600 * 1000),
    scope: body.scope ? String(body.scope).split(' ') : undefined,
    client: { id: c.id },
    user: { id: familyId, family: familyId },
    family: familyId,
  };
  accessTokens.set(record.accessToken, record);
  refreshTokens.set(record.refreshToken, { ...record, rotated: false });
  family(familyId).current = record;
  return [200, { access_token: record.accessToken, refresh_token: record.refreshToken, expires_in: lifetime }];
}

const server = http.createServer(async (req, res) => {
  const raw = await readBody(req);
  const url = new URL(req.url, 'http://localhost');
  const json = () => (raw ? JSON.parse(raw) : {});
  try {
    if (req.method === 'POST' && url.pathname === '/token') return await token(req, res, raw);
    if (req.method === 'GET' && url.pathname === '/resource') {
      const auth = req.headers.authorization || '';
      const t = accessTokens.get(auth.replace(/^Bearer /, ''));
      if (t && t.accessTokenExpiresAt > new Date()) return send(res, 200, { ok: true });
      return send(res, 401, { error: 'invalid_token' });
    }
    if (req.method === 'POST' && url.pathname === '/admin/clients') {
      const b = json();
      clients.set(b.client_id, { id: b.client_id, secret: b.client_secret });
      return send(res, 200, { ok: true });
    }
    if (req.method === 'POST' && url.pathname === '/admin/grant') {
      const [status, body] = grant(json());
      return send(res, status, body);
    }
    if (req.method === 'POST' && url.pathname === '/admin/revoke') {
      const t = refreshTokens.get(json().refresh_token);
      if (t) revokeFamily(t.family);
      return send(res, t ? 200 : 404, { ok: Boolean(t) });
    }
    if (req.method === 'POST' && url.pathname === '/admin/mode') {
      const b = json();
      if (b.down !== undefined) mode.down = Boolean(b.down);
      if (b.delay_ms !== undefined) mode.delayMs = Number(b.delay_ms);
      if (b.access_lifetime !== undefined) mode.accessLifetime = Number(b.access_lifetime);
      return send(res, 200, mode);
    }
    if (req.method === 'GET' && url.pathname === '/admin/stats') return send(res, 200, stats);
    if (req.method === 'GET' && url.pathname === '/admin/token') {
      const t = accessTokens.get(url.searchParams.get('access_token') || '');
      if (!t) return send(res, 404, { error: 'unknown token' });
      return send(res, 200, { expires_at_ms: t.accessTokenExpiresAt.getTime() });
    }
    send(res, 404, { error: 'not_found' });
  } catch (e) {
    send(res, 500, { error: 'server_error', error_description: String(e) });
  }
});

server.listen(Number(arg('port', '0')), '127.0.0.1', () => {
  process.stdout.write(`listening ${server.address().port}\n`);
});
process.on('SIGTERM', () => process.exit(0));
