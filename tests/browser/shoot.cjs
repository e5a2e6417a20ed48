// Open one page in headless Debian chromium (driven by playwright-core), save a screenshot, and report
// what the page shows. Used by tests/test_dashboard.py; never downloads a browser.
//
//   node shoot.cjs '{"url": ..., "screenshot": "out.png", "chromium": "/usr/bin/chromium",
//                    "cookies": [{"name": ..., "value": ..., "url": ...}], "waitFor": "text=fuyou:ssd-io",
//                    "queries": ["svg#timeline text.lane-label"], "timeoutMs": 60000}'
//
// Prints one JSON object: {"title", "text" (the body's innerText), "queries": {selector: [texts]}}.
// playwright-core is found through NODE_PATH (the test points it at .ci/browser/node_modules).
"use strict";
const { chromium } = require("playwright-core");

const CHROMIUM_FLAGS = [
  "--no-sandbox", // root in CI containers
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  // The network here is closed: without these chromium keeps trying to reach Google's services.
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

async function main() {
  const spec = JSON.parse(process.argv[2]);
  const browser = await chromium.launch({
    executablePath: spec.chromium || "/usr/bin/chromium",
    headless: true,
    args: CHROMIUM_FLAGS,
  });
  try {
    const context = await browser.newContext({ viewport: spec.viewport || { width: 1280, height: 900 } });
    if (spec.cookies && spec.cookies.length) await context.addCookies(spec.cookies);
    const page = await context.newPage();
    const timeout = spec.timeoutMs || 60000;
    await page.goto(spec.url, { waitUntil: "load", timeout });
    if (spec.waitFor) await page.locator(spec.waitFor).first().waitFor({ state: "visible", timeout });
    if (spec.settleMs) await page.waitForTimeout(spec.settleMs);
    await page.screenshot({ path: spec.screenshot, fullPage: spec.fullPage !== false });
    const queries = {};
    for (const sel of spec.queries || []) {
      queries[sel] = await page.locator(sel).evaluateAll((els) => els.map((e) => e.textContent.trim()));
    }
    const text = await page.evaluate(() => document.body.innerText);
    process.stdout.write(JSON.stringify({ title: await page.title(), text, queries }));
  } finally {
    await browser.close();
  }
}

main().catch((err) => {
  process.stderr.write(String(err && err.stack ? err.stack : err) + "\n");
  process.exit(1);
});
