// The REST API of the gateway: capabilities and the streaming synthesis endpoints.

/** REST endpoint and field layout for each (mode, voice source). */
export const ENDPOINTS = {
  SFT: "/inference_sft",
  ZERO_SHOT: "/inference_zero_shot",
  CROSS_LINGUAL: "/inference_cross_lingual",
  INSTRUCT: "/inference_instruct", // instruction + preset speaker
  INSTRUCT_PROMPT: "/inference_instruct2", // instruction + prompt recording
};

/** An HTTP error answered by the server; `message` is the server's own text. */
export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.name = "ApiError";
    this.status = status;
  }
}

/** Build an ApiError from a non-2xx response, preferring the JSON body's `message`. */
export async function errorFromResponse(response) {
  let text = "";
  try {
    text = await response.text();
  } catch {
    // the body could not be read; fall back to the status line
  }
  let message = "";
  try {
    const body = JSON.parse(text);
    message = body.message || body.error?.message || body.detail || "";
  } catch {
    // not JSON: use the text itself if it is short enough to be a message
    if (text && text.length < 500 && !text.trimStart().startsWith("<")) message = text.trim();
  }
  if (!message) message = response.statusText || "request failed";
  return new ApiError(response.status, message);
}

/** Read `rate=` from a Content-Type like "audio/L16; rate=22050; channels=1". */
export function sampleRateFromContentType(contentType) {
  const match = /(?:^|;)\s*rate\s*=\s*"?(\d+)/i.exec(contentType || "");
  return match ? Number(match[1]) : null;
}

/** Strip the proto enum prefix: "SYNTHESIS_MODE_ZERO_SHOT" -> "ZERO_SHOT". */
export function normalizeMode(name) {
  return String(name).toUpperCase().replace(/^(SYNTHESIS_)?MODE_/, "");
}

/** proto3 JSON writes int64 as strings and leaves out zero values; read both forms. */
function numberOr(value, fallback) {
  const n = Number(value);
  const missing = value === undefined || value === null || value === "";
  return missing || !Number.isFinite(n) ? fallback : n;
}

function parseLimits(json) {
  const limits = json || {};
  const pick = (snake, camel) => numberOr(limits[snake] ?? limits[camel], null);
  const rates = limits.output_sample_rates ?? limits.outputSampleRates ?? [];
  return {
    maxTextChars: pick("max_text_chars", "maxTextChars"),
    maxUploadBytes: pick("max_upload_bytes", "maxUploadBytes"),
    maxPromptSeconds: pick("max_prompt_seconds", "maxPromptSeconds"),
    minPromptSeconds: pick("min_prompt_seconds", "minPromptSeconds"),
    outputSampleRates: rates.map(Number).filter((r) => r > 0),
    minSpeed: pick("min_speed", "minSpeed"),
    maxSpeed: pick("max_speed", "maxSpeed"),
  };
}

/** Capabilities in the page's terms, tolerant of camelCase JSON and omitted defaults. */
export function parseCapabilities(json) {
  const modes = new Map();
  for (const entry of json.modes || []) {
    modes.set(normalizeMode(entry.mode), {
      supported: Boolean(entry.supported),
      reason: entry.reason || "",
    });
  }
  return {
    engine: json.engine || "unknown",
    sampleRate: Number(json.sample_rate ?? json.sampleRate ?? 0),
    speakers: (json.speakers || []).map((s) => ({
      id: s.id,
      language: s.language || "",
      description: s.description || "",
    })),
    modes,
    limits: parseLimits(json.limits),
  };
}

export class TtsApi {
  /** `getKey` returns the current API key (read at every call, so a new key applies at once). */
  constructor(getKey) {
    this.getKey = getKey;
  }

  headers() {
    return { "X-API-TOKEN": this.getKey() };
  }

  async capabilities() {
    const response = await fetch("/v1/speakers", { headers: this.headers(), cache: "no-store" });
    if (!response.ok) throw await errorFromResponse(response);
    return parseCapabilities(await response.json());
  }

  /**
   * Start a synthesis; resolves to the streaming Response once the headers arrived.
   * `fields` is a plain object; a Blob value (the prompt audio) makes the body multipart.
   */
  async synthesize(endpoint, fields, signal) {
    const hasFile = Object.values(fields).some((v) => v instanceof Blob);
    let body;
    if (hasFile) {
      body = new FormData();
      for (const [name, value] of Object.entries(fields)) {
        if (value instanceof File) body.append(name, value, value.name);
        else if (value instanceof Blob) body.append(name, value, `${name}.wav`);
        else body.append(name, String(value));
      }
    } else {
      body = new URLSearchParams();
      for (const [name, value] of Object.entries(fields)) body.append(name, String(value));
    }
    const response = await fetch(endpoint, {
      method: "POST",
      headers: this.headers(),
      body,
      signal,
      cache: "no-store",
    });
    if (!response.ok) throw await errorFromResponse(response);
    return response;
  }
}
