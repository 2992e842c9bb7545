"""Arabic and Chinese captions next to English ones on the caption page, in a real headless Chromium.

Three daemons on port 0, one per language (the demo model in English, the tiny random Arabic and Chinese
checkpoints of ``test_languages``, each with its ``[model] language``), each captioning espeak-ng speech in
its language streamed to it over the native protocol as stream ``desk``. One page holds three caption
viewers (``/?listen=desk`` of each daemon) side by side. The test checks what can break for other scripts:
the captions' ``lang`` comes from the model's language, the Arabic lines resolve right to left (and sit on
the right), and their glyphs are drawn with fonts that have them (Chromium's own record of the fonts it used
for each line, not a box of tofu). The picture is written to ``docs/languages.png`` when
``$STREAMER_SCREENSHOT_LANGUAGES`` asks for it (as ``test_web`` does for ``docs/screenshot.png``).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest
from test_languages import SCRIPTS, native_frames, tiny_checkpoint
from test_web import CHROMIUM, png_size

from streamer.testing import espeak

ROOT = Path(__file__).resolve().parents[1]
DOCS_PICTURE = ROOT / "docs" / "languages.png"
VIEWPORT = {"width": 1500, "height": 600}
WAIT_MS = 60_000

LANGUAGES = {
    # column: (model language, espeak-ng voice, what is said, checkpoint script in test_languages or None: demo)
    "English": ("en", "en-us", "turn on the kitchen lights", None),
    "Arabic": ("ar", "ar", "مرحبا بالعالم", "arabic"),
    "Chinese": ("zh", "cmn", "你好世界", "chinese"),
}

LINES_JS = """() => [...document.querySelectorAll('#finals .line')].map(line => {
    const range = document.createRange();
    range.selectNodeContents(line);
    const text = range.getBoundingClientRect(), box = line.getBoundingClientRect();
    return {text: line.textContent, dir: line.dir, direction: getComputedStyle(line).direction,
            width: text.width, height: text.height, left: text.left - box.left, right: box.right - text.right};
})"""


def picture_path(tmp_path: Path) -> Path:
    """``$STREAMER_SCREENSHOT_LANGUAGES`` (relative to the repository root: ``docs/languages.png`` refreshes the
    picture docs/languages.md shows), else ``tmp_path``: a test run leaves the tracked file alone."""
    requested = os.environ.get("STREAMER_SCREENSHOT_LANGUAGES")
    return ROOT / requested if requested else tmp_path / "languages.png"


async def fonts_of(session: Any, title: str, selector: str) -> list[list[str]]:
    """The platform fonts Chromium drew each element matching ``selector`` in the iframe titled ``title`` with
    (DevTools' CSS domain; the caption pages share the wrapper page's renderer and session)."""
    await session.send("DOM.enable")
    await session.send("CSS.enable")
    root = (await session.send("DOM.getDocument", {"depth": -1, "pierce": True}))["root"]

    def iframes(node: dict[str, Any]) -> list[dict[str, Any]]:
        found = [node] if node.get("nodeName") == "IFRAME" else []
        return found + [f for child in node.get("children", []) for f in iframes(child)]

    frame = next(f for f in iframes(root) if title in f.get("attributes", [])[1::2])
    doc = frame["contentDocument"]["nodeId"]
    nodes = (await session.send("DOM.querySelectorAll", {"nodeId": doc, "selector": selector}))["nodeIds"]
    out = []
    for node in nodes:
        fonts = (await session.send("CSS.getPlatformFontsForNode", {"nodeId": node}))["fonts"]
        out.append([f["familyName"] for f in fonts if f["glyphCount"] > 0])
    return out


@pytest.fixture
def voices(tmp_path: Path) -> dict[str, tuple[Path | None, Path]]:
    """column -> (its tiny checkpoint, None for the demo model; espeak-ng speech in its language)."""
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing; `apt-get install chromium` (.ci/run does it)")
    out = {}
    for column, (_, voice, said, script) in LANGUAGES.items():
        ckpt = None
        if script is not None:
            letters, _, _, delimiter = SCRIPTS[script]
            ckpt = tiny_checkpoint(tmp_path / script, letters, delimiter=delimiter)
        out[column] = (ckpt, espeak(said, tmp_path / f"{column}.wav", voice=voice))
    return out


async def test_arabic_and_chinese_captions_beside_english(daemon_factory, voices, tmp_path):
    from playwright.async_api import async_playwright

    from streamer.config import ModelConfig
    from streamer.model import load_model

    daemons, wavs = {}, {}
    for column, (ckpt, wav) in voices.items():
        runner = None if ckpt is None else await asyncio.to_thread(load_model, ModelConfig(id=str(ckpt), device="cpu"))
        daemons[column] = await daemon_factory(f"model.language='{LANGUAGES[column][0]}'",
                                               "endpoint.max_utterance_s=1.5", runner=runner)
        wavs[column] = wav
    frames = "".join(f'<iframe title="{c}" src="http://127.0.0.1:{d.port}/?listen=desk"></iframe>'
                     for c, d in daemons.items())
    wrapper = ("<!doctype html><meta charset='utf-8'><style>body{margin:0;display:flex}"
               f"iframe{{border:0;border-right:1px solid #8884;flex:1;height:100vh}}</style>{frames}")

    pw = await async_playwright().start()
    try:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True, timeout=WAIT_MS,
                                           args=["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                                 "--disable-background-networking", "--disable-component-update"])
        page = await (await browser.new_context(viewport=VIEWPORT)).new_page()
        page.set_default_timeout(WAIT_MS)
        errors: list[object] = []
        page.on("pageerror", lambda exc: errors.append(exc))
        await page.set_content(wrapper)
        viewers = {}
        for column, d in daemons.items():
            frame = next(f for f in page.frames if f.url.startswith(f"http://127.0.0.1:{d.port}/"))
            await frame.wait_for_function("() => document.body.dataset.state === 'listening'")
            viewers[column] = frame
        # the speech of each language to its daemon's stream "desk", which the viewers follow
        await asyncio.gather(*(native_frames(d.port, wavs[c], {"name": "desk"}) for c, d in daemons.items()))
        for frame in viewers.values():
            await frame.wait_for_selector("#finals .line")
        await page.screenshot(path=str(picture := picture_path(tmp_path)))
        assert png_size(picture) == (VIEWPORT["width"], VIEWPORT["height"])

        session = await page.context.new_cdp_session(page)
        for column, frame in viewers.items():
            lang = LANGUAGES[column][0]
            assert await frame.get_attribute("#finals", "lang") == lang  # from ready's [model] language
            lines = await frame.evaluate(LINES_JS)
            assert lines and all(line["dir"] == "auto" and line["width"] > 0 and line["height"] > 0 for line in lines)
            rtl = column == "Arabic"
            assert {line["direction"] for line in lines} == {"rtl" if rtl else "ltr"}
            # each line starts at the side its script is read from: Arabic's on the right, the others on the left
            assert all((line["right"] if rtl else line["left"]) < 2 for line in lines)
            fonts = await fonts_of(session, column, "#finals .line")
            want = {"English": "", "Arabic": "Arabic", "Chinese": "CJK"}[column]
            assert fonts and all(any(want in family for family in used) for used in fonts), fonts
        assert not errors, f"uncaught errors in the page: {errors}"
    finally:
        await pw.stop()
