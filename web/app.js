// The page's behaviour: API key, capabilities, mode tabs, prompt audio, streaming synthesis.

import { ApiError, ENDPOINTS, TtsApi, sampleRateFromContentType } from "./api.js";
import { PcmStreamPlayer, playClip } from "./pcm-player.js";
import { clearWave, drawOverview, drawScope, levelFromRms } from "./wave.js";
import { PromptAudio } from "./prompt-audio.js";
import { encodeWav } from "./wav.js";

const KEY_STORAGE = "cosyvoice.apiKey";

const EXAMPLES = {
  zh: "今天天气很好，我们一起去公园散步吧。路边的桂花开了，空气里都是淡淡的香味。",
  en: "Streaming speech starts to play long before the whole sentence is finished. "
    + "That is why the first words arrive so quickly.",
  ja: "今日はとても良い天気ですね。午後は友達と駅前の喫茶店でコーヒーを飲む予定です。",
  ko: "안녕하세요. 오늘은 날씨가 정말 좋네요. 저녁에는 가족과 함께 공원을 산책할 거예요.",
  yue: "今日天氣好好，我哋一齊去飲茶啦。食完再去海邊行下，吹下海風。",
};

const $ = (id) => document.getElementById(id);

/** What is known of a synthesis before it starts. */
function emptyStats() {
  return {
    state: "idle", // idle | connecting | streaming | playing | done | stopped | error
    mode: null,
    endpoint: null,
    sampleRate: null,
    chunksReceived: 0,
    bytesReceived: 0,
    chunksScheduled: 0,
    secondsScheduled: 0,
    underruns: 0,
    firstAudioMs: null,
    totalMs: null,
    lastError: null, // { status, message } of the last failure
  };
}

// State the end-to-end tests read; also handy in the browser console.
const stats = emptyStats();
window.ttsStats = stats;

let apiKey = readStoredKey();
const api = new TtsApi(() => apiKey);
let capabilities = null;
let currentMode = "SFT";
const promptAudio = new PromptAudio(() => capabilities?.limits ?? null);
let activeRequest = null; // { abort: AbortController, player: PcmStreamPlayer }
let player = null; // whatever is playing now (a stream or a replay)
let lastClip = null; // { samples: Int16Array, sampleRate }
let lastRequest = null; // { endpoint, fields } of the last synthesis, for compressed downloads
let downloadUrl = null;
let drawing = false;

// ---------------------------------------------------------------- API key

function readStoredKey() {
  try {
    return localStorage.getItem(KEY_STORAGE) || "";
  } catch {
    return "";
  }
}

function storeKey(key) {
  try {
    if (key) localStorage.setItem(KEY_STORAGE, key);
    else localStorage.removeItem(KEY_STORAGE);
  } catch {
    // storage blocked (private mode): the key lives in memory for this visit only
  }
}

function showKeyForm(problem) {
  $("key-form").hidden = false;
  $("key-saved").hidden = true;
  const error = $("key-error");
  error.hidden = !problem;
  error.textContent = problem || "";
  $("api-key").setAttribute("aria-invalid", problem ? "true" : "false");
  $("api-key").focus();
}

function showKeySaved() {
  $("key-form").hidden = true;
  $("key-saved").hidden = false;
  $("key-error").hidden = true;
}

function onKeySubmit(event) {
  event.preventDefault();
  const key = $("api-key").value.trim();
  if (!key) {
    showKeyForm("Enter the API key first.");
    return;
  }
  apiKey = key;
  storeKey(key);
  $("api-key").value = "";
  showKeySaved();
  loadCapabilities();
}

/** A 401 from any call: say so plainly, next to the key field. */
function keyRejected(error) {
  showKeyForm(`The server rejected this API key (HTTP 401): ${error.message}`);
}

// ---------------------------------------------------------------- capabilities

const languageNames = (() => {
  try {
    return new Intl.DisplayNames(["en"], { type: "language" });
  } catch {
    return null;
  }
})();

function languageLabel(tag) {
  if (!tag) return "other";
  try {
    return languageNames?.of(tag) || tag;
  } catch {
    return tag;
  }
}

async function loadCapabilities() {
  if (!apiKey) {
    showKeyForm("");
    setStatus("Enter the API key to start.");
    return;
  }
  setStatus("Connecting to the service…");
  try {
    capabilities = await api.capabilities();
  } catch (error) {
    capabilities = null;
    $("speaker").replaceChildren(new Option("Speakers not loaded", ""));
    $("engine-info").textContent = "Not connected.";
    reportError(error, "Could not load the speakers");
    return;
  }
  clearError();
  renderSpeakers();
  renderModes();
  applyLimits(capabilities.limits);
  const { engine, sampleRate, speakers } = capabilities;
  const rate = sampleRate ? ` · native ${sampleRate.toLocaleString("en")} Hz` : "";
  const plural = speakers.length === 1 ? "" : "s";
  $("engine-info").textContent = `Engine “${engine}”${rate} · ${speakers.length} speaker${plural}`;
  setStatus("Ready.");
}

function renderSpeakers() {
  const select = $("speaker");
  const previous = select.value;
  select.replaceChildren();
  const { speakers } = capabilities;
  if (speakers.length === 0) {
    select.append(new Option("No speakers on this server", ""));
    select.disabled = true;
    return;
  }
  select.disabled = false;
  const groups = new Map();
  for (const speaker of speakers) {
    const label = languageLabel(speaker.language);
    if (!groups.has(label)) groups.set(label, []);
    groups.get(label).push(speaker);
  }
  for (const [label, members] of groups) {
    const group = document.createElement("optgroup");
    group.label = label;
    for (const speaker of members) {
      const option = new Option(`${speaker.id} (${label})`, speaker.id);
      option.dataset.language = speaker.language;
      option.dataset.description = speaker.description;
      group.append(option);
    }
    select.append(group);
  }
  if (speakers.some((s) => s.id === previous)) select.value = previous;
  describeSpeaker();
}

/** Offer only what the server accepts: sample rates, speed range, text length. */
function applyLimits(limits) {
  const rateSelect = $("sample-rate");
  if (limits.outputSampleRates.length > 0) {
    const previous = Number(rateSelect.value);
    const label = (rate) => `${rate.toLocaleString("en")} Hz`;
    rateSelect.replaceChildren(...limits.outputSampleRates.map((r) => new Option(label(r), r)));
    // Keep the choice if still offered; else the REST default 22050 Hz, else the first.
    const keep = [previous, 22050].find((r) => limits.outputSampleRates.includes(r));
    rateSelect.value = String(keep ?? limits.outputSampleRates[0]);
  }
  const speed = $("speed");
  if (limits.minSpeed) speed.min = String(limits.minSpeed);
  if (limits.maxSpeed) speed.max = String(limits.maxSpeed);
  if (limits.maxTextChars) $("tts-text").maxLength = limits.maxTextChars;
  updateCharCount();
}

function describeSpeaker() {
  const option = $("speaker").selectedOptions[0];
  $("speaker-help").textContent = option?.dataset.description || "";
}

function modeInfo(mode) {
  return capabilities?.modes.get(mode) || null;
}

function renderModes() {
  for (const tab of tabs()) {
    const mode = tab.dataset.mode;
    const info = modeInfo(mode);
    const unsupported = info !== null && !info.supported;
    tab.setAttribute("aria-disabled", unsupported ? "true" : "false");
    tab.querySelector(".tab-note").textContent = unsupported ? "not available" : "";
    tab.title = unsupported ? info.reason : "";
    const notice = $(tab.getAttribute("aria-controls")).querySelector(".unsupported");
    notice.hidden = !unsupported;
    notice.textContent = unsupported
      ? `The running engine (“${capabilities.engine}”) cannot do this: ${sentence(info.reason)}`
        + " A request in this mode will be refused by the server."
      : "";
    if (unsupported) tab.setAttribute("aria-describedby", noticeId(notice, mode));
    else tab.removeAttribute("aria-describedby");
  }
}

/** The server's reason as a sentence of its own, so more text can follow it. */
function sentence(text) {
  const trimmed = (text || "no reason given").trim();
  return /[.!?。！？]$/.test(trimmed) ? trimmed : `${trimmed}.`;
}

function noticeId(notice, mode) {
  if (!notice.id) notice.id = `unsupported-${mode.toLowerCase()}`;
  return notice.id;
}

// ---------------------------------------------------------------- tabs

function tabs() {
  return [...document.querySelectorAll('#mode-tabs [role="tab"]')];
}

function selectTab(tab, focus = false) {
  for (const other of tabs()) {
    const selected = other === tab;
    other.setAttribute("aria-selected", String(selected));
    other.tabIndex = selected ? 0 : -1;
    $(other.getAttribute("aria-controls")).hidden = !selected;
  }
  currentMode = tab.dataset.mode;
  placeSharedFields();
  if (focus) tab.focus();
}

/** Move the speaker and prompt controls into the selected panel's slots (or park them). */
function placeSharedFields() {
  const panel = document.querySelector('[role="tabpanel"]:not([hidden])');
  const parking = $("shared-fields");
  const instructVoice = document.querySelector('input[name="instruct-voice"]:checked').value;
  const shared = [["speaker", $("speaker-field")], ["prompt", $("prompt-field")]];
  for (const [slotName, field] of shared) {
    const slot = panel.querySelector(`[data-slot="${slotName}"]`);
    if (slot) {
      slot.append(field);
      if (slot.dataset.voice) slot.hidden = slot.dataset.voice !== instructVoice;
    } else {
      parking.append(field);
    }
  }
}

function onTabKeydown(event) {
  const all = tabs();
  const index = all.indexOf(event.currentTarget);
  let next = null;
  if (event.key === "ArrowRight") next = all[(index + 1) % all.length];
  else if (event.key === "ArrowLeft") next = all[(index - 1 + all.length) % all.length];
  else if (event.key === "Home") next = all[0];
  else if (event.key === "End") next = all[all.length - 1];
  if (next) {
    event.preventDefault();
    selectTab(next, true);
  }
}

// ---------------------------------------------------------------- synthesis

/** Collect the request for the selected mode, or return a problem to show. */
function buildRequest() {
  const text = $("tts-text").value.trim();
  const common = { tts_text: text, speed: $("speed").value, sample_rate: $("sample-rate").value };
  if (!text) return { problem: "Type the text to speak.", focus: "tts-text" };
  const needPrompt = () => {
    if (!promptAudio.current) {
      return { problem: "Choose or record a prompt recording first.", focus: "prompt-file" };
    }
    const problem = promptAudio.problem();
    return problem ? { problem, focus: "prompt-file" } : null;
  };
  const needSpeaker = () =>
    $("speaker").value ? null : { problem: "Choose a speaker first.", focus: "speaker" };
  switch (currentMode) {
    case "SFT":
      return needSpeaker() || {
        endpoint: ENDPOINTS.SFT,
        fields: { ...common, spk_id: $("speaker").value },
      };
    case "ZERO_SHOT": {
      const promptText = $("prompt-text").value.trim();
      if (!promptText)
        return { problem: "Type what the prompt recording says.", focus: "prompt-text" };
      return needPrompt() || {
        endpoint: ENDPOINTS.ZERO_SHOT,
        fields: { ...common, prompt_text: promptText, prompt_wav: promptAudio.current.blob },
      };
    }
    case "CROSS_LINGUAL":
      return needPrompt() || {
        endpoint: ENDPOINTS.CROSS_LINGUAL,
        fields: { ...common, prompt_wav: promptAudio.current.blob },
      };
    case "INSTRUCT": {
      const instruct = $("instruct-text").value.trim();
      if (!instruct) return { problem: "Type the instruction.", focus: "instruct-text" };
      const voice = document.querySelector('input[name="instruct-voice"]:checked').value;
      if (voice === "speaker") {
        return needSpeaker() || {
          endpoint: ENDPOINTS.INSTRUCT,
          fields: { ...common, spk_id: $("speaker").value, instruct_text: instruct },
        };
      }
      return needPrompt() || {
        endpoint: ENDPOINTS.INSTRUCT_PROMPT,
        fields: { ...common, instruct_text: instruct, prompt_wav: promptAudio.current.blob },
      };
    }
    default:
      return { problem: `Unknown mode ${currentMode}.` };
  }
}

function resetStats(request) {
  Object.assign(stats, emptyStats(), {
    state: "connecting",
    mode: currentMode,
    endpoint: request.endpoint,
    sampleRate: Number(request.fields.sample_rate),
  });
}

async function onSynthesize(event) {
  event.preventDefault();
  if (activeRequest) return;
  if (!apiKey) {
    showKeyForm("Enter the API key first.");
    return;
  }
  const request = buildRequest();
  if (request.problem) {
    showError(request.problem);
    if (request.focus) $(request.focus).focus();
    return;
  }
  stopPlayback();
  clearError();
  clearClip();
  lastRequest = request;
  resetStats(request);
  // Created here, inside the click, so the browser lets it make sound.
  const stream = new PcmStreamPlayer(stats.sampleRate);
  const abort = new AbortController();
  activeRequest = { abort, player: stream };
  player = stream;
  setBusy(true);
  setStatus("Sending the request…");
  startDrawing();
  const started = performance.now();
  try {
    const response = await api.synthesize(request.endpoint, request.fields, abort.signal);
    const rate = sampleRateFromContentType(response.headers.get("Content-Type"));
    if (rate) {
      stream.setStreamRate(rate);
      stats.sampleRate = rate;
    }
    stats.state = "streaming";
    setStatus("Waiting for the first audio…");
    const reader = response.body.getReader();
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      stats.chunksReceived += 1;
      stats.bytesReceived += value.length;
      if (stream.push(value) > 0) {
        stats.chunksScheduled += 1;
        stats.secondsScheduled = stream.secondsScheduled;
        if (stats.firstAudioMs === null) {
          stats.firstAudioMs = performance.now() - started;
          setStatus("Playing while the rest arrives…");
        }
      }
    }
    stats.totalMs = performance.now() - started;
    stats.underruns = stream.underruns;
    finishClip(stream);
    if (stream.totalFrames === 0) {
      stats.state = "error";
      stats.lastError = { status: response.status, message: "no audio in the response" };
      showError("The server finished without sending any audio.");
      setStatus("Synthesis failed.");
      return;
    }
    stats.state = "playing";
    const seconds = stream.secondsScheduled.toFixed(1);
    const dangling = stream.hasDanglingByte ? " (the stream ended in the middle of a sample)" : "";
    const took = (stats.totalMs / 1000).toFixed(2);
    setStatus(`Received ${seconds} s of audio in ${took} s${dangling}.`);
    activeRequest = null;
    setBusy(true); // Stop still silences the rest of the playback
    await stream.whenPlayed();
    if (player === stream && stats.state === "playing") stats.state = "done";
  } catch (error) {
    stats.totalMs = performance.now() - started;
    if (abort.signal.aborted) {
      stats.state = "stopped";
      stream.stop();
      finishClip(stream);
      setStatus(`Stopped after ${(stats.totalMs / 1000).toFixed(1)} s.`);
    } else {
      stats.state = "error";
      stream.stop();
      finishClip(stream);
      reportError(error, "Synthesis failed");
    }
  } finally {
    if (activeRequest?.player === stream) activeRequest = null;
    if (player === stream) setBusy(false);
    renderStats();
  }
}

function onStop() {
  if (activeRequest) activeRequest.abort.abort();
  if (player && stats.state === "playing") {
    stats.state = "stopped";
    setStatus("Playback stopped.");
  }
  stopPlayback();
  setBusy(false);
}

function stopPlayback() {
  if (player) player.stop();
}

/** Keep what arrived (also after Stop) for the download and "Play again". */
function finishClip(stream) {
  if (stream.totalFrames === 0) return;
  lastClip = { samples: stream.samples(), sampleRate: stream.streamRate };
  if (downloadUrl) URL.revokeObjectURL(downloadUrl);
  downloadUrl = URL.createObjectURL(encodeWav(lastClip.samples, lastClip.sampleRate));
  const link = $("download-link");
  link.href = downloadUrl;
  const stamp = new Date().toISOString().replace(/[:.]/g, "-").slice(0, 19);
  link.download = `cosyvoice-${stats.mode.toLowerCase()}-${stamp}.wav`;
  link.removeAttribute("aria-disabled");
  $("replay-button").disabled = false;
  $("download-encoded").disabled = false;
}

/**
 * Download the last request's speech in a compressed format. The page plays raw PCM as it
 * streams; the server's encoders make the other formats, so the request is sent again with
 * `format`. The embedded engine says exactly the same again; a CosyVoice engine samples, so its
 * new rendering may differ slightly from what played.
 */
async function onDownloadEncoded() {
  if (!lastRequest) return;
  const format = $("download-format").value;
  const button = $("download-encoded");
  button.disabled = true;
  setStatus(`Making the ${format.toUpperCase()} file…`);
  try {
    const fields = { ...lastRequest.fields, format };
    const response = await api.synthesize(lastRequest.endpoint, fields);
    const blob = await response.blob();
    const url = URL.createObjectURL(blob);
    const link = document.createElement("a");
    const stamp = new Date().toISOString().replace(/[:.]/g, "-").slice(0, 19);
    link.href = url;
    link.download = `cosyvoice-${stats.mode.toLowerCase()}-${stamp}.${format === "opus" ? "ogg" : format}`;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60_000);
    window.ttsLastDownload = { format, type: blob.type, size: blob.size, url };
    setStatus(`Downloaded ${(blob.size / 1024).toFixed(0)} KiB of ${format.toUpperCase()}.`);
  } catch (error) {
    reportError(error, "The download failed");
  } finally {
    button.disabled = lastRequest === null;
  }
}

function clearClip() {
  lastClip = null;
  if (downloadUrl) URL.revokeObjectURL(downloadUrl);
  downloadUrl = null;
  const link = $("download-link");
  link.removeAttribute("href");
  link.setAttribute("aria-disabled", "true");
  $("replay-button").disabled = true;
  $("download-encoded").disabled = true;
  clearWave($("wave"));
}

async function onReplay() {
  if (!lastClip || activeRequest) return;
  stopPlayback();
  const clip = playClip(lastClip.samples, lastClip.sampleRate);
  player = clip;
  setBusy(true);
  startDrawing();
  await clip.whenPlayed();
  if (player === clip) setBusy(false);
}

// ---------------------------------------------------------------- output display

function startDrawing() {
  if (drawing) return;
  drawing = true;
  const scratch = new Float32Array(2048);
  const frame = () => {
    renderStats();
    const live = player && !player.stopped && player.sources.size > 0;
    if (live) {
      $("level").value = levelFromRms(drawScope($("wave"), player.analyser, scratch));
    }
    const busy = activeRequest !== null || live;
    if (busy) {
      requestAnimationFrame(frame);
      return;
    }
    drawing = false;
    $("level").value = 0;
    if (lastClip) drawOverview($("wave"), lastClip.samples);
    else clearWave($("wave"));
  };
  requestAnimationFrame(frame);
}

function renderStats() {
  const ms = (value) => (value === null ? "–" : `${Math.round(value)} ms`);
  $("stat-first").textContent = ms(stats.firstAudioMs);
  $("stat-total").textContent = ms(stats.totalMs);
  const audio = stats.chunksScheduled ? `${stats.secondsScheduled.toFixed(2)} s` : "–";
  $("stat-audio").textContent = audio;
  $("stat-chunks").textContent = stats.chunksReceived ? String(stats.chunksReceived) : "–";
}

function setBusy(busy) {
  $("synth-button").disabled = busy;
  $("stop-button").disabled = !busy;
  $("synth-form").setAttribute("aria-busy", String(activeRequest !== null));
}

function setStatus(text) {
  $("status").textContent = text;
}

function showError(text) {
  const box = $("error");
  box.textContent = text;
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

/** Show a failure as the server's own message, with the HTTP status when there is one. */
function reportError(error, context) {
  if (error instanceof ApiError) {
    stats.lastError = { status: error.status, message: error.message };
    showError(`${context} (HTTP ${error.status}): ${error.message}`);
    setStatus(`${context}.`);
    if (error.status === 401) keyRejected(error);
    return;
  }
  // fetch() rejects with a TypeError when the connection itself failed or was cut.
  const message = error?.message || String(error);
  stats.lastError = { status: 0, message };
  showError(`${context}: the connection to the service failed or was interrupted (${message}).`);
  setStatus(`${context}.`);
}

// ---------------------------------------------------------------- wiring

function onExample(event) {
  const language = event.currentTarget.dataset.example;
  const textBox = $("tts-text");
  textBox.value = EXAMPLES[language];
  textBox.lang = language;
  updateCharCount();
  // A preset voice of the same language reads the example far better.
  const select = $("speaker");
  const current = select.selectedOptions[0];
  if (current && current.dataset.language !== language) {
    const match = [...select.options].find((o) => o.dataset.language === language);
    if (match) {
      select.value = match.value;
      describeSpeaker();
    }
  }
  textBox.focus();
}

function updateCharCount() {
  const count = [...$("tts-text").value].length;
  $("char-count").textContent = `${count} character${count === 1 ? "" : "s"}`;
}

function init() {
  $("key-form").addEventListener("submit", onKeySubmit);
  $("key-change").addEventListener("click", () => showKeyForm(""));
  $("key-forget").addEventListener("click", () => {
    apiKey = "";
    storeKey("");
    showKeyForm("");
    setStatus("The key was removed from this browser.");
  });
  for (const tab of tabs()) {
    tab.addEventListener("click", () => selectTab(tab));
    tab.addEventListener("keydown", onTabKeydown);
  }
  for (const radio of document.querySelectorAll('input[name="instruct-voice"]')) {
    radio.addEventListener("change", placeSharedFields);
  }
  for (const chip of document.querySelectorAll("[data-example]")) {
    chip.addEventListener("click", onExample);
  }
  $("speaker").addEventListener("change", describeSpeaker);
  $("speed").addEventListener("input", () => {
    $("speed-value").textContent = `${Number($("speed").value).toFixed(1)}×`;
  });
  $("tts-text").addEventListener("input", updateCharCount);
  $("synth-form").addEventListener("submit", onSynthesize);
  $("synth-form").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      $("synth-form").requestSubmit();
    }
  });
  $("stop-button").addEventListener("click", onStop);
  $("replay-button").addEventListener("click", onReplay);
  $("download-link").addEventListener("click", (event) => {
    if (!lastClip) event.preventDefault();
  });
  $("download-encoded").addEventListener("click", onDownloadEncoded);
  window.addEventListener("resize", () => {
    if (!drawing) lastClip ? drawOverview($("wave"), lastClip.samples) : clearWave($("wave"));
  });

  $("tts-text").value = EXAMPLES.zh;
  $("tts-text").lang = "zh";
  updateCharCount();
  selectTab(tabs()[0]);
  clearWave($("wave"));
  if (apiKey) showKeySaved();
  loadCapabilities();
}

init();
