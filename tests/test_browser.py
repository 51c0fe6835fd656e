"""JupyterLab in a real browser: a chapter runs, its slider answers, its links open.

The notebooks are checked cell by cell elsewhere (nbval, `make notebooks`); this test checks what
only a browser shows. It starts JupyterLab the way `make lab` does (root: the repository) with a
token on a free local port and its own throwaway Jupyter settings, then drives headless Chromium
through Selenium and the system's chromedriver:

* it opens chapter 04 (RMSNorm: short, and it has ipywidgets sliders), clears the committed
  outputs and runs every cell with the menu (Edit → Clear Outputs of All Cells, Run → Run All
  Cells) on the project's kernel, and waits until every code cell has run and the kernel is idle;
* no cell may produce an error output, and the kernel must neither die nor restart;
* moving a slider with the keyboard must change the printed readout tied to it (a kernel round
  trip: the text is computed by the notebook's Python callback);
* every link to a local file in the chapter must answer 200, and following the one to the
  exercises notebook must open it in JupyterLab; the welcome chapter's figures (../assets/*.png)
  must load, and opening one in a tab must show the image;
* the browser console must stay free of errors, and the server must not answer 5xx.

`make browser` runs it. It is skipped when Chromium or chromedriver is missing (Debian:
`apt-get install chromium chromium-driver`); `.ci/run` installs them.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

pytestmark = pytest.mark.browser

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CHAPTER = "notebooks/04_rmsnorm.ipynb"  # about 20 s to run on two busy cores
EXERCISES = "chapters/04_rmsnorm/exercises.ipynb"  # the chapter's last cell links to it
WELCOME = "notebooks/00a_welcome.ipynb"  # the chapter that shows ../assets/*.png
CHROME_FLAGS = (
    "--headless=new",
    "--no-sandbox",  # containers run as root, where Chromium's sandbox cannot start
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-proxy-server",  # only the local server is visited: never through a proxy
    "--window-size=1400,1000",
)
# Plain requests to the local server, never through a proxy from the environment.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
SERVER_START_S = 60
RUN_ALL_S = 120
DEAD_KERNEL = {"dead", "restarting", "autorestarting"}  # JupyterLab's kernel statuses


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


def _chromedriver() -> str | None:
    """Debian's chromedriver (package chromium-driver), else the first one on PATH."""
    if os.access("/usr/bin/chromedriver", os.X_OK):
        return "/usr/bin/chromedriver"
    return shutil.which("chromedriver")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Lab:
    """A JupyterLab server on 127.0.0.1 (see the `lab` fixture)."""

    def __init__(self, home: Path):
        self.home = home
        self.token = secrets.token_hex(16)
        self.log = home / "server.log"
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def request(self, path: str, method: str = "GET", timeout: float = 10) -> tuple[int, bytes]:
        """(HTTP status, body) of a plain request to the server, authenticated by the token."""
        url = path if path.startswith("http") else self.base + path
        req = urllib.request.Request(url, method=method)
        req.add_header("Authorization", f"token {self.token}")
        try:
            with OPENER.open(req, timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def api(self, path: str):
        status, body = self.request(path)
        assert status == 200, f"{path}: HTTP {status}\n{self.log_tail()}"
        return json.loads(body)

    def log_tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "server log (tail):\n" + "\n".join(text.splitlines()[-lines:])

    def start(self) -> None:
        home = self.home
        self.port = _free_port()
        # Throwaway settings: no notebook virtualisation (every cell stays in the DOM), no autosave
        # (the test must never write the chapter back), no news or update checks (no network).
        settings = home / "lab" / "user-settings" / "@jupyterlab"
        for plugin, values in {
            "notebook-extension/tracker": {"windowingMode": "none"},
            "docmanager-extension/plugin": {"autosave": False},
            "apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
        }.items():
            target = settings / f"{plugin}.jupyterlab-settings"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(values))
        env = dict(os.environ)
        env.pop("MPLBACKEND", None)  # as under `make lab`: the kernel picks the inline backend
        env.update(
            JUPYTER_CONFIG_DIR=str(home / "config"),
            JUPYTER_DATA_DIR=str(home / "data"),  # no user kernelspec shadows the project's
            JUPYTER_RUNTIME_DIR=str(home / "runtime"),
            JUPYTERLAB_SETTINGS_DIR=str(home / "lab" / "user-settings"),
            JUPYTERLAB_WORKSPACES_DIR=str(home / "lab" / "workspaces"),
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            OMP_NUM_THREADS="1",
            HF_HUB_OFFLINE="1",
            HF_DATASETS_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
        )
        command = [
            sys.executable, "-m", "jupyterlab",
            f"--ServerApp.root_dir={ROOT}",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={self.port}",
            "--ServerApp.port_retries=0",
            "--no-browser",
            f"--IdentityProvider.token={self.token}",
            # Opening a notebook saves a checkpoint of it: into the temporary folder, not the
            # repository (an absolute checkpoint_dir replaces the per-folder .ipynb_checkpoints).
            f"--FileCheckpoints.checkpoint_dir={home / 'checkpoints'}",
            "--LabApp.expose_app_in_browser=True",  # window.jupyterapp: read the notebook model
            "--LabApp.news_url=None",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        ]  # fmt: skip
        if os.getuid() == 0:
            command.append("--allow-root")
        with open(self.log, "wb") as log:
            # Its own process group, so that the finaliser can end whatever is left of it.
            self.proc = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip

    def wait_ready(self) -> bool:
        """True once the server answers; False if another process took its port first."""
        deadline = time.monotonic() + SERVER_START_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                if "already in use" in self.log.read_text(errors="replace"):
                    return False
                pytest.fail(f"JupyterLab exited early\n{self.log_tail()}")
            try:
                if self.request("/api/status", timeout=2)[0] == 200:
                    return True
            except OSError:
                pass
            time.sleep(0.5)
        pytest.fail(f"JupyterLab did not answer within {SERVER_START_S} s\n{self.log_tail()}")

    def stop(self) -> None:
        """Shut down the kernels and the server; kill what is left after a grace period."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            for kernel in self.api("/api/kernels"):
                self.request(f"/api/kernels/{kernel['id']}", method="DELETE", timeout=15)
            self.request("/api/shutdown", method="POST", timeout=10)
        except (OSError, AssertionError, ValueError):
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                continue


@pytest.fixture(scope="module")
def lab(request, tmp_path_factory):
    if not (_chromium() and _chromedriver()):
        pytest.skip(
            "needs Chromium and chromedriver (Debian: apt-get install chromium chromium-driver)"
        )
    server = Lab(tmp_path_factory.mktemp("jupyter"))
    request.addfinalizer(server.stop)  # registered first: a failed start is cleaned up too
    for _ in range(3):  # the free port can be taken between choosing it and binding it
        server.start()
        if server.wait_ready():
            return server
    pytest.fail(f"JupyterLab found no free port\n{server.log_tail()}")


@pytest.fixture(scope="module")
def browser(request, lab):
    options = webdriver.ChromeOptions()
    options.binary_location = _chromium()
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: Selenium Manager is skipped, so nothing is downloaded at run time.
    service = webdriver.ChromeService(
        executable_path=_chromedriver(), log_output=str(lab.home / "chromedriver.log")
    )
    driver = webdriver.Chrome(options=options, service=service)
    request.addfinalizer(driver.quit)
    driver.set_script_timeout(30)
    return driver


# JavaScript run in the page: the current document of JupyterLab (window.jupyterapp).
CURRENT_NOTEBOOK = """
const app = window.jupyterapp;
const widget = app && app.shell.currentWidget;
if (!widget || !widget.context || widget.context.path !== arguments[0]) return null;
if (!widget.context.isReady || !widget.content || !widget.content.model) return null;
const session = widget.sessionContext && widget.sessionContext.session;
const kernel = session && session.kernel;
const cells = [];
for (const cell of widget.content.model.cells) {
  if (cell.type !== 'code') continue;
  cells.push({
    count: cell.executionCount,
    state: cell.executionState === undefined ? null : cell.executionState,
    outputs: cell.outputs.toJSON().map(o => ({
      type: o.output_type, ename: o.ename || null, evalue: o.evalue || null,
    })),
  });
}
return {kernel: kernel ? kernel.status : null, kernelId: kernel ? kernel.id : null,
        kernelName: kernel ? kernel.name : null, cells: cells};
"""


def notebook_state(driver, path: str):
    """The current notebook's kernel status and code cells, or None until `path` is open."""
    return driver.execute_script(CURRENT_NOTEBOOK, path)


# Records every kernel status of the current notebook from now on, in window.kernelStatuses: a
# kernel that dies and restarts keeps its id, so only its statuses tell.
RECORD_KERNEL_STATUSES = """
window.kernelStatuses = [];
window.jupyterapp.shell.currentWidget.sessionContext.statusChanged.connect(
  (_, status) => window.kernelStatuses.push(status));
"""


def wait(driver, seconds: float, condition, message: str, lab: Lab | None = None):
    try:
        return WebDriverWait(driver, seconds, poll_frequency=0.25).until(lambda d: condition(d))
    except WebDriverException as error:
        tail = f"\n{lab.log_tail()}" if lab else ""
        pytest.fail(f"{message} ({type(error).__name__}){tail}")


def click_menu(driver, menu: str, label: str) -> None:
    """Open the menu bar's `menu` and click its item `label`, as a user would."""
    bar = driver.find_elements(By.CSS_SELECTOR, "#jp-MainMenu .lm-MenuBar-item")
    labels = [item.text.strip() for item in bar]
    assert menu in labels, f"no {menu!r} menu in the menu bar: {labels}"
    bar[labels.index(menu)].click()
    items = "[...document.querySelectorAll('.lm-Menu-item')].filter(e => e.offsetParent)"
    find = f"return {items}.find(e => e.innerText.split('\\t')[0] === arguments[0]) || null"
    try:
        item = WebDriverWait(driver, 10, poll_frequency=0.25).until(
            lambda d: d.execute_script(find, label)
        )
    except WebDriverException:
        shown = driver.execute_script(f"return {items}.map(e => e.innerText.split('\\t')[0])")
        pytest.fail(f"menu {menu!r} has no item {label!r}: {shown}")
    item.click()


def no_dialog(driver) -> str | None:
    """The text of an open JupyterLab dialog (kernel died, file not found…), else None."""
    dialogs = [d for d in driver.find_elements(By.CSS_SELECTOR, ".jp-Dialog") if d.is_displayed()]
    return dialogs[0].text if dialogs else None


# Console errors that are harmless, each with the reason. None is known today: JupyterLab, the
# widgets and the figures load without one (warnings and debug messages are not errors).
HARMLESS_CONSOLE_ERRORS: tuple[re.Pattern[str], ...] = ()


def console_errors(driver) -> list[str]:
    """The page's console errors since the last call (reading the log empties it)."""
    return [
        entry["message"] for entry in driver.get_log("browser")
        if entry["level"] == "SEVERE"
        and not any(pattern.search(entry["message"]) for pattern in HARMLESS_CONSOLE_ERRORS)
    ]  # fmt: skip


def test_chapter_runs_and_its_widgets_and_links_work(lab, browser):
    driver = browser
    chapter_bytes = (ROOT / CHAPTER).read_bytes()
    checkpoints = {
        (ROOT / path).parent / ".ipynb_checkpoints" for path in (CHAPTER, EXERCISES, WELCOME)
    }
    checkpoints = {folder for folder in checkpoints if not folder.exists()}  # must stay absent

    # --- open the chapter and wait for its kernel -------------------------------------------
    driver.get(f"{lab.base}/lab/tree/{CHAPTER}?token={lab.token}")
    state = wait(
        driver, 60,
        lambda d: (s := notebook_state(d, CHAPTER)) and s["kernel"] == "idle" and s,
        f"{CHAPTER} did not open with an idle kernel", lab,
    )  # fmt: skip
    kernel_id = state["kernelId"]
    assert state["kernelName"] == "python3", state["kernelName"]
    kernelspec = lab.api("/api/kernelspecs")["kernelspecs"]["python3"]["spec"]
    # The kernelspec inside the project's environment (jupyter_client runs it with the server's
    # own interpreter, the one running this test).
    assert kernelspec["argv"][0] in ("python", sys.executable, "python3"), kernelspec["argv"]

    # --- clear the committed outputs, then Run All from the menu ----------------------------
    click_menu(driver, "Edit", "Clear Outputs of All Cells")
    wait(
        driver, 10,
        lambda d: (s := notebook_state(d, CHAPTER))
        and all(c["count"] is None and not c["outputs"] for c in s["cells"]),
        "Clear Outputs of All Cells left outputs behind",
    )  # fmt: skip
    driver.execute_script(RECORD_KERNEL_STATUSES)
    started = time.monotonic()
    click_menu(driver, "Run", "Run All Cells")

    def finished(d):
        s = notebook_state(d, CHAPTER)
        if s is None:
            return False
        statuses = d.execute_script("return window.kernelStatuses")
        assert not DEAD_KERNEL & {s["kernel"], *statuses}, f"the kernel died: {statuses}"
        assert s["kernelId"] == kernel_id, "the notebook changed kernel during Run All"
        if dialog := no_dialog(d):
            pytest.fail(f"JupyterLab showed a dialog while running the chapter: {dialog}")
        if s["kernel"] != "idle" or any(c["state"] == "running" for c in s["cells"]):
            return False  # queued cells are "running" too
        # Done: every cell ran, or one failed (JupyterLab then skips the rest).
        failed = any(o["type"] == "error" for c in s["cells"] for o in c["outputs"])
        return s if failed or all(c["count"] is not None for c in s["cells"]) else False

    state = wait(driver, RUN_ALL_S, finished, f"Run All did not finish in {RUN_ALL_S} s", lab)
    run_all_s = time.monotonic() - started

    # (a) no error output; the prompts show execution counts, the figures rendered
    errors = [
        f"code cell {i}: {o['ename']}: {o['evalue']}"
        for i, cell in enumerate(state["cells"]) for o in cell["outputs"] if o["type"] == "error"
    ]  # fmt: skip
    assert not errors, "cells raised errors:\n" + "\n".join(errors)
    assert all(c["count"] is not None for c in state["cells"]), "some cells did not run"
    prompts = [
        e.text for e in driver.find_elements(By.CSS_SELECTOR, ".jp-CodeCell .jp-InputPrompt")
    ]
    assert prompts and all(re.fullmatch(r"\[\d+\]:", p) for p in prompts), prompts
    committed = json.loads(chapter_bytes)
    figures = sum(
        "image/png" in o.get("data", {}) for c in committed["cells"] for o in c.get("outputs", [])
    )
    loaded = driver.execute_script(
        "return [...document.querySelectorAll('.jp-OutputArea-output img')]"
        ".filter(i => i.complete && i.naturalWidth > 0).length"
    )
    assert loaded >= figures > 0, f"{loaded} figures rendered, the chapter has {figures}"

    # (b) the sliders: a key press on a handle changes the readout the kernel prints
    box = wait(
        driver, 20,
        lambda d: next((b for b in d.find_elements(By.CSS_SELECTOR, ".widget-vbox")
                        if "scale a" in b.text and b.find_elements(By.CSS_SELECTOR, ".noUi-handle")
                        and "RMSNorm output moves" in b.text), None),
        "the chapter's slider widget did not render",
    )  # fmt: skip
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", box)
    readout = box.find_element(By.CSS_SELECTOR, ".widget-output")
    before = readout.text
    assert before.startswith("a = 1, b = +0.0:"), before
    sliders = box.find_elements(By.CSS_SELECTOR, ".widget-slider")
    assert len(sliders) == 2, [s.text for s in sliders]
    for slider, key, expected in (
        (sliders[0], Keys.ARROW_RIGHT, "a = 1.26, b = +0.0:"),  # log slider: 10 ** 0.1
        (sliders[1], Keys.ARROW_RIGHT, "a = 1.26, b = +0.1:"),
    ):
        slider.find_element(By.CSS_SELECTOR, ".noUi-handle").send_keys(key)
        wait(
            driver, 15, lambda d, e=expected: readout.text.startswith(e),
            f"the readout did not follow the slider (expected {expected!r}, "
            f"shows {readout.text!r})",
        )  # fmt: skip
    after = readout.text
    # A shift moves RMSNorm's output (it does not centre), not LayerNorm's.
    moved = re.search(r"RMSNorm output moves ([\d.]+), LayerNorm output moves ([\d.]+)", after)
    assert moved and float(moved[1]) > 0 and float(moved[2]) == 0, after
    statuses = driver.execute_script("return window.kernelStatuses")
    assert not DEAD_KERNEL & set(statuses), f"the kernel died: {statuses}"

    # (c) links: every local link in the chapter answers 200; the exercises one opens in Lab
    links = driver.execute_script(
        "return [...document.querySelectorAll('.jp-RenderedMarkdown a[href]')]"
        ".map(a => [a.getAttribute('href'), a.href])"
    )
    # JupyterLab resolves a relative link against the notebook's folder and points it at /files/.
    local = [
        (raw, url) for raw, url in links
        if url.startswith(lab.base) and not urlsplit(url).path.startswith("/lab/")
    ]  # fmt: skip
    paths = [unquote(urlsplit(url).path) for _, url in local]
    assert f"/files/{EXERCISES}" in paths, "no link to the exercises:\n" + "\n".join(
        map(str, links)
    )
    for raw, url in local:
        status, _ = lab.request(url)
        assert status == 200, f"link {raw} ({url}): HTTP {status}"
    status, _ = lab.request(f"/api/contents/{EXERCISES}?content=0")
    assert status == 200, f"{EXERCISES}: HTTP {status}"
    anchor = driver.find_element(
        By.CSS_SELECTOR, f".jp-RenderedMarkdown a[href*='/files/{EXERCISES}']"
    )
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", anchor)
    anchor.click()
    # Opened in JupyterLab, its own kernel up (waiting for it also keeps the kernel's websocket
    # from being cut half-open when the browser quits, which the server logs as a 500).
    wait(
        driver, 30,
        lambda d: (s := notebook_state(d, EXERCISES)) and s["cells"] and s["kernel"] == "idle",
        f"following the link did not open {EXERCISES} with an idle kernel", lab,
    )  # fmt: skip
    assert no_dialog(driver) is None, no_dialog(driver)

    # The welcome chapter's figures: ../assets/*.png, resolved against the notebooks folder.
    driver.execute_script(
        "window.jupyterapp.commands.execute('docmanager:open', {path: arguments[0]})", WELCOME
    )
    images = wait(
        driver, 30,
        lambda d: (s := notebook_state(d, WELCOME)) and s["kernel"] == "idle"
        and (found := d.execute_script(
            "return [...document.querySelectorAll('.jp-RenderedMarkdown img')]"
            ".filter(i => i.getAttribute('src').includes('assets/'))"
            ".map(i => [i.getAttribute('src'), i.src, i.complete, i.naturalWidth])"))
        and all(complete for _, _, complete, _ in found) and found,
        f"{WELCOME} showed no ../assets figures", lab,
    )  # fmt: skip
    assert len(images) >= 2, images
    for raw, url, _, width in images:
        assert width > 0, f"figure {raw} did not load ({url})"
        status, body = lab.request(url)
        assert status == 200 and body.startswith(b"\x89PNG"), f"figure {raw} ({url}): HTTP {status}"
    errors = console_errors(driver)  # before leaving the page: the log belongs to it
    lab_window = driver.current_window_handle
    driver.switch_to.new_window("tab")
    driver.get(images[0][1])
    shown = driver.execute_script(
        "const i = document.querySelector('img'); return i && i.naturalWidth;"
    )
    assert shown, f"opening {images[0][1]} did not show the figure"
    errors += console_errors(driver)
    driver.close()
    driver.switch_to.window(lab_window)

    # (d) the browser console, (e) the kernel at the end, and the server
    assert not errors, "browser console errors:\n" + "\n".join(errors)
    session = next((s for s in lab.api("/api/sessions") if s["path"] == CHAPTER), None)
    assert session and session["kernel"]["id"] == kernel_id, session
    dead = [s["path"] for s in lab.api("/api/sessions") if s["kernel"]["execution_state"] == "dead"]
    assert not dead, f"dead kernels: {dead}"
    log = lab.log.read_text(errors="replace")
    server_errors = [line for line in log.splitlines() if re.search(r"\] 5\d\d |Traceback", line)]
    assert not server_errors, "server errors:\n" + "\n".join(server_errors)
    assert (ROOT / CHAPTER).read_bytes() == chapter_bytes, "the test changed the chapter on disk"
    assert not [f for f in checkpoints if f.exists()], "JupyterLab wrote checkpoints into the repo"
    print(f"Run All took {run_all_s:.1f} s")
