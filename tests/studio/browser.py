"""Headless Debian chromium through Playwright, for the studio's browser tests and bench_click.

Never downloads a browser: Playwright drives the system's /usr/bin/chromium (executable_path), each
context in a fresh temporary user-data directory. Pytest fixtures here (import them into a test
module): `chromium` (one browser per module, skipped with the reason when chromium is absent) and
`static_server` (the studio's static folder over loopback, for pages that need no API).
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import shutil
import tempfile
import threading
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run", "--disable-sync", "--disable-dev-shm-usage"]
STATIC = Path(__file__).resolve().parents[2] / "services" / "studio" / "static"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
VIEWPORT = {"width": 1440, "height": 900}


def chromium_missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is absent (apt-get install chromium; CI installs it)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright (the Python package) is not installed"
    return None


class Browser:
    """One chromium process; contexts each with a fresh temporary user-data directory."""

    def __init__(self, headless: bool = True):
        from playwright.sync_api import sync_playwright

        self._pw = sync_playwright().start()
        self._dirs: list[str] = []
        self._contexts = []
        self.headless = headless

    def context(self, viewport: dict | None = None):
        """A new browser context (its own cookies, sessionStorage, localStorage) on a fresh profile."""
        user_dir = tempfile.mkdtemp(prefix="studio-chromium-")
        self._dirs.append(user_dir)
        ctx = self._pw.chromium.launch_persistent_context(
            user_dir, executable_path=str(CHROMIUM), headless=self.headless, args=ARGS,
            viewport=viewport or VIEWPORT)
        ctx.set_default_timeout(30_000)
        self._contexts.append(ctx)
        return ctx

    def page(self, viewport: dict | None = None):
        ctx = self.context(viewport)
        return ctx.pages[0] if ctx.pages else ctx.new_page()

    def close(self) -> None:
        for ctx in self._contexts:
            with contextlib.suppress(Exception):
                ctx.close()
        self._contexts.clear()
        with contextlib.suppress(Exception):
            self._pw.stop()
        for d in self._dirs:
            shutil.rmtree(d, ignore_errors=True)
        self._dirs.clear()


@contextlib.contextmanager
def launched(headless: bool = True):
    b = Browser(headless)
    try:
        yield b
    finally:
        b.close()


def watch_console(page, sink: list[str]) -> None:
    """Collect the page's console errors and uncaught exceptions into sink."""
    page.on("console", lambda m: sink.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: sink.append(f"pageerror: {e}"))


def screenshot(page, name: str) -> Path:
    """Save a screenshot under tests/studio/artifacts/ (written at run time)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path))
    return path


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serve_static(root: Path = STATIC):
    """The static folder at http://127.0.0.1:PORT/static/ (a plain stdlib server)."""
    parent = tempfile.mkdtemp(prefix="studio-static-")
    (Path(parent) / "static").symlink_to(root)
    handler = functools.partial(_Quiet, directory=parent)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        shutil.rmtree(parent, ignore_errors=True)


@pytest.fixture(scope="module")
def chromium():
    reason = chromium_missing()
    if reason:
        pytest.skip(reason)
    with launched() as b:
        yield b


@pytest.fixture(scope="module")
def static_server():
    with serve_static() as url:
        yield url
