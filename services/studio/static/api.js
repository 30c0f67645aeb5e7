// The studio's HTTP JSON API (services/studio/API.md): every call carries the annotator's token
// (Authorization: Bearer, where the studio has authentication) or their name (X-Annotator).

const NAME_KEY = "studio.annotator";
const TOKEN_KEY = "studio.token";

export class ApiError extends Error {
  constructor(status, detail) {
    super(typeof detail === "string" ? detail : JSON.stringify(detail));
    this.status = status;
    this.detail = detail;
  }
}

/** A readable line for an API error ({"detail": ...}, or FastAPI's list of field errors). */
export function describeError(err) {
  if (!(err instanceof ApiError)) return String(err && err.message ? err.message : err);
  const d = err.detail;
  if (Array.isArray(d)) {
    return `${err.status}: ` + d.map((e) => `${(e.loc || []).join(".")}: ${e.msg}`).join("; ");
  }
  return `${err.status}: ${typeof d === "string" ? d : JSON.stringify(d)}`;
}

export function annotator() {
  return sessionStorage.getItem(NAME_KEY);
}

export function setAnnotator(name, token) {
  if (name) sessionStorage.setItem(NAME_KEY, name);
  else sessionStorage.removeItem(NAME_KEY);
  if (name && token) sessionStorage.setItem(TOKEN_KEY, token);
  else sessionStorage.removeItem(TOKEN_KEY);
}

/** Parse a Server-Timing header ("decoder;dur=31.2, total;dur=38") into {name: ms}. */
export function parseServerTiming(header) {
  const out = {};
  if (!header) return out;
  for (const part of header.split(",")) {
    const [name, ...params] = part.trim().split(";");
    if (!name) continue;
    for (const p of params) {
      const [k, v] = p.trim().split("=");
      if (k === "dur") out[name.trim()] = parseFloat(v);
    }
  }
  return out;
}

async function request(method, path, body, { raw = false } = {}) {
  const headers = {};
  const name = annotator();
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers["Authorization"] = `Bearer ${token}`;
  else if (name) headers["X-Annotator"] = encodeURIComponent(name); // header values are Latin-1: percent-encoded
  const init = { method, headers };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(path, init);
  } catch (e) {
    throw new ApiError(0, `the studio cannot be reached (${e.message})`);
  }
  if (!res.ok) {
    let detail = res.statusText || `HTTP ${res.status}`;
    try {
      const j = await res.json();
      if (j && j.detail !== undefined) detail = j.detail;
    } catch (_) { /* not JSON */ }
    throw new ApiError(res.status, detail);
  }
  if (raw) return res;
  const data = await res.json();
  return { data, headers: res.headers };
}

const json = async (...args) => (await request(...args)).data;
const item = (id) => `/api/items/${encodeURIComponent(id)}`;

export const api = {
  config: () => json("GET", "/api/config"),
  /** {name} where the studio signs in by name, {token} where it has authentication. */
  signin: (credentials) => json("POST", "/api/signin", credentials),
  queue: () => json("GET", "/api/queue"),
  next: () => json("POST", "/api/next"),
  heartbeat: (id, token) => json("POST", `${item(id)}/heartbeat`, { lease_token: token }),
  release: (id, token) => json("POST", `${item(id)}/release`, { lease_token: token }),
  submit: (id, body) => json("POST", `${item(id)}/submit`, body),
  annotators: () => json("GET", "/api/annotators"),
  /** The predict answer, plus the Server-Timing figures. */
  predict: async (id, body) => {
    const { data, headers } = await request("POST", `${item(id)}/predict`, body);
    return { ...data, server_timing: parseServerTiming(headers.get("Server-Timing")) };
  },
  /** The item's image as an ImageBitmap (fetched with the annotator header). */
  image: async (url) => {
    const res = await request("GET", url, undefined, { raw: true });
    return createImageBitmap(await res.blob());
  },
};
