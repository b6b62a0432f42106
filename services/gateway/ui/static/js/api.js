// The JSON API, as the CLI uses it: sign in with POST /api/v1/auth/login, then every call carries
// `Authorization: Bearer <token>`. The token lives in sessionStorage (this tab, until it closes or signs out).
import { SSEParser } from "./sse.js";

const TOKEN = "kiln.token";
const USER = "kiln.user";

export class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

export function signedIn() {
  const token = sessionStorage.getItem(TOKEN);
  const user = sessionStorage.getItem(USER);
  return token && user ? { token, ...JSON.parse(user) } : null;
}

function forget() {
  sessionStorage.removeItem(TOKEN);
  sessionStorage.removeItem(USER);
}

// Called when the API answers 401 (token expired or revoked): main.js shows the sign-in form.
let onSignedOut = () => {};
export function whenSignedOut(fn) { onSignedOut = fn; }

function url(path, params) {
  const u = new URL(path, location.origin);
  for (const [key, value] of Object.entries(params || {})) {
    if (value === undefined || value === null || value === "") continue;
    for (const v of Array.isArray(value) ? value : [value]) u.searchParams.append(key, String(v));
  }
  return u;
}

function headers(extra) {
  const h = { ...extra };
  const token = sessionStorage.getItem(TOKEN);
  if (token) h.Authorization = `Bearer ${token}`;
  return h;
}

// The error an answer carries (schemas.api.ErrorBody: `detail` says what went wrong), as an ApiError.
async function failure(resp) {
  let detail = `${resp.status} ${resp.statusText}`;
  try {
    const body = await resp.json();
    if (body && body.detail) detail = body.detail;
  } catch { /* not JSON: the status says it */ }
  if (resp.status === 401 && sessionStorage.getItem(TOKEN)) {
    forget();
    onSignedOut(detail);
  }
  return new ApiError(resp.status, detail);
}

async function send(method, path, { params, body, signal } = {}) {
  const init = { method, headers: headers({ Accept: "application/json" }), signal };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(url(path, params), init);
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, `the gateway did not answer (${err.message})`);
  }
  if (!resp.ok) throw await failure(resp);
  return resp.json();
}

export const get = (path, params, signal) => send("GET", path, { params, signal });
export const post = (path, body) => send("POST", path, { body });

export async function login(username, password) {
  const answer = await send("POST", "/api/v1/auth/login", { body: { username, password } });
  sessionStorage.setItem(TOKEN, answer.token);
  sessionStorage.setItem(USER, JSON.stringify({ username: answer.username, admin: answer.admin }));
  return answer;
}

export async function logout() {
  try {
    await post("/api/v1/auth/logout");
  } finally {
    forget();
  }
}

// Every page of a paged list route (limit/offset), concatenated.
export async function all(path, params = {}, pageSize = 1000) {
  const out = [];
  for (let offset = 0; ; offset += pageSize) {
    const page = await get(path, { ...params, limit: pageSize, offset });
    out.push(...page);
    if (page.length < pageSize) return out;
  }
}

// A download through fetch (a link cannot send the token): the answer as a blob, saved under the name the
// gateway gives in Content-Disposition.
export async function download(path, fallbackName) {
  const resp = await fetch(url(path), { headers: headers() });
  if (!resp.ok) throw await failure(resp);
  const blob = await resp.blob();
  const disposition = resp.headers.get("Content-Disposition") || "";
  const m = /filename="([^"]+)"/.exec(disposition);
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = m ? m[1] : fallbackName;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 60_000);
}

// Server-Sent Events through fetch and a ReadableStream (EventSource cannot send the Authorization header).
// Calls onEvent(event, data) per message until the stream ends or `signal` aborts; resolves when it ends.
export async function stream(path, onEvent, signal) {
  const resp = await fetch(url(path), { headers: headers({ Accept: "text/event-stream" }), signal });
  if (!resp.ok) throw await failure(resp);
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  const parser = new SSEParser();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    for (const msg of parser.push(value)) onEvent(msg.event, msg.data);
  }
}
