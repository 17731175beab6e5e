"""The README's picture of xar-serve's page (docs/serve_page.png): a server on xar-digits, the page in
a headless chromium (Debian's chromium and chromium-driver, selenium), one digit generated.

    python tools/serve_screenshot.py [--out docs/serve_page.png]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "serve_page.png")
    parser.add_argument("--digit", default="7")
    parser.add_argument("--seed", default="5")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "xar_infer.serving.cli", "--port", str(port), "--log-level",
                               "warning"], env={**os.environ, "OMP_NUM_THREADS": "1"})
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=720,760"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(url + "/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        driver.get(url + "/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda page: page.find_elements(By.CSS_SELECTOR, "select#class"))
        Select(driver.find_element(By.ID, "class")).select_by_value(args.digit)
        driver.find_element(By.ID, "seed").send_keys(args.seed)
        driver.find_element(By.ID, "generate").click()
        wait.until(lambda page: page.find_element(By.ID, "image").get_attribute("data-state") == "done")
        with tempfile.NamedTemporaryFile(suffix=".png", dir=args.out.parent, delete=False) as tmp:
            pass
        driver.save_screenshot(tmp.name)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp.name, 0o666 & ~umask)  # a temporary file is private; the picture follows the umask
        os.replace(tmp.name, args.out)  # whole or nothing
        print(f"wrote {args.out}")
    finally:
        driver.quit()
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
