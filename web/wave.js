// Waveform drawing: a live oscilloscope while audio plays, an overview of the whole clip after.

function colors(canvas) {
  const style = getComputedStyle(canvas);
  return {
    line: style.getPropertyValue("--wave-line").trim() || "#2563eb",
    mid: style.getPropertyValue("--wave-mid").trim() || "#cbd5e1",
  };
}

/** Match the drawing buffer to the displayed size so lines stay sharp on any screen. */
function fit(canvas) {
  const ratio = window.devicePixelRatio || 1;
  const width = Math.max(1, Math.round(canvas.clientWidth * ratio));
  const height = Math.max(1, Math.round(canvas.clientHeight * ratio));
  if (canvas.width !== width || canvas.height !== height) {
    canvas.width = width;
    canvas.height = height;
  }
  return { width, height, ratio };
}

export function clearWave(canvas) {
  const { width, height, ratio } = fit(canvas);
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, width, height);
  ctx.fillStyle = colors(canvas).mid;
  ctx.fillRect(0, Math.floor(height / 2), width, Math.max(1, Math.round(ratio)));
}

/** Draw the analyser's current time-domain frame; returns its RMS level (0..1). */
export function drawScope(canvas, analyser, scratch) {
  analyser.getFloatTimeDomainData(scratch);
  const { width, height, ratio } = fit(canvas);
  const ctx = canvas.getContext("2d");
  const { line } = colors(canvas);
  ctx.clearRect(0, 0, width, height);
  ctx.strokeStyle = line;
  ctx.lineWidth = 1.5 * ratio;
  ctx.beginPath();
  let sumSquares = 0;
  for (let i = 0; i < scratch.length; i++) {
    const s = scratch[i];
    sumSquares += s * s;
    const x = (i / (scratch.length - 1)) * width;
    const y = (0.5 - s * 0.48) * height;
    if (i === 0) ctx.moveTo(x, y);
    else ctx.lineTo(x, y);
  }
  ctx.stroke();
  return Math.sqrt(sumSquares / scratch.length);
}

/** Min/max per pixel column of a whole clip of 16-bit samples. */
export function drawOverview(canvas, samples) {
  const { width, height } = fit(canvas);
  const ctx = canvas.getContext("2d");
  const { line, mid } = colors(canvas);
  ctx.clearRect(0, 0, width, height);
  ctx.fillStyle = mid;
  ctx.fillRect(0, Math.floor(height / 2), width, 1);
  if (samples.length === 0) return;
  ctx.fillStyle = line;
  const perColumn = samples.length / width;
  for (let x = 0; x < width; x++) {
    const from = Math.floor(x * perColumn);
    const to = Math.min(samples.length, Math.max(from + 1, Math.floor((x + 1) * perColumn)));
    let lo = 0;
    let hi = 0;
    for (let i = from; i < to; i++) {
      const s = samples[i];
      if (s < lo) lo = s;
      if (s > hi) hi = s;
    }
    const top = (0.5 - (hi / 32768) * 0.48) * height;
    const bottom = (0.5 - (lo / 32768) * 0.48) * height;
    ctx.fillRect(x, top, 1, Math.max(1, bottom - top));
  }
}

/** Map an RMS level to 0..1 on a -60..0 dBFS scale, as level meters usually show it. */
export function levelFromRms(rms) {
  if (rms <= 0) return 0;
  const db = 20 * Math.log10(rms);
  return Math.max(0, Math.min(1, (db + 60) / 60));
}
