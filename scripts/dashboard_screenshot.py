"""Screenshots of a dashboard in headless chromium (for docs/evaluate.md):

    python scripts/dashboard_screenshot.py data/runs/quickstart/dashboard docs/dashboard --feature 12

writes docs/dashboard_index.png and docs/dashboard_feature.png (with --absorption also
docs/dashboard_absorption.png, the index's absorption table, where evaluate --absorption ran).
Needs chromium and chromedriver
(Debian: apt-get install chromium chromium-driver) and selenium (in the test extra).
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dashboard", type=Path, help="a dashboard folder (with index.html)")
    ap.add_argument("prefix", help="output prefix: PREFIX_index.png, PREFIX_feature.png")
    ap.add_argument("--feature", type=int, required=True, help="feature to show")
    ap.add_argument("--size", default="1300,1500", help="window width,height")
    ap.add_argument("--absorption", action="store_true", help="also PREFIX_absorption.png: the absorption table")
    args = ap.parse_args()
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={args.size}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    try:
        page = (args.dashboard / "index.html").resolve().as_uri()
        driver.get(page)
        WebDriverWait(driver, 30).until(ec.presence_of_element_located((By.CSS_SELECTOR, "#index tbody tr")))
        driver.find_element(By.CSS_SELECTOR, "th[data-key=max]").click()
        driver.save_screenshot(f"{args.prefix}_index.png")
        if args.absorption:
            found = driver.find_elements(By.ID, "absorption")
            if not found:
                raise SystemExit(f"{args.dashboard} has no absorption table: run evaluate RUN --absorption, "
                                 "then evaluate RUN --no-metrics --dashboard")
            found[0].screenshot(f"{args.prefix}_absorption.png")
        driver.get(f"{page}#f={args.feature}")
        driver.refresh()
        WebDriverWait(driver, 30).until(ec.presence_of_element_located((By.CSS_SELECTOR, "#top-examples .example")))
        driver.save_screenshot(f"{args.prefix}_feature.png")
    finally:
        driver.quit()
    print(f"{args.prefix}_index.png {args.prefix}_feature.png")


if __name__ == "__main__":
    main()
