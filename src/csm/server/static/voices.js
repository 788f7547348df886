// Voices: the picker (saved voices and speaker numbers from GET /v1/voices) and the "Add a voice" form, with a
// clip from a file or from the microphone, saved through POST /v1/voices.

import { api, errorOf, json } from "./api.js";
import { clock, wav } from "./player.js";

const $ = (id) => document.getElementById(id);
const MAX_RECORD_SECONDS = 60; // the server's default upload limit
const SPEAKERS = ["0", "1"]; // csm-1b's conversations use speakers 0 and 1; any number works

// Fill a <select> with the speaker numbers and saved voices, keeping its choice where it still exists.
export function fillVoices(select, list, chosen = select.value) {
  select.replaceChildren();
  const group = (label, items) => {
    const node = document.createElement("optgroup");
    node.label = label;
    for (const [value, text] of items) node.append(new Option(text, value));
    select.append(node);
  };
  group("Speakers", SPEAKERS.map((n) => [n, `Speaker ${n}`]));
  if (list.voices.length) group("Saved voices", list.voices.map((v) => [v.id, v.name]));
  if ([...select.options].some((o) => o.value === chosen)) select.value = chosen;
}

export async function loadVoices() {
  return json(await api("/v1/voices"));
}

// Mono float audio of an encoded clip (what the browser can decode: a MediaRecorder's webm/ogg, mp3, ...).
async function decode(blob) {
  const ctx = new OfflineAudioContext(1, 1, 48000);
  const buffer = await ctx.decodeAudioData(await blob.arrayBuffer());
  const mono = new Float32Array(buffer.length);
  for (let c = 0; c < buffer.numberOfChannels; c++) {
    const channel = buffer.getChannelData(c);
    for (let i = 0; i < mono.length; i++) mono[i] += channel[i] / buffer.numberOfChannels;
  }
  return { samples: mono, rate: buffer.sampleRate };
}

// The "Add a voice" form. `saved(name)` runs after the server saved a voice.
export function setupVoiceForm(saved) {
  const form = $("voice-form");
  const file = $("voice-file");
  const recordButton = $("record");
  const preview = $("clip-preview");
  const status = $("voice-status");
  const error = $("voice-error");
  let recorded = null; // a WAV Blob from the microphone
  let recorder = null;
  let timer = null;

  const showError = (message) => {
    error.textContent = message;
    error.hidden = !message;
  };
  const showClip = (blob) => {
    if (preview.src) URL.revokeObjectURL(preview.src);
    preview.src = blob ? URL.createObjectURL(blob) : "";
    preview.hidden = !blob;
  };

  file.addEventListener("change", () => {
    recorded = null;
    $("record-time").textContent = "";
    file.nextElementSibling.textContent = file.files[0]?.name || "Choose a file…";
    showClip(file.files[0] || null);
  });

  // Recording needs a secure context: https, or http on localhost.
  if (!navigator.mediaDevices?.getUserMedia || typeof MediaRecorder === "undefined") {
    recordButton.disabled = true;
    recordButton.title = "Recording needs https or localhost, and a browser with MediaRecorder";
  }

  const stopRecording = () => recorder?.state === "recording" && recorder.stop();

  recordButton.addEventListener("click", async () => {
    if (recorder?.state === "recording") return stopRecording();
    showError("");
    let stream;
    try {
      stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    } catch (e) {
      return showError(`The microphone is not available (${e.message || e.name}).`);
    }
    const parts = [];
    recorder = new MediaRecorder(stream);
    recorder.addEventListener("dataavailable", (event) => event.data.size && parts.push(event.data));
    recorder.addEventListener("stop", async () => {
      clearInterval(timer);
      stream.getTracks().forEach((track) => track.stop());
      recordButton.textContent = "Record again";
      recordButton.classList.remove("recording");
      try {
        const { samples, rate } = await decode(new Blob(parts, { type: recorder.mimeType }));
        recorded = wav(samples, rate); // the server reads WAV; browsers record webm or ogg
        file.value = "";
        file.nextElementSibling.textContent = "Choose a file…";
        $("record-time").textContent = `recorded ${clock(samples.length / rate)}`;
        showClip(recorded);
      } catch (e) {
        showError(`The recording could not be read (${e.message}).`);
      }
    });
    const started = performance.now();
    recorder.start(250);
    recordButton.textContent = "Stop recording";
    recordButton.classList.add("recording");
    timer = setInterval(() => {
      const seconds = (performance.now() - started) / 1000;
      $("record-time").textContent = `recording ${clock(seconds)}`;
      if (seconds >= MAX_RECORD_SECONDS) stopRecording();
    }, 100);
  });

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    showError("");
    const name = $("voice-name").value.trim();
    const transcript = $("voice-transcript").value.trim();
    const clip = recorded || file.files[0];
    if (!name) return showError("Give the voice a name.");
    if (!clip) return showError("Choose an audio file or record a clip.");
    if (!transcript) return showError("Write the words spoken in the clip.");
    const body = new FormData();
    body.append("audio_file", clip, recorded ? "recording.wav" : clip.name);
    body.append("name", name);
    body.append("transcript", transcript);
    body.append("speaker", $("voice-speaker").value || "0");
    $("save-voice").disabled = true;
    status.textContent = "Saving…";
    try {
      const response = await api("/v1/voices", { method: "POST", body });
      if (!response.ok) throw await errorOf(response);
      const created = await response.json();
      status.textContent = `Saved “${created.name}” (${created.seconds.toFixed(1)} s).`;
      form.reset();
      recorded = null;
      showClip(null);
      file.nextElementSibling.textContent = "Choose a file…";
      $("record-time").textContent = "";
      recordButton.textContent = "Record";
      await saved(created.name);
    } catch (e) {
      status.textContent = "";
      showError(e.message);
    } finally {
      $("save-voice").disabled = false;
    }
  });
}
