"""Open a report page in headless Chromium and check that it renders and every image loads.

Playwright (https://playwright.dev/python/) drives Debian's ``chromium`` (``/usr/bin/chromium``);
Playwright's own browser download is not used. The flags keep Chromium off the network
(the page is a local file with relative links only).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

CHROMIUM_FLAGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


@dataclass(frozen=True)
class RenderResult:
    """What the browser saw.

    Attributes:
        title: the page title.
        images: number of ``<img>`` elements.
        broken: ``src`` of every image that did not load (``naturalWidth == 0`` after load).
        headings: text of the ``<h2>`` elements, in order.
        screenshot: the full-page PNG written, if one was asked for.
    """

    title: str
    images: int
    broken: tuple[str, ...]
    headings: tuple[str, ...]
    screenshot: Path | None


def find_chromium() -> str | None:
    """Path of Debian's Chromium (``chromium`` on PATH), or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def render_check(page: Path, screenshot: Path | None = None, timeout_s: float = 60.0) -> RenderResult:
    """Load ``page`` (a local HTML file) in headless Chromium and inspect it after the ``load`` event.

    Raises:
        FileNotFoundError: ``page`` does not exist, or Chromium is not installed
            (``apt-get install chromium``).
    """
    from playwright.sync_api import sync_playwright

    page = Path(page).resolve()
    if not page.is_file():
        raise FileNotFoundError(f"{page}: no such report page")
    chromium = find_chromium()
    if chromium is None:
        raise FileNotFoundError("chromium not found on PATH: install Debian's package (apt-get install chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=list(CHROMIUM_FLAGS))
        try:
            tab = browser.new_page()
            tab.goto(page.as_uri(), wait_until="load", timeout=timeout_s * 1000)
            broken = tab.evaluate(
                "Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0)"
                ".map(i => i.getAttribute('src'))"
            )
            images = tab.evaluate("document.images.length")
            headings = tab.evaluate("Array.from(document.querySelectorAll('h2')).map(h => h.textContent)")
            if screenshot is not None:
                tab.screenshot(path=str(screenshot), full_page=True)
            title = tab.title()
        finally:
            browser.close()
    return RenderResult(title, int(images), tuple(broken), tuple(headings), screenshot)
