"""A PNG of a graft compare page as a browser shows it (headless Chromium through Playwright):
    python examples/page_screenshot.py runs/bbc-matrix/report/index.html examples/figures/bbc-matrix-report.png
Needs Playwright (pip install playwright) and a Chromium: Debian's package (apt-get install chromium) is found on the
PATH, else Playwright's own (playwright install chromium)."""

import shutil
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright


def main(page_path: str, out: str, width: int = 1400) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"]) if chromium \
            else p.chromium.launch()
        page = browser.new_page(viewport={"width": width, "height": 900})
        page.goto(Path(page_path).resolve().as_uri())
        page.screenshot(path=out, full_page=True)
        browser.close()
    print(f"Wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
