// A player box on the page (progress bar, status line, clock) bound to a StreamPlayer, and readers for the
// server's streamed responses (raw bytes, or server-sent events).

import { StreamPlayer, clock } from "./player.js";

// States: idle, waiting (for the server), generating (audio arriving and playing), playing (all arrived).
export class PlayerView {
  constructor(root, onState = () => {}, onTick = () => {}) {
    this.root = root;
    this.player = new StreamPlayer();
    this.onState = onState;
    this.onTick = onTick; // called with the seconds played, every animation frame while busy
    this.request = null; // the AbortController of the request in flight
    this.root.dataset.state = "idle";
  }

  get state() {
    return this.root.dataset.state;
  }

  set state(state) {
    const before = this.root.dataset.state;
    this.root.dataset.state = state;
    if (state !== "idle" && before === "idle") requestAnimationFrame(() => this.tick());
    this.onState(state);
  }

  status(text) {
    this.root.querySelector(".status").textContent = text;
  }

  // Start a request: a fresh player (from a click, so audio may start) and an AbortController for Stop.
  async begin() {
    this.request = new AbortController();
    this.state = "waiting";
    this.status("Waiting for the server…");
    await this.player.begin();
    return this.request.signal;
  }

  // The response has ended (or failed): keep playing what is queued, then go idle.
  end() {
    this.request = null;
    this.state = this.player.playing ? "playing" : "idle";
    this.tick();
  }

  // The request failed or was stopped midway: let go of the response, stop the audio, say so. Returns the
  // error message to show ("" when the user stopped it).
  failed(e) {
    this.request?.abort();
    this.player.stop();
    if (e.name === "AbortError") {
      this.status(`Stopped after ${this.player.received.toFixed(1)} s of audio.`);
      return "";
    }
    this.status("Ready.");
    return e.message;
  }

  stop() {
    if (this.request) this.request.abort(); // the server sees the disconnect and frees the row
    this.player.stop();
    if (this.state === "playing") this.status("Stopped.");
    this.request = null;
    this.state = "idle";
  }

  tick() {
    const received = this.player.received;
    const played = Math.min(this.player.played, received);
    this.root.dataset.received = received.toFixed(3);
    this.root.dataset.played = played.toFixed(3);
    const bar = this.root.querySelector(".bar");
    bar.querySelector(".received").style.width = received ? "100%" : "0";
    bar.querySelector(".played").style.width = `${(100 * played) / Math.max(received, 1e-9)}%`;
    bar.setAttribute("aria-valuemax", received.toFixed(1));
    bar.setAttribute("aria-valuenow", played.toFixed(1));
    this.root.querySelector(".clock").textContent = `${clock(played)} / ${clock(received)}`;
    this.onTick(played);
    if (this.state === "playing" && !this.player.playing) this.state = "idle";
    if (this.state !== "idle") requestAnimationFrame(() => this.tick());
  }
}

// Read a streamed body piece by piece; a transfer the server cut short is an error, not a short file.
export async function readBody(response, onBytes) {
  const reader = response.body.getReader();
  for (;;) {
    let part;
    try {
      part = await reader.read();
    } catch (e) {
      if (e.name === "AbortError") throw e;
      throw new Error("The audio stopped early: the server ended the transfer (its log says why).");
    }
    if (part.done) return;
    onBytes(part.value);
  }
}

// Read server-sent events (`data: {json}` blocks) and hand each parsed event to `onEvent`.
export async function readEvents(response, onEvent) {
  const decoder = new TextDecoder();
  let text = "";
  await readBody(response, (bytes) => {
    text += decoder.decode(bytes, { stream: true }).replace(/\r\n?/g, "\n");
    let end;
    while ((end = text.indexOf("\n\n")) >= 0) {
      const block = text.slice(0, end);
      text = text.slice(end + 2);
      const data = block
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trimStart())
        .join("\n");
      if (data) onEvent(JSON.parse(data));
    }
  });
}

// Base64 to bytes.
export function fromBase64(text) {
  const raw = atob(text);
  const bytes = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
  return bytes;
}
