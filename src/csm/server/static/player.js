// Plays raw 24 kHz s16le PCM while it arrives: each network piece becomes an AudioBuffer scheduled right after
// the one before, so playback starts with the first audio and has no gaps while the server keeps up.

export const RATE = 24000;

export class StreamPlayer {
  constructor() {
    this.ctx = null;
    this.reset();
  }

  reset() {
    this.sources = [];
    this.pieces = []; // Float32Array pieces: all audio received, for the download
    this.samples = 0;
    this.odd = null; // a byte of a sample split across two network pieces
    this.next = 0; // context time at which the next piece starts
    this.segments = []; // [start, duration] of each scheduled piece, for the played time
    this.stoppedAt = null;
    this.lead = 0.15; // seconds queued before playing; doubled after each underrun, so stutters get rarer
  }

  // Call from a click: browsers start audio only after a user gesture.
  async begin() {
    if (!this.ctx) {
      try {
        this.ctx = new AudioContext({ sampleRate: RATE, latencyHint: "playback" });
      } catch {
        this.ctx = new AudioContext(); // buffers at 24 kHz are resampled by the browser
      }
    }
    if (this.ctx.state === "suspended") await this.ctx.resume();
    this.stop();
    this.reset();
  }

  push(bytes) {
    let data = bytes;
    if (this.odd !== null) {
      data = new Uint8Array(bytes.length + 1);
      data[0] = this.odd;
      data.set(bytes, 1);
      this.odd = null;
    }
    if (data.length % 2) {
      this.odd = data[data.length - 1];
      data = data.subarray(0, data.length - 1);
    }
    if (!data.length) return;
    const view = new DataView(data.buffer, data.byteOffset, data.length);
    const floats = new Float32Array(data.length / 2);
    for (let i = 0; i < floats.length; i++) floats[i] = view.getInt16(2 * i, true) / 32768;
    this.pieces.push(floats);
    this.samples += floats.length;
    if (this.stoppedAt === null) this.schedule(floats);
  }

  schedule(floats) {
    const ctx = this.ctx;
    const buffer = ctx.createBuffer(1, floats.length, RATE);
    buffer.copyToChannel(floats, 0);
    const source = ctx.createBufferSource();
    source.buffer = buffer;
    source.connect(ctx.destination);
    let at = this.next;
    if (at < ctx.currentTime + 0.02) {
      if (this.next) this.lead = Math.min(2 * this.lead, 2); // an underrun: wait for more next time
      at = ctx.currentTime + this.lead;
    }
    source.start(at);
    this.next = at + buffer.duration;
    this.segments.push([at, buffer.duration]);
    this.sources.push(source);
    source.onended = () => {
      const index = this.sources.indexOf(source);
      if (index >= 0) this.sources.splice(index, 1);
    };
  }

  // Seconds of audio received so far.
  get received() {
    return this.samples / RATE;
  }

  // Seconds of audio played so far.
  get played() {
    if (!this.ctx) return 0;
    const now = this.stoppedAt ?? this.ctx.currentTime;
    let total = 0;
    for (const [at, duration] of this.segments) {
      if (now <= at) break;
      total += Math.min(duration, now - at);
    }
    return total;
  }

  get playing() {
    return this.ctx !== null && this.stoppedAt === null && this.ctx.currentTime < this.next;
  }

  // Seconds until what was scheduled has played.
  get remaining() {
    return this.playing ? this.next - this.ctx.currentTime : 0;
  }

  stop() {
    if (this.ctx && this.stoppedAt === null) this.stoppedAt = this.ctx.currentTime;
    for (const source of this.sources) {
      try {
        source.stop();
      } catch {
        // not started yet or already stopped
      }
    }
    this.sources = [];
  }

  // All audio received, as one Float32Array.
  audio() {
    const out = new Float32Array(this.samples);
    let offset = 0;
    for (const piece of this.pieces) {
      out.set(piece, offset);
      offset += piece.length;
    }
    return out;
  }
}

// 16-bit little-endian samples of float audio (exact for audio that came as 16-bit).
export function int16(samples) {
  const out = new Int16Array(samples.length);
  for (let i = 0; i < samples.length; i++) out[i] = Math.max(-32768, Math.min(32767, Math.round(samples[i] * 32768)));
  return out;
}

// A mono 16-bit WAV file of float audio.
export function wav(samples, rate) {
  const pcm = int16(samples);
  const header = new DataView(new ArrayBuffer(44));
  const text = (offset, s) => [...s].forEach((c, i) => header.setUint8(offset + i, c.charCodeAt(0)));
  text(0, "RIFF");
  header.setUint32(4, 36 + pcm.byteLength, true);
  text(8, "WAVE");
  text(12, "fmt ");
  header.setUint32(16, 16, true); // fmt chunk size
  header.setUint16(20, 1, true); // PCM
  header.setUint16(22, 1, true); // mono
  header.setUint32(24, rate, true);
  header.setUint32(28, rate * 2, true); // bytes per second
  header.setUint16(32, 2, true); // bytes per frame
  header.setUint16(34, 16, true); // bits per sample
  text(36, "data");
  header.setUint32(40, pcm.byteLength, true);
  return new Blob([header, pcm], { type: "audio/wav" });
}

// Time as m:ss.s
export function clock(seconds) {
  const m = Math.floor(seconds / 60);
  const s = (seconds - 60 * m).toFixed(1).padStart(4, "0");
  return `${m}:${s}`;
}
