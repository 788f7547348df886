// The page of `csm serve`: the API-key prompt, the cards (speak, dialogue, voices), the health corner, keys.

import { api, json, setKey, whenUnauthorized } from "./api.js";
import { DialogueCard } from "./dialogue.js";
import { SpeakCard, showError } from "./speak.js";
import { fillVoices, loadVoices, setupVoiceForm } from "./voices.js";

const $ = (id) => document.getElementById(id);
const speak = new SpeakCard();
const dialogue = new DialogueCard();

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

// ---- voices: one list for every picker ----------------------------------------------------------------

function showVoices(list, chosen) {
  fillVoices($("voice"), list, chosen);
  dialogue.setVoices(list);
}

async function refreshVoices(chosen) {
  showVoices(await loadVoices(), chosen);
}

// ---- start: ask for the key when the server wants one; show nothing else until then --------------------

function showApp(shown) {
  $("app").hidden = !shown;
  $("health").hidden = !shown;
  $("key-form").hidden = shown;
  if (!shown) $("key").focus();
}

async function enter(voicesResponse) {
  try {
    showVoices(await json(voicesResponse));
  } catch (e) {
    showError("error", e.message);
  }
  showApp(true);
  if (!$("health").dataset.polling) {
    $("health").dataset.polling = "1";
    pollHealth();
  }
}

async function start() {
  whenUnauthorized(() => {
    speak.view.stop();
    dialogue.view.stop();
    setKey(null);
    showApp(false);
  });
  const response = await api("/v1/voices");
  if (response.status !== 401) await enter(response); // on 401 the key form is showing
}

$("key-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const key = $("key").value.trim();
  $("key-error").hidden = true;
  if (!key) return;
  setKey(key);
  const response = await api("/v1/voices");
  if (response.status === 401) {
    showError("key-error", "That key was not accepted.");
    return;
  }
  $("key").value = "";
  await enter(response);
});

// Ctrl+Enter speaks (the dialogue when the focus is in its card), Esc stops whatever plays.
document.addEventListener("keydown", (event) => {
  if ($("app").hidden) return;
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
    event.preventDefault();
    if (event.target.closest?.("#dialogue-card")) dialogue.speak();
    else if (!event.target.closest?.("#voice-form")) speak.speak();
  } else if (event.key === "Escape") {
    speak.view.stop();
    dialogue.view.stop();
  }
});

setupVoiceForm((name) => refreshVoices(name));
start().catch((e) => showError("error", e.message));
