// The Dialogue card: rows of speaker + text, spoken turn by turn, each in the context of the turns before it
// (POST /v1/audio/dialogue with pcm over server-sent events), played as it comes; the row being heard is marked.

import { post, sentence } from "./api.js";
import { RATE, clock, wav } from "./player.js";
import { sampling, save, showError } from "./speak.js";
import { PlayerView, fromBase64, readEvents } from "./view.js";

const $ = (id) => document.getElementById(id);
const SPEAKERS = [0, 1, 2, 3];

export class DialogueCard {
  constructor() {
    this.view = new PlayerView(
      $("dialogue-player"),
      (state) => this.buttons(state),
      (played) => this.markPlaying(played),
    );
    this.voices = [];
    this.spoken = []; // the rows of the request in flight, in the order of its turns
    this.manifest = null;
    this.seed = null;
    this.count = 0; // rows ever made, for unique ids
    $("add-turn").addEventListener("click", () => this.addRow().querySelector("input").focus());
    $("dialogue-speak").addEventListener("click", () => this.speak());
    $("dialogue-stop").addEventListener("click", () => this.view.stop());
    $("dialogue-download").addEventListener("click", () => save(wav(this.view.player.audio(), RATE), `dialogue-${this.seed}.wav`));
    $("dialogue-manifest").addEventListener("click", () => {
      save(new Blob([JSON.stringify(this.manifest, null, 2)], { type: "application/json" }), `dialogue-${this.seed}.json`);
    });
    this.addRow(0);
    this.addRow(1);
  }

  rows() {
    return [...$("turns").children];
  }

  // A row: speaker, text, its times in the mix once made, and a remove button. Enter in the text adds a row.
  addRow(speaker, after = null) {
    const n = ++this.count;
    const last = this.rows().at(-1);
    if (speaker === undefined) speaker = last ? 1 - Math.min(1, Number(last.querySelector("select").value)) : 0;
    const row = document.createElement("li");
    row.className = "turn";
    row.innerHTML = `
      <label class="visually-hidden" for="turn-speaker-${n}">Speaker</label>
      <select id="turn-speaker-${n}" class="speaker"></select>
      <label class="visually-hidden" for="turn-text-${n}">Words</label>
      <input id="turn-text-${n}" class="words" autocomplete="off">
      <span class="when" aria-live="polite"></span>
      <button type="button" class="remove" aria-label="Remove this turn" title="Remove this turn">×</button>`;
    const select = row.querySelector("select");
    for (const s of SPEAKERS) select.append(new Option(`Speaker ${s}`, String(s)));
    select.value = String(speaker);
    select.addEventListener("change", () => this.renderBindings());
    const words = row.querySelector("input");
    words.placeholder = "What this speaker says…";
    words.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.ctrlKey && !event.metaKey) {
        event.preventDefault();
        this.addRow(undefined, row).querySelector("input").focus();
      }
    });
    row.querySelector(".remove").addEventListener("click", () => {
      if (this.rows().length > 1) row.remove();
      else words.value = "";
      this.renderBindings();
    });
    if (after) after.after(row);
    else $("turns").append(row);
    this.renderBindings();
    return row;
  }

  setVoices(list) {
    this.voices = list.voices;
    this.renderBindings();
  }

  // For each speaker in the dialogue, a picker of the saved voice it speaks with (its clips stay in context).
  renderBindings() {
    const box = $("bindings");
    const chosen = Object.fromEntries([...box.querySelectorAll("select")].map((s) => [s.dataset.speaker, s.value]));
    const used = [...new Set(this.rows().map((row) => row.querySelector("select").value))].sort();
    box.replaceChildren();
    for (const speaker of used) {
      const field = document.createElement("div");
      field.className = "field";
      field.innerHTML = `<label for="bind-${speaker}">Speaker ${speaker} sounds like</label><select id="bind-${speaker}"></select>`;
      const select = field.querySelector("select");
      select.dataset.speaker = speaker;
      select.append(new Option("no saved voice", ""));
      for (const voice of this.voices) select.append(new Option(voice.name, voice.id));
      if ([...select.options].some((o) => o.value === chosen[speaker])) select.value = chosen[speaker];
      box.append(field);
    }
  }

  buttons(state) {
    const busy = state !== "idle";
    $("dialogue-speak").disabled = busy;
    $("dialogue-stop").disabled = !busy;
    $("dialogue-download").disabled = busy || !this.view.player.samples;
    $("dialogue-manifest").disabled = busy || !this.manifest;
  }

  // Mark each spoken row: made (with its times) and the one being heard now.
  markPlaying(played) {
    for (const row of this.spoken) {
      const start = Number(row.dataset.start);
      const end = Number(row.dataset.end);
      row.classList.toggle("playing", row.dataset.end !== undefined && played >= start && played < end);
    }
  }

  async speak() {
    const view = this.view;
    if (view.state !== "idle") return;
    showError("dialogue-error", "");
    const rows = this.rows().filter((row) => row.querySelector("input").value.trim());
    if (!rows.length) return showError("dialogue-error", "Write at least one turn.");
    const turns = rows.map((row) => ({ speaker: Number(row.querySelector("select").value), text: row.querySelector("input").value }));
    const voices = {};
    for (const select of $("bindings").querySelectorAll("select")) if (select.value) voices[select.dataset.speaker] = select.value;
    const pause = Number($("pause").value || 0.3);
    const body = { model: "csm", turns, voices, pause, response_format: "pcm", stream_format: "sse", ...sampling() };
    for (const row of this.rows()) {
      row.classList.remove("made", "playing", "next");
      delete row.dataset.start;
      delete row.dataset.end;
      row.querySelector(".when").textContent = "";
    }
    this.spoken = rows;
    this.manifest = null;
    this.seed = body.seed;
    rows[0].classList.add("next");
    const started = performance.now();
    try {
      const signal = await view.begin();
      const response = await post("/v1/audio/dialogue", body, signal);
      view.state = "generating";
      view.status(`Speaking turn 1 of ${rows.length} (seed ${body.seed})…`);
      await readEvents(response, (event) => this.onEvent(event, rows));
      const seconds = (performance.now() - started) / 1000;
      view.status(`Made ${view.player.received.toFixed(1)} s of dialogue in ${seconds.toFixed(1)} s (seed ${body.seed}).`);
    } catch (e) {
      showError("dialogue-error", view.failed(e));
    } finally {
      rows.forEach((row) => row.classList.remove("next"));
      view.end();
    }
  }

  onEvent(event, rows) {
    if (event.type === "dialogue.audio.delta") this.view.player.push(fromBase64(event.audio));
    else if (event.type === "dialogue.turn.done") {
      const turn = event.turn;
      const row = rows[turn.index];
      if (!row) return;
      row.classList.remove("next");
      row.classList.add("made");
      row.dataset.start = turn.start;
      row.dataset.end = turn.end;
      row.querySelector(".when").textContent = `${clock(turn.start)}–${clock(turn.end)}`;
      const next = rows[turn.index + 1];
      if (next) {
        next.classList.add("next");
        this.view.status(`Speaking turn ${turn.index + 2} of ${rows.length} (seed ${this.seed})…`);
      }
    } else if (event.type === "dialogue.done") this.manifest = event.manifest;
    else if (event.type === "error") throw new Error(sentence(event.error?.message || "the dialogue failed"));
  }
}
