// The prompt recording control: upload a file or record one with the microphone.
//
// Whatever libsndfile on the server cannot read (MediaRecorder's webm/ogg-opus, mp3, m4a) is
// converted here to a 16-bit WAV before it is uploaded.

import { audioDuration, toMonoWav } from "./wav.js";

const MAX_RECORD_SECONDS = 30;

const $ = (id) => document.getElementById(id);

export class PromptAudio {
  /** `getLimits` returns the server's limits (or null before they are known). */
  constructor(getLimits) {
    this.getLimits = getLimits;
    this.current = null; // { blob, name, duration, origin: "file" | "recording" }
    this.recorder = null;
    $("prompt-file").addEventListener("change", () => this.onFile());
    $("record-button").addEventListener("click", () => this.toggleRecording());
  }

  /** A sentence about the prompt's length or size that the server would refuse, or "". */
  problem(candidate = this.current) {
    const limits = this.getLimits();
    if (!limits || !candidate) return "";
    const { duration, blob } = candidate;
    if (limits.maxUploadBytes && blob.size > limits.maxUploadBytes) {
      const mb = (bytes) => (bytes / 1024 / 1024).toFixed(1);
      return `The file is ${mb(blob.size)} MB; the server accepts at most `
        + `${mb(limits.maxUploadBytes)} MB.`;
    }
    if (duration !== null && limits.maxPromptSeconds && duration > limits.maxPromptSeconds) {
      return `The recording is ${duration.toFixed(1)} s; the server accepts at most `
        + `${limits.maxPromptSeconds} s.`;
    }
    if (duration !== null && limits.minPromptSeconds && duration < limits.minPromptSeconds) {
      return `The recording is only ${duration.toFixed(1)} s; it must be at least `
        + `${limits.minPromptSeconds} s.`;
    }
    return "";
  }

  say(text) {
    $("prompt-info").textContent = text;
  }

  async set(blob, name, origin) {
    const duration = await audioDuration(blob);
    this.current = { blob, name, duration, origin };
    const preview = $("prompt-preview");
    if (preview.src) URL.revokeObjectURL(preview.src);
    preview.src = URL.createObjectURL(blob);
    preview.hidden = false;
    const length = duration === null ? "length unknown" : `${duration.toFixed(1)} s`;
    const what = origin === "recording" ? "Recorded" : "File";
    const problem = this.problem();
    let note = problem ? ` — ${problem}` : "";
    if (!problem && duration !== null && duration > 15) note = " — 3 to 10 s is enough and faster.";
    this.say(`${what}: ${name}, ${length}${note}`);
  }

  async onFile() {
    const file = $("prompt-file").files[0];
    if (!file) return;
    // libsndfile (on the server) reads WAV and FLAC: those go up unchanged.
    const readable = /\.(wav|flac)$/i.test(file.name)
      || /^audio\/(x-)?(wav|wave|flac)$/.test(file.type);
    if (readable) {
      await this.set(file, file.name, "file");
      return;
    }
    this.say(`Converting ${file.name} to WAV…`);
    try {
      const { wav } = await toMonoWav(file);
      const name = file.name.replace(/\.[^.]*$/, "") + ".wav";
      await this.set(new File([wav], name, { type: "audio/wav" }), file.name, "file");
    } catch {
      await this.set(file, file.name, "file");
      $("prompt-info").textContent += " (this browser cannot decode it; sent as it is)";
    }
  }

  async toggleRecording() {
    if (this.recorder && this.recorder.state === "recording") {
      this.recorder.stop();
      return;
    }
    if (!navigator.mediaDevices?.getUserMedia || typeof MediaRecorder === "undefined") {
      this.say("Recording is not available here "
        + "(browsers allow the microphone only on HTTPS or localhost).");
      return;
    }
    let stream;
    try {
      stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1 } });
    } catch (error) {
      this.say(error.name === "NotAllowedError"
        ? "Microphone access was denied. Allow it in the browser's site settings to record."
        : `Could not open the microphone: ${error.message}`);
      return;
    }
    const pieces = [];
    const recorder = new MediaRecorder(stream);
    this.recorder = recorder;
    const started = performance.now();
    const button = $("record-button");
    const ticker = setInterval(() => {
      const seconds = (performance.now() - started) / 1000;
      button.textContent = `Stop recording (${seconds.toFixed(0)} s)`;
      if (seconds >= MAX_RECORD_SECONDS && recorder.state === "recording") recorder.stop();
    }, 250);
    recorder.ondataavailable = (event) => {
      if (event.data.size > 0) pieces.push(event.data);
    };
    recorder.onstop = async () => {
      clearInterval(ticker);
      for (const track of stream.getTracks()) track.stop();
      button.textContent = "Record";
      button.setAttribute("aria-pressed", "false");
      this.say("Converting the recording to WAV…");
      try {
        const { wav } = await toMonoWav(new Blob(pieces, { type: recorder.mimeType }));
        const file = new File([wav], "recording.wav", { type: "audio/wav" });
        await this.set(file, "recording.wav", "recording");
      } catch (error) {
        this.say(`The recording could not be converted: ${error.message}`);
      }
    };
    recorder.start(250);
    button.textContent = "Stop recording (0 s)";
    button.setAttribute("aria-pressed", "true");
    this.say(`Recording… speak now (stops by itself after ${MAX_RECORD_SECONDS} s).`);
  }
}
