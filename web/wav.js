// WAV encoding and browser-side audio conversion.
//
// The server reads prompt audio with libsndfile, which cannot read the webm/ogg-opus that
// MediaRecorder produces (nor m4a), so such audio is decoded here and re-encoded as 16-bit PCM WAV.

/** Sample rate used for converted prompt audio: enough for speech, keeps uploads small. */
export const PROMPT_SAMPLE_RATE = 24000;

/** Encode mono 16-bit samples as a RIFF/WAVE file. */
export function encodeWav(int16Samples, sampleRate) {
  const dataBytes = int16Samples.length * 2;
  const view = new DataView(new ArrayBuffer(44 + dataBytes));
  const ascii = (offset, text) => {
    for (let i = 0; i < text.length; i++) view.setUint8(offset + i, text.charCodeAt(i));
  };
  ascii(0, "RIFF");
  view.setUint32(4, 36 + dataBytes, true);
  ascii(8, "WAVE");
  ascii(12, "fmt ");
  view.setUint32(16, 16, true); // fmt chunk size
  view.setUint16(20, 1, true); // PCM
  view.setUint16(22, 1, true); // mono
  view.setUint32(24, sampleRate, true);
  view.setUint32(28, sampleRate * 2, true); // byte rate
  view.setUint16(32, 2, true); // block align
  view.setUint16(34, 16, true); // bits per sample
  ascii(36, "data");
  view.setUint32(40, dataBytes, true);
  for (let i = 0; i < int16Samples.length; i++) view.setInt16(44 + 2 * i, int16Samples[i], true);
  return new Blob([view.buffer], { type: "audio/wav" });
}

/** Float samples in [-1, 1] to 16-bit integers, clipping what is outside. */
export function floatToInt16(floats) {
  const out = new Int16Array(floats.length);
  for (let i = 0; i < floats.length; i++) {
    const s = Math.max(-1, Math.min(1, floats[i]));
    out[i] = s < 0 ? Math.round(s * 32768) : Math.round(s * 32767);
  }
  return out;
}

/**
 * Decode any audio the browser understands (webm, ogg, mp3, m4a, wav, flac) and return it as a
 * mono 16-bit WAV at PROMPT_SAMPLE_RATE, plus its duration in seconds.
 */
export async function toMonoWav(blob) {
  const encoded = await blob.arrayBuffer();
  // An OfflineAudioContext needs no user gesture and no audio device.
  const decoder = new OfflineAudioContext(1, 1, PROMPT_SAMPLE_RATE);
  const decoded = await decoder.decodeAudioData(encoded);
  const frames = Math.max(1, Math.ceil(decoded.duration * PROMPT_SAMPLE_RATE));
  // Rendering through a one-channel context downmixes (speakers rule) and resamples in one go.
  const renderer = new OfflineAudioContext(1, frames, PROMPT_SAMPLE_RATE);
  const source = renderer.createBufferSource();
  source.buffer = decoded;
  source.connect(renderer.destination);
  source.start();
  const rendered = await renderer.startRendering();
  const wav = encodeWav(floatToInt16(rendered.getChannelData(0)), PROMPT_SAMPLE_RATE);
  return { wav, duration: decoded.duration };
}

/** Duration in seconds of an audio file, or null if the browser cannot decode it. */
export async function audioDuration(blob) {
  try {
    const decoder = new OfflineAudioContext(1, 1, PROMPT_SAMPLE_RATE);
    const decoded = await decoder.decodeAudioData(await blob.arrayBuffer());
    return decoded.duration;
  } catch {
    return null;
  }
}
