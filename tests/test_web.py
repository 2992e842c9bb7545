"""The live-caption page (streamer/web) in a real headless Chromium whose microphone is espeak-ng speech.

Chromium plays a WAV file as its fake microphone (looped); the page captures it through its
AudioWorklet and streams it to an in-process daemon over the native protocol. One browser serves
the whole module. With the random tiny test model the captions are gibberish (but real model
output); when a trained demo model ships in ``streamer/models/demo`` the test also checks words.
"""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
from websockets.asyncio.client import connect

from streamer.checkpoint import demo_model_dir
from streamer.events import Event, Final
from streamer.testing import espeak

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[1]
DOCS_SCREENSHOT = ROOT / "docs" / "screenshot.png"  # the README's picture: rewritten only on request
VIEWPORT = {"width": 1000, "height": 560}
SENTENCES = ["turn on the kitchen lights", "set a timer for twenty minutes"]
WAIT_MS = 20_000
# finals also while speaking, whatever the model makes of the pauses
FAST_FINALS = "endpoint.max_utterance_s=3.0"

WORDS_JS = """() => ['finals', 'partial'].map(id => document.getElementById(id).innerText)
                 .join(' ').split(/\\s+/).filter(Boolean).length"""


async def read(path) -> str:
    return await asyncio.to_thread(Path(path).read_text)


def screenshot_path(tmp_path: Path) -> Path:
    """Where the live-caption test saves its screenshot: ``$STREAMER_SCREENSHOT`` when set (relative to the
    repository root: ``STREAMER_SCREENSHOT=docs/screenshot.png`` refreshes the README's picture), else
    ``tmp_path``, so that a test run leaves the tracked file alone."""
    requested = os.environ.get("STREAMER_SCREENSHOT")
    return ROOT / requested if requested else tmp_path / "screenshot.png"


def fingerprint(path: Path) -> tuple[int, bytes] | None:
    """A file's modification time and contents (None if it is missing): equal only if nothing wrote it."""
    return (path.stat().st_mtime_ns, path.read_bytes()) if path.exists() else None


def png_size(path: Path) -> tuple[int, int]:
    """Width and height of a PNG file, from its IHDR chunk; fails on anything that is not a PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    assert data[-8:-4] == b"IEND", f"{path} is cut short"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_screenshot_is_written_only_on_request(tmp_path, monkeypatch):
    monkeypatch.delenv("STREAMER_SCREENSHOT", raising=False)
    assert screenshot_path(tmp_path) == tmp_path / "screenshot.png"
    monkeypatch.setenv("STREAMER_SCREENSHOT", "docs/screenshot.png")
    assert screenshot_path(tmp_path) == DOCS_SCREENSHOT
    monkeypatch.setenv("STREAMER_SCREENSHOT", str(tmp_path / "elsewhere.png"))
    assert screenshot_path(tmp_path) == tmp_path / "elsewhere.png"


def state_is(state: str) -> str:
    return f"() => document.body.dataset.state === {state!r}"


@pytest.fixture(scope="module")
def mic_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fake microphone: both sentences with pauses, 16 kHz s16 WAV (Chromium loops it)."""
    import soundfile as sf

    root = tmp_path_factory.mktemp("mic")
    parts = []
    for i, text in enumerate(SENTENCES):
        audio, _ = sf.read(espeak(text, root / f"{i}.wav"), dtype="float32")
        parts += [audio, np.zeros(12000, dtype=np.float32)]
    path = root / "mic.wav"
    sf.write(path, np.concatenate(parts), 16000, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def chromium() -> str:
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing; `apt-get install chromium` (.ci/run does it)")
    return CHROMIUM


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def browser(chromium: str, mic_wav: Path):
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        pytest.fail("playwright is missing; `pip install -e '.[dev]'` (no `playwright install` needed)")
    pw = await async_playwright().start()
    try:
        b = await pw.chromium.launch(
            executable_path=chromium,
            headless=True,
            timeout=60_000,
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
                "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={mic_wav}",
            ],
        )
        yield b
        await b.close()
    finally:
        await pw.stop()


@pytest.fixture(scope="module")
def demo_runner():
    """The shipped demo model when there is one (its captions are checked for words), else None."""
    if not (demo_model_dir() / "config.json").is_file():
        return None
    from streamer.config import ModelConfig
    from streamer.model import load_model

    return load_model(ModelConfig(id="demo", device="cpu"))


class Recorder:
    """An event sink on the daemon's hub: what the daemon produced, to compare with the page."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Event]] = []

    def publish(self, stream: str, session: str, event: Event) -> None:
        self.events.append((stream, event))

    def wants_partials(self, stream: str) -> bool:
        return True

    def finals(self, stream: str) -> list[str]:
        return [e.text.strip() for s, e in self.events if s == stream and isinstance(e, Final) and e.text.strip()]


PAGE_ERRORS: dict[object, list[object]] = {}


async def open_page(browser, port: int, query: str = "", scheme: str = "http", **context):
    """A new page in its own browser context (own permissions, downloads, storage, cookies)."""
    ctx = await browser.new_context(viewport=context.pop("viewport", VIEWPORT), accept_downloads=True, **context)
    page = await ctx.new_page()
    page.set_default_timeout(WAIT_MS)
    PAGE_ERRORS[page] = errors = []
    page.on("pageerror", lambda exc: errors.append(exc))
    await page.goto(f"{scheme}://127.0.0.1:{port}/{query}")
    return page


async def close(page) -> None:
    """Close the page's context; the page must not have thrown an uncaught error."""
    await page.context.close()
    errors = PAGE_ERRORS.pop(page)
    assert not errors, f"uncaught errors in the page: {errors}"


async def message(page) -> str:
    await page.wait_for_selector("#message:not([hidden])")
    return await page.inner_text("#message")


async def listens_then_stops(page) -> None:
    """The page (re)connected: listening, the error message gone; then stop it."""
    await page.wait_for_function(state_is("listening"))
    assert await page.is_hidden("#message")
    await page.click("#toggle")
    await page.wait_for_function(state_is("idle"))


async def test_live_captions_from_microphone(browser, daemon_factory, demo_runner, tmp_path):
    """Fake microphone -> worklet -> /v1/stream (with a token) -> partials and finals on the page and on
    a viewer page; stop sends the last finals; .txt/.vtt downloads hold the finals; a screenshot, which
    leaves docs/screenshot.png as it was unless $STREAMER_SCREENSHOT asks for it."""
    screenshot = screenshot_path(tmp_path)
    docs_before = fingerprint(DOCS_SCREENSHOT)
    d = await daemon_factory("server.auth_token='secret'", FAST_FINALS, runner=demo_runner)
    produced = Recorder()
    d.hub.sinks.append(produced)
    viewer = await open_page(browser, d.port, "?listen=desk&token=secret")
    page = await open_page(browser, d.port, "?token=secret&name=desk", color_scheme="dark")
    try:
        # the token went into an HttpOnly cookie: out of the pages' addresses (history) and out of scripts' reach
        assert (page.url, viewer.url) == (f"http://127.0.0.1:{d.port}/?name=desk",
                                          f"http://127.0.0.1:{d.port}/?listen=desk")
        assert await page.evaluate("document.cookie") == ""
        await viewer.wait_for_function(state_is("listening"))
        assert await page.get_attribute("body", "data-state") == "idle"
        await page.focus("#toggle")
        await page.keyboard.press("Enter")  # keyboard usable
        await page.wait_for_function(state_is("listening"))
        assert await page.inner_text("#status-text") == "Listening"
        assert await page.inner_text("#toggle") == "Stop captions"

        await page.wait_for_function(f"() => ({WORDS_JS})() > 0")
        first = await page.evaluate(WORDS_JS)
        await page.wait_for_function(f"() => ({WORDS_JS})() > {first}")  # captions keep coming
        await page.wait_for_selector("#finals .line")  # finals appended while speaking
        await page.wait_for_function(f"() => ({WORDS_JS})() >= 4")
        assert await page.get_attribute("body", "data-state") == "listening"
        assert await page.get_attribute("#finals", "aria-live") == "polite"

        await viewer.wait_for_selector("#finals .line")  # the viewer follows stream "desk"
        assert await viewer.is_hidden("#level")
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        await page.evaluate("() => document.activeElement.blur()")  # no focus ring in the picture
        await page.screenshot(path=str(screenshot))
        assert png_size(screenshot) == (VIEWPORT["width"], VIEWPORT["height"])
        if screenshot.resolve() != DOCS_SCREENSHOT.resolve():
            assert fingerprint(DOCS_SCREENSHOT) == docs_before, "the test wrote docs/screenshot.png unasked"

        await page.click("#toggle")  # stop: the last finals arrive, then the server closes
        await page.wait_for_function(state_is("idle"))
        assert await page.inner_text("#partial") == ""
        lines = await page.locator("#finals .line").all_inner_texts()
        assert lines and lines == produced.finals("desk")  # exactly the daemon's finals, in order
        assert d.active_streams == 0
        await viewer.wait_for_function(f"() => document.querySelectorAll('#finals .line').length >= {len(lines)}")
        assert await viewer.locator("#finals .line").all_inner_texts() == lines

        async with page.expect_download() as info:
            await page.click("#download-txt")
        txt = await read(await (await info.value).path())
        assert txt.splitlines() == lines
        async with page.expect_download() as info:
            await page.click("#download-vtt")
        dl = await info.value
        assert dl.suggested_filename.endswith(".vtt")
        vtt = await read(await dl.path())
        assert vtt.startswith("WEBVTT\n\n")
        cues = re.findall(r"(\d\d):(\d\d):(\d\d)\.(\d{3}) --> (\d\d):(\d\d):(\d\d)\.(\d{3})\n(.+)\n", vtt)
        assert [c[8] for c in cues] == lines
        times = [
            int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000 for c in cues for h, m, s, ms in (c[0:4], c[4:8])
        ]
        assert times == sorted(times) and times[-1] > 0

        if demo_runner is not None:  # a trained model: the spoken words are in the captions
            heard = set(" ".join(lines).lower().split())
            assert len(heard & {"turn", "kitchen", "lights", "timer", "twenty", "minutes"}) >= 2, lines
    finally:
        await close(page)
        await close(viewer)


async def test_busy_server_message_then_reconnect(browser, daemon_factory):
    d = await daemon_factory("server.max_streams=1")
    page = await open_page(browser, d.port)
    try:
        async with asyncio.timeout(WAIT_MS / 1000), connect(f"ws://127.0.0.1:{d.port}/v1/stream") as ws:
            await ws.recv()  # ready: this stream holds the only slot
            await page.click("#toggle")
            await page.wait_for_function(state_is("reconnecting"))
            text = await message(page)
            assert "Server busy" in text and "Trying again automatically" in text, text
            assert "Server busy" in await page.inner_text("#status-text")
        # the slot is free again: the page's next retry (backoff 1 s, 2 s, ...) gets in
        await listens_then_stops(page)
    finally:
        await close(page)


async def test_wrong_or_missing_token_message(browser, daemon_factory):
    d = await daemon_factory("server.auth_token='secret'")
    page = await open_page(browser, d.port, "?token=wrong")
    try:
        assert page.url == f"http://127.0.0.1:{d.port}/"  # a wrong token leaves the address too
        await page.click("#toggle")
        await page.wait_for_function(state_is("error"))
        text = await message(page)
        assert "access token is wrong" in text, text
        assert await page.inner_text("#status-text") == "Access denied"
        assert await page.inner_text("#toggle") == "Start captions"
    finally:
        await close(page)

    page = await open_page(browser, d.port)
    try:
        await page.click("#toggle")
        await page.wait_for_function(state_is("error"))
        assert "needs an access token" in await message(page)
        assert await page.is_visible("#token")  # the settings opened at the token field
        await page.fill("#token", "secret")
        await page.click("#toggle")
        await listens_then_stops(page)
    finally:
        await close(page)


async def test_microphone_denied_on_a_phone_screen(browser, daemon_factory):
    d = await daemon_factory()
    page = await open_page(browser, d.port, viewport={"width": 375, "height": 667}, is_mobile=True, has_touch=True)
    try:
        await page.evaluate("""() => { navigator.mediaDevices.getUserMedia = () =>
            Promise.reject(new DOMException('Permission denied', 'NotAllowedError')); }""")
        await page.click("#toggle")
        await page.wait_for_function(state_is("error"))
        assert "Microphone access was denied" in await message(page)
        assert d.active_streams == 0
        # phone-sized: nothing wider than the screen, the button fully visible and large enough to tap
        assert await page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")
        box = await page.locator("#toggle").bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 375 and box["height"] >= 44
        assert box["y"] + box["height"] <= 667
    finally:
        await close(page)


OPEN_SOCKET_JS = """url => new Promise(done => {
    const ws = new WebSocket(url);
    ws.onopen = () => { ws.close(); done("open"); };
    ws.onclose = ev => done("closed " + ev.code);
})"""


async def test_a_page_of_another_site_cannot_open_a_websocket(browser, daemon_factory):
    """A page served by one daemon (another origin: another port) cannot open a viewer or a stream on a second
    daemon, which answers its upgrade with 403; the page's own daemon lets it in."""
    home, other = await daemon_factory(), await daemon_factory()
    page = await open_page(browser, home.port)
    try:
        for path in ("v1/listen/desk", "v1/stream"):
            assert await page.evaluate(OPEN_SOCKET_JS, f"ws://127.0.0.1:{other.port}/{path}") == "closed 1006"
            assert await page.evaluate(OPEN_SOCKET_JS, f"ws://127.0.0.1:{home.port}/{path}") == "open"
        assert other.metrics.streams_rejected.labels("origin")._value.get() == 2
        assert home.metrics.streams_rejected.labels("origin")._value.get() == 0
    finally:
        await close(page)


async def test_live_captions_over_https(browser, daemon_factory, demo_runner, tls_files):
    """With server.tls_cert/tls_key the page is served over https:// (a secure context: the microphone works
    from other machines too) and streams over wss://, its token in a Secure cookie. The test's certificate is
    self-signed, so this browser context ignores certificate errors."""
    d = await daemon_factory(f"server.tls_cert='{tls_files['cert']}'", f"server.tls_key='{tls_files['key']}'",
                             "server.auth_token='secret'", FAST_FINALS, runner=demo_runner)
    produced = Recorder()
    d.hub.sinks.append(produced)
    page = await open_page(browser, d.port, "?token=secret&name=tls", scheme="https", ignore_https_errors=True)
    try:
        assert page.url == f"https://127.0.0.1:{d.port}/?name=tls"
        assert await page.evaluate("window.isSecureContext")
        cookies = await page.context.cookies()
        assert [(c["name"], c["secure"], c["httpOnly"]) for c in cookies] == [(f"streamer_token_{d.port}", True, True)]
        await page.click("#toggle")
        await page.wait_for_function(state_is("listening"))
        await page.wait_for_selector("#finals .line")
        await page.click("#toggle")
        await page.wait_for_function(state_is("idle"))
        lines = await page.locator("#finals .line").all_inner_texts()
        assert lines and lines == produced.finals("tls")
    finally:
        await close(page)
