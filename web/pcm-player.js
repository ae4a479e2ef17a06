// Gapless playback of a 16-bit little-endian mono PCM stream as it arrives.
//
// Each network chunk becomes one AudioBuffer, started at the exact sample where the previous one
// ends. Start times are computed from an integer frame count (not by summing float durations) so
// rounding never opens a gap or an overlap between buffers, which is what causes clicks.

/** How far ahead of "now" the first buffer (or the first after an underrun) starts. */
const START_LEAD_SECONDS = 0.12;

export class PcmStreamPlayer {
  /**
   * Create the AudioContext synchronously inside a user gesture (a click), or browsers keep it
   * suspended. `sampleRate` is the rate the request asked for; a context running at the stream's
   * own rate plays the buffers without any resampling.
   */
  constructor(sampleRate) {
    try {
      this.context = new AudioContext({ sampleRate, latencyHint: "interactive" });
    } catch {
      this.context = new AudioContext({ latencyHint: "interactive" });
    }
    this.context.resume().catch(() => {});
    this.analyser = this.context.createAnalyser();
    this.analyser.fftSize = 2048;
    this.analyser.connect(this.context.destination);
    this.streamRate = sampleRate;
    this.carry = null; // the odd byte left over from the previous network chunk
    this.pieces = []; // Int16Array per chunk, kept for the WAV download
    this.totalFrames = 0;
    this.anchorTime = 0; // context time of frame `anchorFrame`
    this.anchorFrame = 0;
    this.scheduledFrames = 0;
    this.buffersScheduled = 0;
    this.underruns = 0;
    this.sources = new Set();
    this.lastSource = null;
    this.stopped = false;
    this.waiters = []; // resolvers of whenPlayed(), also released by stop()
  }

  /** Set the stream's real rate (from the response Content-Type) before the first push. */
  setStreamRate(rate) {
    if (this.totalFrames === 0 && rate > 0) this.streamRate = rate;
  }

  /** Add a chunk of bytes from the network; returns the number of frames scheduled. */
  push(bytes) {
    if (this.stopped || bytes.length === 0) return 0;
    let data = bytes;
    if (this.carry !== null) {
      data = new Uint8Array(bytes.length + 1);
      data[0] = this.carry;
      data.set(bytes, 1);
      this.carry = null;
    }
    const frames = data.length >> 1;
    if (data.length & 1) this.carry = data[data.length - 1];
    if (frames === 0) return 0;

    // A DataView reads little-endian regardless of the platform and of the chunk's alignment.
    const view = new DataView(data.buffer, data.byteOffset, frames * 2);
    const ints = new Int16Array(frames);
    const floats = new Float32Array(frames);
    for (let i = 0; i < frames; i++) {
      const s = view.getInt16(2 * i, true);
      ints[i] = s;
      floats[i] = s / 32768;
    }
    this.pieces.push(ints);
    this.totalFrames += frames;
    this.schedule(floats);
    return frames;
  }

  schedule(floats) {
    const ctx = this.context;
    const buffer = ctx.createBuffer(1, floats.length, this.streamRate);
    buffer.copyToChannel(floats, 0);
    let start = this.anchorTime + (this.scheduledFrames - this.anchorFrame) / this.streamRate;
    if (this.buffersScheduled === 0 || start < ctx.currentTime) {
      // First buffer, or the network fell behind playback: re-anchor a little in the future.
      if (this.buffersScheduled > 0) this.underruns += 1;
      this.anchorTime = ctx.currentTime + START_LEAD_SECONDS;
      this.anchorFrame = this.scheduledFrames;
      start = this.anchorTime;
    }
    const source = ctx.createBufferSource();
    source.buffer = buffer;
    source.connect(this.analyser);
    source.onended = () => this.sources.delete(source);
    source.start(start);
    this.sources.add(source);
    this.lastSource = source;
    this.scheduledFrames += floats.length;
    this.buffersScheduled += 1;
  }

  /** Seconds of audio handed to the audio clock so far. */
  get secondsScheduled() {
    return this.scheduledFrames / this.streamRate;
  }

  /** True when a trailing odd byte was never completed (the stream was cut mid-sample). */
  get hasDanglingByte() {
    return this.carry !== null;
  }

  /** Resolves when everything scheduled has been played (or playback was stopped). */
  whenPlayed() {
    const last = this.lastSource;
    if (!last || this.stopped || !this.sources.has(last)) return Promise.resolve();
    return new Promise((resolve) => {
      this.waiters.push(resolve);
      last.addEventListener("ended", resolve, { once: true });
    });
  }

  /** All received samples as one Int16Array. */
  samples() {
    const out = new Int16Array(this.totalFrames);
    let offset = 0;
    for (const piece of this.pieces) {
      out.set(piece, offset);
      offset += piece.length;
    }
    return out;
  }

  /** Silence everything now and release the audio device. */
  stop() {
    if (this.stopped) return;
    this.stopped = true;
    for (const source of this.sources) {
      try {
        source.stop();
      } catch {
        // already ended
      }
    }
    this.sources.clear();
    for (const resolve of this.waiters) resolve();
    this.waiters = [];
    this.context.close().catch(() => {});
  }
}

/** Play a finished clip once (for "Play again"); returns the player-like handle. */
export function playClip(int16Samples, sampleRate) {
  const player = new PcmStreamPlayer(sampleRate);
  const floats = new Float32Array(int16Samples.length);
  for (let i = 0; i < int16Samples.length; i++) floats[i] = int16Samples[i] / 32768;
  player.totalFrames = int16Samples.length;
  player.pieces.push(int16Samples);
  player.schedule(floats);
  return player;
}
