// The Speak card: text in, audio played while it is generated (POST /v1/audio/speech, pcm), and its download.

import { post } from "./api.js";
import { RATE, int16, wav } from "./player.js";
import { PlayerView, readBody } from "./view.js";

const $ = (id) => document.getElementById(id);

function number(id) {
  const value = $(id).value.trim();
  return value === "" ? null : Number(value);
}

// Sampling settings shared by the Speak and Dialogue cards; "random" draws a new seed and shows it.
export function sampling() {
  if ($("seed-random").checked) $("seed").value = Math.floor(Math.random() * 1_000_000);
  const body = { seed: number("seed") };
  const temperature = number("temperature");
  const topK = number("top-k");
  if (temperature !== null) body.temperature = temperature;
  if (topK !== null) body.top_k = topK;
  return body;
}

export function showError(id, message) {
  $(id).textContent = message;
  $(id).hidden = !message;
}

export class SpeakCard {
  constructor() {
    this.view = new PlayerView($("player"), (state) => this.buttons(state));
    this.last = null; // the body of the last spoken request, for the download
    $("speak-form").addEventListener("submit", (event) => {
      event.preventDefault();
      this.speak();
    });
    $("stop").addEventListener("click", () => this.view.stop());
    $("download").addEventListener("click", () => this.download());
    $("seed-random").addEventListener("change", () => ($("seed").disabled = $("seed-random").checked));
    $("text").addEventListener("input", () => {
      const n = $("text").value.length;
      $("count").textContent = `${n} character${n === 1 ? "" : "s"}`;
    });
  }

  buttons(state) {
    const busy = state !== "idle";
    $("speak").disabled = busy;
    $("stop").disabled = !busy;
    $("download").disabled = busy || !this.last || !this.view.player.samples;
  }

  async speak() {
    const view = this.view;
    if (view.state !== "idle") return;
    showError("error", "");
    const input = $("text").value;
    if (!input.trim()) return showError("error", "Type some text to speak.");
    const body = { model: "csm", input, voice: $("voice").value, ...sampling() };
    this.last = body;
    const started = performance.now();
    try {
      const signal = await view.begin();
      const response = await post("/v1/audio/speech", { ...body, response_format: "pcm" }, signal);
      view.state = "generating";
      view.status(`Generating (seed ${body.seed})…`);
      await readBody(response, (bytes) => view.player.push(bytes));
      const seconds = (performance.now() - started) / 1000;
      view.status(`Made ${view.player.received.toFixed(1)} s of audio in ${seconds.toFixed(1)} s (seed ${body.seed}).`);
    } catch (e) {
      showError("error", view.failed(e));
    } finally {
      view.end();
    }
  }

  // wav and pcm: the audio that was heard. Other formats: the same request (same seed) again in that format.
  async download() {
    const format = $("format").value;
    const name = `csm-${this.last.seed}.${format}`;
    const audio = this.view.player.audio();
    showError("error", "");
    let blob;
    if (format === "wav") blob = wav(audio, RATE);
    else if (format === "pcm") blob = new Blob([int16(audio)], { type: "audio/pcm" });
    else {
      $("download").disabled = true;
      this.view.status(`Making ${name}…`);
      try {
        const response = await post("/v1/audio/speech", { ...this.last, response_format: format });
        blob = await response.blob();
      } catch (e) {
        showError("error", e.message);
        this.view.status("Ready.");
        return;
      } finally {
        $("download").disabled = false;
      }
    }
    save(blob, name);
    $("download").dataset.bytes = blob.size;
    this.view.status(`Saved ${name} (${(blob.size / 1024).toFixed(0)} kB).`);
  }
}

// Offer a Blob as a file download.
export function save(blob, name) {
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = name;
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 60_000);
}
