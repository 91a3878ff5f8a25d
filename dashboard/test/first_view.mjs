// The dashboard's first view, measured in Chromium (scripts/bench.sh analytics):
//
//   TALLY_URL=http://127.0.0.1:PORT SITE=h0.bench [RUNS=5] CHROMIUM=/usr/bin/chromium node test/first_view.mjs
//
// Opens the site view of SITE for the last 30 days in a fresh browser context (empty cache) RUNS
// times and prints one JSON object: the median and worst time from navigation start to the
// view's first numbers on screen (the page's `tally:rendered` mark: totals, chart, realtime), the
// median time until its six breakdown panels are filled too (`tally:complete`), and the bytes
// transferred for the page itself (HTML, script, style; not the API answers).
import { chromium } from "playwright-core";

const base = process.env.TALLY_URL;
const site = process.env.SITE;
const runs = Number(process.env.RUNS ?? 5);
if (!base || !site) throw new Error("TALLY_URL and SITE are required");

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const times = [];
const complete = [];
let bytes = 0;
try {
  for (let i = 0; i < runs; i++) {
    const context = await browser.newContext({ viewport: { width: 1280, height: 900 }, timezoneId: "UTC" });
    const page = await context.newPage();
    await page.goto(`${base}/?view=site&site=${encodeURIComponent(site)}&range=30d`);
    await page.waitForFunction(() => performance.getEntriesByName("tally:rendered").length > 0, null, { timeout: 60_000 });
    times.push(await page.evaluate(() => performance.getEntriesByName("tally:rendered")[0].startTime));
    await page.waitForFunction(() => performance.getEntriesByName("tally:complete").length > 0, null, { timeout: 120_000 });
    complete.push(await page.evaluate(() => performance.getEntriesByName("tally:complete")[0].startTime));
    bytes = await page.evaluate(() =>
      performance
        .getEntriesByType("navigation")
        .concat(performance.getEntriesByType("resource").filter((r) => !r.name.includes("/v1/")))
        .reduce((s, e) => s + e.transferSize, 0),
    );
    await context.close();
  }
} finally {
  await browser.close();
}
const median = (xs) => Math.round(xs.sort((a, b) => a - b)[xs.length >> 1]);
console.log(
  JSON.stringify({
    runs,
    interactive_ms_median: median(times),
    interactive_ms_max: Math.round(Math.max(...times)),
    complete_ms_median: median(complete),
    first_view_bytes: bytes,
  }),
);
