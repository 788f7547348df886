// Talking to the server: the API key (kept in this tab's sessionStorage), errors in plain words.

const KEY = "csm.apiKey";
let onUnauthorized = () => {};

export function setKey(key) {
  if (key) sessionStorage.setItem(KEY, key);
  else sessionStorage.removeItem(KEY);
}

export function whenUnauthorized(callback) {
  onUnauthorized = callback;
}

// fetch() with the bearer token; a 401 (no key, or a wrong one) sends the page back to the key form.
export async function api(path, init = {}) {
  const headers = new Headers(init.headers || {});
  const key = sessionStorage.getItem(KEY);
  if (key) headers.set("Authorization", `Bearer ${key}`);
  let response;
  try {
    response = await fetch(path, { ...init, headers });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new Error("Cannot reach the server. Is `csm serve` still running?");
  }
  if (response.status === 401) onUnauthorized();
  return response;
}

// POST a JSON body; the response once it is ok, else the server's error thrown as an Error.
export async function post(path, body, signal) {
  const response = await api(path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
    signal,
  });
  if (!response.ok) throw await errorOf(response);
  return response;
}

// The server's message from OpenAI's error JSON `{"error": {"message": ...}}`, as a sentence.
export async function errorOf(response) {
  let message = "";
  try {
    message = (await response.json())?.error?.message || "";
  } catch {
    // not JSON: a proxy's page, say; fall back to the status line
  }
  if (!message) message = `the server answered ${response.status} ${response.statusText}`.trim();
  return new Error(sentence(message));
}

export function sentence(text) {
  text = text.trim();
  text = text.charAt(0).toUpperCase() + text.slice(1);
  return /[.!?]$/.test(text) ? text : text + ".";
}

// The JSON body of a successful response, or the server's error thrown as an Error.
export async function json(response) {
  if (!response.ok) throw await errorOf(response);
  return response.json();
}
