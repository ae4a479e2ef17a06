"""End-to-end tests of the web page: real gRPC server, real Envoy, real headless Chromium.

The page (web/) is served by Envoy and talks to the REST API through it, exactly as a person's
browser would. Chromium is Debian's package (/usr/bin/chromium) driven by Playwright; without it
the tests are skipped, except in CI (CI=true) where they fail.

Screenshots land in test-output/ (git-ignored) for a person to look at.
"""

from __future__ import annotations

import base64
import io
import os
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import soundfile as sf
from conftest import assert_same_audio, decode_stream

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
WEB = ROOT / "web"
OUTPUT = ROOT / "test-output"
CHROMIUM = Path("/usr/bin/chromium")
ZERO_SHOT_WAV = SHARED / "audio" / "zero_shot_prompt.wav"
ZERO_SHOT_TRANSCRIPT = "希望你以后能够做的比我还好呦。"
SHORT_TEXT = "今天天气很好，我们一起去公园散步吧。"

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--autoplay-policy=no-user-gesture-required",
    # A synthetic microphone (a beeping tone) and an auto-accepted permission prompt.
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
]

pytestmark = pytest.mark.browser

# Records what the page hands to fetch(): Playwright cannot show blob-backed multipart bodies,
# so the test reads the FormData itself (file bytes as base64) before the real fetch runs.
FETCH_SPY = """
(() => {
  window.__requests = [];
  const realFetch = window.fetch;
  const toBase64 = (blob) => new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",")[1] || "");
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
  window.fetch = async function (input, init = {}) {
    const entry = { url: String(input.url || input), method: init.method || "GET",
                    bodyType: null, fields: {}, files: {} };
    const body = init.body;
    if (body instanceof FormData) {
      entry.bodyType = "multipart";
      for (const [name, value] of body.entries()) {
        if (value instanceof Blob) {
          entry.files[name] = { name: value.name, type: value.type, size: value.size,
                                base64: await toBase64(value) };
        } else {
          entry.fields[name] = value;
        }
      }
    } else if (body instanceof URLSearchParams) {
      entry.bodyType = "urlencoded";
      for (const [name, value] of body) entry.fields[name] = value;
    }
    window.__requests.push(entry);
    return realFetch.call(this, input, init);
  };
})();
"""


# ------------------------------------------------------------------------------------ fixtures


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true, so this is an error, not a skip)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        _unavailable(f"{CHROMIUM} is missing: apt-get install chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright Python package is not installed")
    with sync_playwright() as playwright:
        # Playwright gives each launch a fresh temporary user-data dir.
        instance = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        yield instance
        instance.close()


class PageUnderTest:
    """A fresh browser context (empty localStorage) on the page, with what it did recorded."""

    def __init__(self, browser, base_url: str, viewport: dict | None = None):
        self.base_url = base_url.rstrip("/")
        self.context = browser.new_context(
            viewport=viewport or {"width": 1100, "height": 900}, device_scale_factor=1
        )
        self.context.grant_permissions(["microphone"], origin=self.base_url)
        self.context.add_init_script(FETCH_SPY)
        self.page = self.context.new_page()
        self.page.set_default_timeout(30_000)
        self.errors: list[str] = []
        self.urls: list[str] = []
        self.failed: list[tuple[str, str]] = []
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.on("request", lambda request: self.urls.append(request.url))
        self.page.on(
            "requestfailed", lambda request: self.failed.append((request.url, request.failure))
        )

    def open(self) -> None:
        self.page.goto(self.base_url + "/")
        self.page.wait_for_selector("#key-form, #key-saved")

    def enter_key(self, key: str) -> None:
        if self.page.is_visible("#key-change"):
            self.page.click("#key-change")
        self.page.fill("#api-key", key)
        self.page.keyboard.press("Enter")

    def wait_for_speakers(self) -> None:
        self.page.wait_for_function("document.querySelector('#speaker optgroup') !== null")

    def stats(self) -> dict:
        return self.page.evaluate("() => ({...window.ttsStats})")

    def sent(self) -> list[dict]:
        return self.page.evaluate("() => window.__requests")

    def select_tab_by_keyboard(self, tab_id: str) -> None:
        """Home, then arrow right to `tab_id`, as a keyboard user would."""
        self.page.focus('[role="tab"][aria-selected="true"]')
        self.page.keyboard.press("Home")
        for _ in range(4):
            if self.page.evaluate("document.activeElement.id") == tab_id:
                break
            self.page.keyboard.press("ArrowRight")
        assert self.page.evaluate("document.activeElement.id") == tab_id
        assert self.page.get_attribute(f"#{tab_id}", "aria-selected") == "true"

    def screenshot(self, name: str) -> None:
        OUTPUT.mkdir(exist_ok=True)
        self.page.screenshot(path=str(OUTPUT / name), full_page=True)

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def web(browser, stack):
    pages: list[PageUnderTest] = []

    def make(viewport: dict | None = None) -> PageUnderTest:
        pages.append(PageUnderTest(browser, stack.rest_url, viewport))
        return pages[-1]

    yield make
    for opened in pages:
        opened.close()
    for opened in pages:
        assert not opened.errors, f"uncaught errors in the page: {opened.errors}"
        foreign = [u for u in opened.urls
                   if not u.startswith(opened.base_url) and not u.startswith(("blob:", "data:"))]
        assert not foreign, f"the page reached outside its own origin: {foreign}"


@pytest.fixture
def speakers_json(stack) -> dict:
    response = requests.get(
        stack.rest_url + "/v1/speakers",
        headers=stack.headers,
        timeout=30,
    )
    response.raise_for_status()
    return response.json()


def _mode(speakers_json: dict, name: str) -> dict:
    for entry in speakers_json["modes"]:
        if entry["mode"].endswith(name):
            return entry
    raise AssertionError(f"/v1/speakers lists no mode {name}: {speakers_json['modes']}")


def _served_message(response: requests.Response) -> str:
    return response.json()["message"]


# ------------------------------------------------------------------------------------ tests


def test_wrong_key_shows_the_servers_401_message(web, stack):
    reference = requests.get(
        stack.rest_url + "/v1/speakers",
        headers={"X-API-TOKEN": "not-the-key"},
        timeout=30,
    )
    assert reference.status_code == 401
    message = _served_message(reference)

    tab = web()
    tab.open()
    assert tab.page.is_visible("#key-form"), "a first visit must ask for the key"
    tab.enter_key("not-the-key")
    tab.page.wait_for_selector("#key-error:not([hidden])")
    key_error = tab.page.inner_text("#key-error")
    assert "401" in key_error and message in key_error
    assert message in tab.page.inner_text("#error")
    assert tab.page.get_attribute("#api-key", "aria-invalid") == "true"
    assert tab.page.evaluate("document.activeElement.id") == "api-key"
    assert tab.stats()["lastError"] == {"status": 401, "message": message}
    assert "not-the-key" not in tab.page.url
    assert all("not-the-key" not in url for url in tab.urls)
    tab.screenshot("web-wrong-key.png")


def test_preset_speaker_streams_and_schedules_audio(web, stack, speakers_json):
    tab = web()
    tab.open()
    tab.enter_key(stack.api_key)
    tab.wait_for_speakers()

    # The speaker list, the engine and the mode states are what the server reports.
    offered = tab.page.eval_on_selector_all("#speaker option", "os => os.map(o => o.value)")
    assert sorted(offered) == sorted(s["id"] for s in speakers_json["speakers"])
    assert speakers_json["engine"] in tab.page.inner_text("#engine-info")
    for tab_id, mode in [("tab-sft", "SFT"), ("tab-zero-shot", "ZERO_SHOT"),
                         ("tab-cross-lingual", "CROSS_LINGUAL"), ("tab-instruct", "INSTRUCT")]:
        entry = _mode(speakers_json, mode)
        disabled = tab.page.get_attribute(f"#{tab_id}", "aria-disabled") == "true"
        assert disabled == (not entry.get("supported", False)), mode
    assert _mode(speakers_json, "SFT").get("supported"), "these tests need preset speakers"

    speaker = speakers_json["speakers"][0]["id"]
    tab.page.select_option("#speaker", speaker)
    tab.page.fill("#tts-text", SHORT_TEXT)
    tab.page.select_option("#sample-rate", "24000")
    tab.page.click("#synth-button")
    tab.page.wait_for_function("window.ttsStats.totalMs !== null", timeout=180_000)
    tab.page.wait_for_timeout(300)  # let the waveform draw a few frames for the screenshot
    tab.screenshot("web-preset-speaker.png")

    stats = tab.stats()
    assert stats["lastError"] is None, stats
    assert stats["state"] in ("playing", "done"), stats
    assert stats["sampleRate"] == 24000
    assert stats["chunksReceived"] > 1 and stats["chunksScheduled"] > 1, stats
    assert stats["secondsScheduled"] > 1.0, stats
    assert 0 < stats["firstAudioMs"] <= stats["totalMs"], stats
    assert stats["bytesReceived"] == round(stats["secondsScheduled"] * 24000) * 2

    sent = [r for r in tab.sent() if r["method"] == "POST"]
    assert sent[-1]["url"].endswith("/inference_sft")
    assert sent[-1]["fields"]["spk_id"] == speaker
    assert sent[-1]["fields"]["sample_rate"] == "24000"

    # The download is a real WAV of exactly what was scheduled.
    assert tab.page.get_attribute("#download-link", "aria-disabled") is None
    wav_b64 = tab.page.evaluate(
        """async () => {
             const blob = await (await fetch(document.querySelector('#download-link').href)).blob();
             const bytes = new Uint8Array(await blob.arrayBuffer());
             let text = ''; for (const b of bytes) text += String.fromCharCode(b);
             return btoa(text);
           }"""
    )
    samples, rate = sf.read(io.BytesIO(base64.b64decode(wav_b64)), dtype="int16")
    assert rate == 24000
    assert len(samples) == stats["bytesReceived"] // 2
    assert np.abs(samples).max() > 1000, "the download is silent"

    # A compressed download: the server encodes the same request as MP3 (the embedded engine
    # is deterministic, so it is the audio that played).
    tab.page.select_option("#download-format", "mp3")
    tab.page.click("#download-encoded")
    tab.page.wait_for_function("window.ttsLastDownload !== undefined", timeout=120_000)
    download = tab.page.evaluate(
        """async () => {
             const blob = await (await fetch(window.ttsLastDownload.url)).blob();
             const bytes = new Uint8Array(await blob.arrayBuffer());
             let text = ''; for (const b of bytes) text += String.fromCharCode(b);
             return { type: blob.type, base64: btoa(text) };
           }"""
    )
    assert download["type"] == "audio/mpeg"
    assert_same_audio(*decode_stream(base64.b64decode(download["base64"])),
                      samples.astype(np.float32) / 32768, rate, lossless=False)

    # A reload keeps the key: no second prompt, the speakers load straight away.
    tab.page.reload()
    tab.wait_for_speakers()
    assert tab.page.is_visible("#key-saved") and not tab.page.is_visible("#key-form")
    assert stack.api_key not in tab.page.url


def test_phone_width_layout(web, stack):
    tab = web({"width": 390, "height": 844})
    tab.open()
    tab.enter_key(stack.api_key)
    tab.wait_for_speakers()

    def overflow() -> int:
        return tab.page.evaluate("document.documentElement.scrollWidth - window.innerWidth")

    for tab_id in ("tab-zero-shot", "tab-cross-lingual", "tab-instruct", "tab-sft"):
        tab.select_tab_by_keyboard(tab_id)
        if tab_id == "tab-instruct":
            tab.page.check('input[name="instruct-voice"][value="prompt"]')
            assert tab.page.is_visible("#prompt-file") and not tab.page.is_visible("#speaker")
        assert overflow() <= 0, f"{tab_id}: the page scrolls sideways by {overflow()} px"
        if tab_id == "tab-zero-shot":
            tab.screenshot("web-phone-cloning.png")
    tab.screenshot("web-phone.png")


def test_controls_are_labelled_and_tabs_follow_the_tablist_pattern(web, stack):
    tab = web()
    tab.open()
    tab.enter_key(stack.api_key)
    tab.wait_for_speakers()
    unlabelled = tab.page.evaluate(
        """() => [...document.querySelectorAll('input, select, textarea, button, meter, canvas')]
              .filter(el => el.type !== 'hidden')
              .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
                            && !el.getAttribute('aria-labelledby') && !el.textContent.trim())
              .map(el => el.id || el.outerHTML.slice(0, 80))"""
    )
    assert unlabelled == []
    assert tab.page.get_attribute("#status", "aria-live") == "polite"
    assert tab.page.get_attribute("#error", "role") == "alert"

    tabs = tab.page.eval_on_selector_all('[role="tablist"] [role="tab"]', "ts => ts.map(t => t.id)")
    assert len(tabs) == 4
    for tab_id in tabs:
        panel = tab.page.get_attribute(f"#{tab_id}", "aria-controls")
        assert tab.page.get_attribute(f"#{panel}", "role") == "tabpanel"
        assert tab.page.get_attribute(f"#{panel}", "aria-labelledby") == tab_id

    def selected() -> list[str]:
        return tab.page.eval_on_selector_all(
            '[role="tab"][aria-selected="true"]', "ts => ts.map(t => t.id)"
        )

    tab.page.focus("#tab-sft")
    tab.page.keyboard.press("ArrowRight")
    assert selected() == ["tab-zero-shot"]
    assert tab.page.is_visible("#panel-zero-shot") and not tab.page.is_visible("#panel-sft")
    assert tab.page.is_visible("#prompt-file"), "the cloning tab must offer the prompt upload"
    tab.page.keyboard.press("End")
    assert selected() == ["tab-instruct"]
    assert tab.page.evaluate("document.activeElement.id") == "tab-instruct"
    tab.page.keyboard.press("ArrowRight")
    assert selected() == ["tab-sft"], "arrow keys wrap around"
    assert tab.page.is_visible("#speaker") and not tab.page.is_visible("#prompt-file")
    roving = tab.page.eval_on_selector_all('[role="tab"]', "ts => ts.map(t => t.tabIndex)")
    assert sorted(roving) == [-1, -1, -1, 0]


def test_cloning_tab_uploads_the_prompt_as_multipart(web, stack, speakers_json):
    tab = web()
    tab.open()
    tab.enter_key(stack.api_key)
    tab.wait_for_speakers()
    tab.select_tab_by_keyboard("tab-zero-shot")
    zero_shot = _mode(speakers_json, "ZERO_SHOT")
    if not zero_shot.get("supported"):
        notice = tab.page.inner_text("#panel-zero-shot .unsupported")
        assert zero_shot["reason"] and zero_shot["reason"] in notice

    tab.page.set_input_files("#prompt-file", str(ZERO_SHOT_WAV))
    tab.page.wait_for_function("document.querySelector('#prompt-info').textContent.startsWith('File')")
    assert "3.5 s" in tab.page.inner_text("#prompt-info")
    tab.page.fill("#prompt-text", ZERO_SHOT_TRANSCRIPT)
    tab.page.fill("#tts-text", SHORT_TEXT)
    with tab.page.expect_request(lambda r: r.method == "POST") as captured:
        tab.page.click("#synth-button")
    assert captured.value.url.endswith("/inference_zero_shot")
    assert captured.value.headers["content-type"].startswith("multipart/form-data; boundary=")
    assert captured.value.headers["x-api-token"] == stack.api_key

    sent = tab.sent()[-1]
    assert sent["bodyType"] == "multipart"
    assert sent["fields"]["prompt_text"] == ZERO_SHOT_TRANSCRIPT
    uploaded = base64.b64decode(sent["files"]["prompt_wav"]["base64"])
    assert uploaded == ZERO_SHOT_WAV.read_bytes(), "a WAV file is uploaded unchanged"

    if zero_shot.get("supported"):
        tab.page.wait_for_function("window.ttsStats.totalMs !== null", timeout=300_000)
        stats = tab.stats()
        assert stats["lastError"] is None and stats["secondsScheduled"] > 1.0, stats
    else:
        # The same request from Python: the page must show exactly the server's answer.
        reference = requests.post(
            stack.rest_url + "/inference_zero_shot",
            headers=stack.headers,
            data={k: v for k, v in sent["fields"].items()},
            files={"prompt_wav": (ZERO_SHOT_WAV.name, uploaded, "audio/wav")},
            timeout=60,
        )
        assert reference.status_code >= 400
        message = _served_message(reference)
        tab.page.wait_for_selector("#error:not([hidden])")
        shown = tab.page.inner_text("#error")
        assert message in shown and str(reference.status_code) in shown
        assert tab.stats()["lastError"] == {"status": reference.status_code, "message": message}
        assert tab.page.is_enabled("#synth-button"), "the page must recover from an error"
    tab.screenshot("web-zero-shot.png")


def test_recorded_prompt_is_converted_to_16_bit_wav(web, stack):
    tab = web()
    tab.open()
    tab.enter_key(stack.api_key)
    tab.wait_for_speakers()
    tab.select_tab_by_keyboard("tab-cross-lingual")
    tab.page.click("#record-button")
    tab.page.wait_for_selector('#record-button[aria-pressed="true"]')  # the microphone opened
    tab.page.wait_for_timeout(1500)
    tab.page.click("#record-button")
    tab.page.wait_for_function(
        "document.querySelector('#prompt-info').textContent.startsWith('Recorded')"
    )
    tab.page.fill("#tts-text", "Hello there, this is a short test.")
    tab.page.click("#synth-button")
    tab.page.wait_for_function(
        "window.ttsStats.totalMs !== null || window.ttsStats.lastError !== null", timeout=300_000
    )
    sent = tab.sent()[-1]
    assert sent["url"].endswith("/inference_cross_lingual") and sent["bodyType"] == "multipart"
    upload = sent["files"]["prompt_wav"]
    assert upload["type"] == "audio/wav" and upload["name"].endswith(".wav")
    data = base64.b64decode(upload["base64"])
    info = sf.info(io.BytesIO(data))
    assert (info.format, info.subtype, info.channels) == ("WAV", "PCM_16", 1)
    assert 1.0 < info.duration < 3.0, info.duration
    samples, _ = sf.read(io.BytesIO(data), dtype="float32")
    assert np.abs(samples).max() > 0.01, "the fake microphone's tone is missing"
    error = tab.stats()["lastError"]
    if error is None:
        assert tab.stats()["secondsScheduled"] > 0.5
    else:
        # A refusal is the server's own answer to these very bytes, shown as it is.
        reference = requests.post(
            stack.rest_url + "/inference_cross_lingual",
            headers=stack.headers,
            data=sent["fields"],
            files={"prompt_wav": ("recording.wav", data, "audio/wav")},
            timeout=60,
        )
        assert error == {"status": reference.status_code, "message": _served_message(reference)}
        assert error["message"] in tab.page.inner_text("#error")


def test_stop_aborts_the_request_and_the_server_cancels(web, stack):
    def cancelled() -> int:
        return int(stack.status().get("cancelled_total", 0))  # int64: a string in JSON

    before = cancelled()
    tab = web()
    tab.open()
    tab.enter_key(stack.api_key)
    tab.wait_for_speakers()
    long_text = "。".join([SHORT_TEXT.rstrip("。")] * 60) + "。"
    tab.page.fill("#tts-text", long_text)
    tab.page.focus("#tts-text")
    tab.page.keyboard.press("Control+Enter")  # the keyboard shortcut starts it
    tab.page.wait_for_function("window.ttsStats.chunksScheduled >= 1", timeout=180_000)
    assert tab.page.is_enabled("#stop-button")
    tab.page.click("#stop-button")
    tab.page.wait_for_function("window.ttsStats.state === 'stopped'")
    received = tab.stats()["chunksReceived"]
    assert "Stopped" in tab.page.inner_text("#status")
    assert any(url.endswith("/inference_sft") for url, _ in tab.failed), tab.failed
    deadline = time.monotonic() + 20
    while cancelled() <= before and time.monotonic() < deadline:
        time.sleep(0.25)
    assert cancelled() > before, "the server did not see the synthesis cancelled"
    tab.page.wait_for_timeout(500)
    assert tab.stats()["chunksReceived"] == received
    assert tab.page.is_enabled("#synth-button")
    stack.wait_idle()


def test_pcm_player_is_gapless_across_odd_byte_splits(web, stack):
    tab = web()
    tab.open()
    result = tab.page.evaluate(
        """async () => {
          const { PcmStreamPlayer } = await import('/pcm-player.js');
          const starts = [];
          const realStart = AudioBufferSourceNode.prototype.start;
          AudioBufferSourceNode.prototype.start = function (when) {
            starts.push([when, this.buffer.length, this.buffer.sampleRate]);
            return realStart.apply(this, arguments);
          };
          const rate = 24000, frames = 12001;
          const bytes = new Uint8Array(frames * 2 + 1);  // one dangling byte at the end
          const view = new DataView(bytes.buffer);
          const expected = new Int16Array(frames);
          for (let i = 0; i < frames; i++) {
            expected[i] = ((i * 7919) % 65536) - 32768;
            view.setInt16(2 * i, expected[i], true);
          }
          bytes[bytes.length - 1] = 0x7f;
          const player = new PcmStreamPlayer(rate);
          const sizes = [1, 2, 3, 1001, 4096, 7, 0, 5, 1];
          for (let pos = 0, k = 0; pos < bytes.length; k++) {
            const size = sizes[k % sizes.length];
            player.push(bytes.subarray(pos, pos + size));
            pos += size;
          }
          AudioBufferSourceNode.prototype.start = realStart;
          const got = player.samples();
          let mismatches = 0;
          for (let i = 0; i < frames; i++) if (got[i] !== expected[i]) mismatches++;
          const out = { starts, total: player.totalFrames, mismatches,
                        dangling: player.hasDanglingByte, seconds: player.secondsScheduled };
          player.stop();
          return out;
        }"""
    )
    assert result["total"] == 12001 and result["mismatches"] == 0
    assert result["dangling"] is True
    starts = result["starts"]
    assert len(starts) > 5 and sum(n for _, n, _ in starts) == 12001
    for (when, length, rate), (next_when, _, _) in zip(starts, starts[1:], strict=False):
        assert rate == 24000
        assert next_when == pytest.approx(when + length / rate, abs=1e-9), "gap or overlap"
    assert result["seconds"] == pytest.approx(12001 / 24000)


def test_browser_wav_conversion_round_trips(web, stack):
    tab = web()
    tab.open()
    wav_b64 = base64.b64encode(ZERO_SHOT_WAV.read_bytes()).decode()
    result = tab.page.evaluate(
        """async (b64) => {
          const { encodeWav, toMonoWav } = await import('/wav.js');
          const raw = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
          const { wav, duration } = await toMonoWav(new Blob([raw]));
          const ramp = new Int16Array([0, 1, -1, 32767, -32768, 1234]);
          const encoded = encodeWav(ramp, 16000);
          const toB64 = async (blob) => {
            const bytes = new Uint8Array(await blob.arrayBuffer());
            let text = ''; for (const b of bytes) text += String.fromCharCode(b);
            return btoa(text);
          };
          return { converted: await toB64(wav), duration, ramp: await toB64(encoded) };
        }""",
        wav_b64,
    )
    ramp, rate = sf.read(io.BytesIO(base64.b64decode(result["ramp"])), dtype="int16")
    assert rate == 16000 and ramp.tolist() == [0, 1, -1, 32767, -32768, 1234]

    original, original_rate = sf.read(ZERO_SHOT_WAV, dtype="float32")
    converted, rate = sf.read(io.BytesIO(base64.b64decode(result["converted"])), dtype="float32")
    assert sf.info(io.BytesIO(base64.b64decode(result["converted"]))).subtype == "PCM_16"
    assert rate == 24000 == original_rate
    assert result["duration"] == pytest.approx(len(original) / original_rate, abs=0.01)
    n = min(len(original), len(converted))
    assert abs(len(original) - len(converted)) <= 1
    correlation = np.corrcoef(original[:n], converted[:n])[0, 1]
    assert correlation > 0.999, correlation


def test_web_files_need_no_network():
    """Every asset is local: no absolute URLs in src/href/import/url()."""
    offenders = []
    for path in sorted(WEB.iterdir()):
        if path.suffix not in {".html", ".js", ".css", ".svg"}:
            continue
        text = path.read_text(encoding="utf-8")
        for marker in ('src="http', "href=\"http", "from \"http", "import(\"http", "url(http",
                       "url(\"http", "//cdn", "fonts.googleapis"):
            if marker in text:
                offenders.append(f"{path.name}: {marker}")
    assert offenders == []
