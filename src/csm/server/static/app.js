// The page of `csm serve`: speak text while it is generated, download it, add voices, watch the server's load.

import { api, errorOf, json, setKey, whenUnauthorized } from "./api.js";
import { StreamPlayer, RATE, clock, int16, wav } from "./player.js";
import { fillVoices, loadVoices, setupVoiceForm } from "./voices.js";

const $ = (id) => document.getElementById(id);
const player = new StreamPlayer();
let request = null; // the AbortController of the request in flight
let last = null; // the body of the last spoken request, for the download
let started = 0;

// ---- what the page shows ------------------------------------------------------------------------------

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function setStatus(text) {
  $("status").textContent = text;
}

// Buttons and the player's numbers follow the state: idle, waiting, generating, playing.
function setState(state) {
  $("player").dataset.state = state;
  const busy = state !== "idle";
  $("speak").disabled = busy;
  $("stop").disabled = !busy;
  $("download").disabled = busy || !last || !player.samples;
}

function tick() {
  const received = player.received;
  const played = Math.min(player.played, received);
  const box = $("player");
  box.dataset.received = received.toFixed(3);
  box.dataset.played = played.toFixed(3);
  const bar = $("bar");
  const total = Math.max(received, 1e-9);
  bar.querySelector(".received").style.width = received ? "100%" : "0";
  bar.querySelector(".played").style.width = `${(100 * played) / total}%`;
  bar.setAttribute("aria-valuemax", received.toFixed(1));
  bar.setAttribute("aria-valuenow", played.toFixed(1));
  $("clock").textContent = `${clock(played)} / ${clock(received)}`;
  const state = box.dataset.state;
  if (state === "playing" && !player.playing) {
    setState("idle");
  }
  if (state !== "idle") requestAnimationFrame(tick);
}

// ---- speaking ------------------------------------------------------------------------------------------

function number(id) {
  const value = $(id).value.trim();
  return value === "" ? null : Number(value);
}

function requestBody() {
  const input = $("text").value;
  if (!input.trim()) throw new Error("Type some text to speak.");
  if ($("seed-random").checked) $("seed").value = Math.floor(Math.random() * 1_000_000);
  const body = { model: "csm", input, voice: $("voice").value, seed: number("seed") };
  const temperature = number("temperature");
  const topK = number("top-k");
  if (temperature !== null) body.temperature = temperature;
  if (topK !== null) body.top_k = topK;
  return body;
}

async function speak() {
  if (request) return;
  showError("");
  let body;
  try {
    body = requestBody();
  } catch (e) {
    return showError(e.message);
  }
  request = new AbortController();
  last = body;
  started = performance.now();
  setState("waiting");
  setStatus("Waiting for the server…");
  requestAnimationFrame(tick);
  try {
    await player.begin();
    const response = await api("/v1/audio/speech", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ ...body, response_format: "pcm" }),
      signal: request.signal,
    });
    if (!response.ok) throw await errorOf(response);
    const reader = response.body.getReader();
    setState("generating");
    setStatus(`Generating (seed ${body.seed})…`);
    for (;;) {
      let part;
      try {
        part = await reader.read();
      } catch (e) {
        if (e.name === "AbortError") throw e;
        throw new Error("The audio stopped early: the server ended the transfer (its log says why).");
      }
      if (part.done) break;
      player.push(part.value);
    }
    const seconds = (performance.now() - started) / 1000;
    setStatus(`Made ${player.received.toFixed(1)} s of audio in ${seconds.toFixed(1)} s (seed ${body.seed}).`);
    setState(player.playing ? "playing" : "idle");
  } catch (e) {
    player.stop();
    setState("idle");
    if (e.name === "AbortError") setStatus(`Stopped after ${player.received.toFixed(1)} s of audio.`);
    else {
      setStatus("Ready.");
      showError(e.message);
    }
  } finally {
    request = null;
    tick();
  }
}

function stop() {
  if (request) request.abort(); // the server sees the disconnect and frees the row
  else if (player.playing) {
    player.stop();
    setStatus("Stopped.");
  }
  setState("idle");
}

// wav and pcm: the audio that was heard. Other formats: the same request (same seed) again in that format.
async function download() {
  const format = $("format").value;
  const name = `csm-${last.seed}.${format}`;
  showError("");
  let blob;
  if (format === "wav") blob = wav(player.audio(), RATE);
  else if (format === "pcm") blob = new Blob([int16(player.audio())], { type: "audio/pcm" });
  else {
    $("download").disabled = true;
    setStatus(`Making ${name}…`);
    try {
      const response = await api("/v1/audio/speech", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ ...last, response_format: format }),
      });
      if (!response.ok) throw await errorOf(response);
      blob = await response.blob();
    } catch (e) {
      showError(e.message);
      setStatus("Ready.");
      return;
    } finally {
      $("download").disabled = false;
    }
  }
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = name;
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 60_000);
  $("download").dataset.bytes = blob.size;
  setStatus(`Saved ${name} (${(blob.size / 1024).toFixed(0)} kB).`);
}

// ---- the server's health, in the corner ---------------------------------------------------------------

async function pollHealth() {
  const box = $("health");
  try {
    const health = await (await fetch("/health")).json();
    const s = health.scheduler;
    const load = `${s.active} of ${s.max_batch_size} rows busy` + (s.waiting ? ` · ${s.waiting} waiting` : "");
    const words = { ok: "Ready", draining: "Shutting down", unavailable: "Not serving" }[health.status];
    $("health-text").textContent = `${words} · ${load}`;
    box.dataset.status = health.status === "ok" ? (s.active ? "busy" : "ok") : "down";
    box.title = `${health.model}: ${s.completed} completed, ${s.cancelled} cancelled, ${s.failed} failed`;
  } catch {
    $("health-text").textContent = "Server unreachable";
    box.dataset.status = "down";
    box.title = "";
  }
  setTimeout(pollHealth, document.hidden ? 10_000 : 2_000);
}

// ---- start: ask for the key when the server wants one; show nothing else until then --------------------

function showApp(shown) {
  $("app").hidden = !shown;
  $("health").hidden = !shown;
  $("key-form").hidden = shown;
  if (!shown) $("key").focus();
}

async function refreshVoices(chosen) {
  fillVoices($("voice"), await loadVoices(), chosen);
}

async function start() {
  whenUnauthorized(() => {
    stop();
    setKey(null);
    showApp(false);
  });
  const response = await api("/v1/voices");
  if (response.status === 401) return; // the key form is showing
  await enter(response);
}

async function enter(voicesResponse) {
  try {
    fillVoices($("voice"), await json(voicesResponse));
  } catch (e) {
    showError(e.message);
  }
  showApp(true);
  if (!$("health").dataset.polling) {
    $("health").dataset.polling = "1";
    pollHealth();
  }
}

$("key-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const key = $("key").value.trim();
  $("key-error").hidden = true;
  if (!key) return;
  setKey(key);
  const response = await api("/v1/voices");
  if (response.status === 401) {
    $("key-error").textContent = "That key was not accepted.";
    $("key-error").hidden = false;
    return;
  }
  $("key").value = "";
  await enter(response);
});

$("speak-form").addEventListener("submit", (event) => {
  event.preventDefault();
  speak();
});
$("stop").addEventListener("click", stop);
$("download").addEventListener("click", download);
$("seed-random").addEventListener("change", () => ($("seed").disabled = $("seed-random").checked));
$("text").addEventListener("input", () => {
  const n = $("text").value.length;
  $("count").textContent = `${n} character${n === 1 ? "" : "s"}`;
});
document.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey) && !$("app").hidden) {
    event.preventDefault();
    if (event.target.closest?.("#voice-form")) return;
    speak();
  } else if (event.key === "Escape" && $("player").dataset.state !== "idle") {
    stop();
  }
});
setupVoiceForm((name) => refreshVoices(name));
start().catch((e) => showError(e.message));
