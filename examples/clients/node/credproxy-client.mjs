#!/usr/bin/env node
// A small credproxy worker client: read one credential over credproxy's Unix socket.
// Node 18+, no dependencies (node:http with `socketPath`).
//
// Library use:
//
//   import { CredproxyClient, NeedsReauth } from "./credproxy-client.mjs";
//   const client = new CredproxyClient("/run/credproxy/credproxy.sock");
//   try {
//     const { access_token } = await client.getCredential(id, { fields: ["access_token"] });
//   } catch (e) {
//     if (e instanceof NeedsReauth) askTheUserToReconnect(e.credentialId); // retrying won't help
//     else throw e;
//   }
//   // The upstream API just answered 401 with that token: read past credproxy's cache once.
//   await client.getCredential(id, { fields: ["access_token"], noCache: true });
//
// Command line (the value goes to stdout, diagnostics to stderr):
//
//   node credproxy-client.mjs --socket PATH [--field NAME] [--no-cache]
//                             [--retries N] [--max-wait SECONDS] ID
//
// Without --field it prints the credential's field names only, never a value. Exit codes:
// 0 ok, 2 needs_reauth, 3 credential_unusable, 4 not found, 5 unavailable after retries, 1 other.

import http from "node:http";
import { pathToFileURL } from "node:url";

export const DEFAULT_RETRIES = 3;
export const DEFAULT_MAX_WAIT = 5; // seconds

/** An answer other than 200: HTTP `status`, credproxy's error `code`, its `apiMessage`, and
 * its `detail` when it gives one (why a credential is unusable, which key was wrong). */
export class CredproxyError extends Error {
  constructor(credentialId, status, code, apiMessage, detail) {
    super(`credential ${credentialId}: ${status} ${code}: ${apiMessage}`);
    this.name = new.target.name;
    this.credentialId = credentialId;
    this.status = status;
    this.code = code;
    this.apiMessage = apiMessage;
    this.detail = detail;
  }
}
/** 409 needs_reauth: the refresh token was refused and the access token expired. The
 * platform must ask the user to reconnect; retrying cannot help. */
export class NeedsReauth extends CredproxyError {}
/** 409 credential_unusable: the secrets manager holds it in a state that cannot be handed out. */
export class CredentialUnusable extends CredproxyError {}
/** 404: no such credential, or one this caller may not read (they look the same). */
export class NotFound extends CredproxyError {}
/** 503 still after the retries; `retryAfter` is the last Retry-After, in seconds. */
export class Unavailable extends CredproxyError {
  constructor(credentialId, status, code, message, retryAfter) {
    super(credentialId, status, code, message);
    this.retryAfter = retryAfter;
  }
}

/** A value safe to log: its length and nothing of its content. */
export const mask = (value) => `<${String(value).length} chars>`;

function get(socketPath, path, headers, timeoutMs) {
  return new Promise((resolve, reject) => {
    const request = http.request(
      { socketPath, path, method: "GET", headers: { host: "credproxy", ...headers } },
      (response) => {
        const chunks = [];
        response.on("data", (c) => chunks.push(c));
        response.on("end", () =>
          resolve({ status: response.statusCode, headers: response.headers, body: Buffer.concat(chunks).toString("utf8") }),
        );
        response.on("error", reject);
      },
    );
    request.setTimeout(timeoutMs, () => request.destroy(new Error(`no answer in ${timeoutMs} ms`)));
    request.on("error", reject);
    request.end();
  });
}

function errorOf(body) {
  try {
    const error = JSON.parse(body).error;
    return error && typeof error === "object" ? error : {};
  } catch {
    return {};
  }
}

export class CredproxyClient {
  /**
   * @param {string} socketPath credproxy's Unix socket
   * @param {{retries?: number, maxWait?: number, timeoutMs?: number,
   *          onRetry?: (code: string, waitSeconds: number) => void}} [options]
   *   `retries`: how many more times a 503 is retried, each after its Retry-After (1 s if
   *   absent) capped at `maxWait` seconds.
   */
  constructor(socketPath, { retries = DEFAULT_RETRIES, maxWait = DEFAULT_MAX_WAIT, timeoutMs = 10_000, onRetry } = {}) {
    Object.assign(this, { socketPath, retries, maxWait, timeoutMs, onRetry });
  }

  /** The credential's secrets (only `fields` if given); `noCache` sends Cache-Control: no-cache. */
  async getCredential(id, { fields, noCache = false } = {}) {
    return (await this.read(id, { fields, noCache })).secrets;
  }

  /** The whole answer: `{id, secrets, metadata, expires_at, needs_reauth, cacheStatus}`. */
  async read(id, { fields, noCache = false } = {}) {
    let path = `/v1/credentials/${encodeURIComponent(id)}`;
    if (fields && fields.length) path += `?fields=${fields.map(encodeURIComponent).join(",")}`;
    const headers = noCache ? { "cache-control": "no-cache" } : {};
    for (let attempt = 0; ; attempt++) {
      const response = await get(this.socketPath, path, headers, this.timeoutMs);
      if (response.status === 200) {
        const body = JSON.parse(response.body);
        return { ...body, secrets: body.secrets ?? {}, cacheStatus: response.headers["cache-status"] };
      }
      const { code = "unknown", message = "", detail } = errorOf(response.body);
      const { status } = response;
      if (status === 503) {
        const parsed = Number(response.headers["retry-after"]);
        const after = response.headers["retry-after"] !== undefined && Number.isFinite(parsed) ? Math.max(0, parsed) : undefined;
        if (attempt < this.retries) {
          const wait = Math.min(after ?? 1, this.maxWait);
          this.onRetry?.(code, wait);
          await new Promise((r) => setTimeout(r, wait * 1000));
          continue;
        }
        throw new Unavailable(id, status, code, message, after);
      }
      if (status === 409 && code === "needs_reauth") throw new NeedsReauth(id, status, code, message);
      if (status === 409 && code === "credential_unusable") throw new CredentialUnusable(id, status, code, message, detail);
      if (status === 404) throw new NotFound(id, status, code, message);
      throw new CredproxyError(id, status, code, message, detail);
    }
  }
}

export const EXIT = { ok: 0, other: 1, needsReauth: 2, unusable: 3, notFound: 4, unavailable: 5 };

function parseArgs(argv) {
  const args = { socket: process.env.CREDPROXY_SOCKET, noCache: false, retries: DEFAULT_RETRIES, maxWait: DEFAULT_MAX_WAIT };
  const rest = [...argv];
  while (rest.length) {
    const arg = rest.shift();
    const value = () => {
      if (!rest.length) throw new Error(`${arg} needs a value`);
      return rest.shift();
    };
    const number = () => {
      const n = Number(value());
      if (!Number.isFinite(n) || n < 0) throw new Error(`${arg} needs a number >= 0`);
      return n;
    };
    if (arg === "--socket") args.socket = value();
    else if (arg === "--field") args.field = value();
    else if (arg === "--no-cache") args.noCache = true;
    else if (arg === "--retries") args.retries = Math.floor(number());
    else if (arg === "--max-wait") args.maxWait = number();
    else if (arg.startsWith("-")) throw new Error(`unknown option ${arg}`);
    else if (args.id === undefined) args.id = arg;
    else throw new Error("one credential id only");
  }
  if (!args.socket) throw new Error("--socket (or $CREDPROXY_SOCKET) is required");
  if (args.id === undefined) throw new Error("the credential id is required");
  return args;
}

export async function main(argv) {
  const say = (text) => process.stderr.write(`credproxy-client: ${text}\n`);
  let args;
  try {
    args = parseArgs(argv);
  } catch (e) {
    say(`${e.message}\nusage: credproxy-client.mjs --socket PATH [--field NAME] [--no-cache] [--retries N] [--max-wait SECONDS] ID`);
    return EXIT.other;
  }
  const client = new CredproxyClient(args.socket, {
    retries: args.retries,
    maxWait: args.maxWait,
    onRetry: (code, wait) => say(`503 ${code}; retrying in ${wait}s`),
  });
  let credential;
  try {
    credential = await client.read(args.id, { fields: args.field ? [args.field] : undefined, noCache: args.noCache });
  } catch (e) {
    if (e instanceof NeedsReauth) {
      say(`credential ${e.credentialId} needs_reauth: the user must reconnect the account`);
      return EXIT.needsReauth;
    }
    if (e instanceof CredentialUnusable) {
      say(`credential ${e.credentialId} credential_unusable: ${e.detail ?? e.apiMessage}`);
      return EXIT.unusable;
    }
    if (e instanceof NotFound) {
      say(`credential ${e.credentialId} not found (${e.code})`);
      return EXIT.notFound;
    }
    if (e instanceof Unavailable) {
      say(`credential ${e.credentialId} unavailable after ${args.retries} retries: ${e.code} (Retry-After: ${e.retryAfter})`);
      return EXIT.unavailable;
    }
    if (e instanceof CredproxyError) say(e.message);
    else say(`cannot reach credproxy at ${args.socket}: ${e.message}`);
    return EXIT.other;
  }
  if (credential.needs_reauth) {
    say(`warning: credential ${credential.id} needs re-authorisation; its token works until ${credential.expires_at}`);
  }
  say(`credential ${credential.id} (${credential.cacheStatus ?? "no cache status"})`);
  if (args.field) {
    const value = credential.secrets[args.field];
    if (value === undefined) {
      say(`credential ${credential.id} has no field ${JSON.stringify(args.field)}`);
      return EXIT.other;
    }
    process.stdout.write(`${value}\n`);
  } else {
    for (const name of Object.keys(credential.secrets).sort()) process.stdout.write(`${name}\n`);
  }
  return EXIT.ok;
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  process.exitCode = await main(process.argv.slice(2));
}
