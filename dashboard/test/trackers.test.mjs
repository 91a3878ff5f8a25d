// Plausible's own trackers, unchanged, in headless Chromium, sending to a real tally (started by
// tests/tests/trackers.rs, which passes its address):
//
//   TALLY_URL=http://127.0.0.1:PORT CHROMIUM=/usr/bin/chromium node test/trackers.test.mjs
//
// The sites' pages (http://new.test/…, http://old.test/…, http://hash.test/…, http://news.test/)
// are answered by the browser itself (Playwright request routing), so the trackers see ordinary
// hostnames — they ignore localhost — and nothing but tally listens. Each tracker is the npm
// package as published, bundled by esbuild into the page:
//   new.test   @plausible-analytics/tracker: a UTM link followed from another site, SPA
//              navigation (history.pushState), a direct visit;
//   old.test   plausible-tracker (the older package): a visit and a pushState navigation;
//   hash.test  @plausible-analytics/tracker with hashBasedRouting: two #/routes;
//   a bot's User-Agent on new.test: accepted and not counted.
// Checked through /v1/breakdown, /v1/views and /api/v2/query. Exit status 1 on failure.
import assert from "node:assert/strict";
import { dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { build } from "esbuild";
import { chromium } from "playwright-core";

const base = process.env.TALLY_URL;
assert.ok(base, "TALLY_URL names the tally to test");
const here = dirname(fileURLToPath(import.meta.url));

async function bundle(contents) {
  const r = await build({ stdin: { contents, resolveDir: here, loader: "js" }, bundle: true, write: false, format: "iife", logLevel: "warning" });
  return r.outputFiles[0].text;
}
const trackers = {
  "new.test": await bundle(`import { init } from "@plausible-analytics/tracker";
    init({ domain: location.hostname, endpoint: window.TALLY + "/api/event" });`),
  "hash.test": await bundle(`import { init } from "@plausible-analytics/tracker";
    init({ domain: location.hostname, endpoint: window.TALLY + "/api/event", hashBasedRouting: true });`),
  "old.test": await bundle(`import Plausible from "plausible-tracker";
    Plausible({ domain: location.hostname, apiHost: window.TALLY }).enableAutoPageviews();`),
};

async function api(path, init) {
  const r = await fetch(base + path, init);
  const body = await r.json();
  assert.ok(r.ok, `${path}: ${r.status} ${JSON.stringify(body)}`);
  return body;
}

async function caughtUp() {
  for (let i = 0; i < 600; i++) {
    const s = await api("/v1/admin/status");
    if (s.speed_applied_seq === s.acked_seq) return;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error("the speed layer did not catch up");
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
    // Else navigator.webdriver is true, and the trackers ignore the browser.
    "--disable-blink-features=AutomationControlled",
    // The pages pose as public sites while tally listens on loopback, which Chromium's
    // private/local network access checks would block (a real site and tally are both public).
    "--disable-features=BlockInsecurePrivateNetworkRequests,PrivateNetworkAccessSendPreflights,LocalNetworkAccessChecks",
  ],
});

// Headless Chromium says "HeadlessChrome" in its User-Agent, which the bot list (rightly) matches:
// visitors get the desktop browser's.
const VISITOR_UA = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/156.0.0.0 Safari/537.36";

async function context(userAgent = VISITOR_UA) {
  const ctx = await browser.newContext({ userAgent });
  await ctx.route(/^http:\/\/[a-z]+\.test\//, (route) => {
    const url = new URL(route.request().url());
    const tracker = trackers[url.hostname];
    if (url.pathname === "/tracker.js") {
      return route.fulfill({ contentType: "text/javascript", body: tracker ?? "" });
    }
    const body =
      `<!doctype html><html><head><title>${url.pathname}</title></head><body>` +
      `<a id="go" href="http://new.test/pricing?utm_source=newsletter&utm_medium=email&utm_campaign=launch">launch</a>` +
      `<script>window.TALLY = ${JSON.stringify(base)};</script>` +
      (tracker ? `<script src="/tracker.js"></script>` : "") +
      `</body></html>`;
    return route.fulfill({ contentType: "text/html", body });
  });
  const page = await ctx.newPage();
  // The trackers say why they ignore an event on the console; shown when the test fails.
  page.on("console", (m) => console.error(`[${new URL(page.url()).hostname}] ${m.text()}`));
  page.on("requestfailed", (r) => console.error(`request failed: ${r.url()} ${r.failure()?.errorText}`));
  return page;
}

/** Whether a request is a tracker's page view (the new tracker also sends `engagement` events
 * when a page is left, which tally accepts and does not count). */
function isPageview(request) {
  if (request.url() !== `${base}/api/event` || request.method() !== "POST") return false;
  try {
    return JSON.parse(request.postData() ?? "{}").n === "pageview";
  } catch {
    return false;
  }
}

/** Runs `action` and waits for the page view it makes the tracker send; tally's response. */
async function tracked(page, action) {
  const [response] = await Promise.all([page.waitForResponse((r) => isPageview(r.request())), action()]);
  assert.equal(response.status(), 202, `tally answered the tracker: ${await response.text()}`);
  const ua = await response.request().headerValue("user-agent");
  assert.equal(response.headers()["x-plausible-dropped"] === "1", ua !== VISITOR_UA, `dropped iff a bot (${ua})`);
  return response;
}

const asMap = (items) => Object.fromEntries(items.map((i) => [i.value, i.views]));
async function breakdown(host, by) {
  return asMap((await api(`/v1/breakdown?host=${host}&by=${by}&limit=100`)).items);
}

try {
  // ----- @plausible-analytics/tracker --------------------------------------------------------
  const page = await context();
  await page.goto("http://news.test/");
  await tracked(page, () => page.click("#go")); // a UTM link from another site
  assert.equal(await page.evaluate(() => document.referrer), "http://news.test/");
  await tracked(page, () => page.evaluate(() => history.pushState({}, "", "/app/settings"))); // SPA
  await tracked(page, () => page.goto("http://new.test/")); // direct

  // ----- plausible-tracker (the older package) -----------------------------------------------
  await tracked(page, () => page.goto("http://old.test/docs"));
  await tracked(page, () => page.evaluate(() => history.pushState({}, "", "/docs/intro")));

  // ----- hash-based routing ------------------------------------------------------------------
  await tracked(page, () => page.goto("http://hash.test/app#/settings"));
  await tracked(page, () => page.evaluate(() => (location.hash = "#/billing")));
  await page.context().close();

  // ----- a bot: accepted, dropped ------------------------------------------------------------
  const bot = await context("Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)");
  const dropped = await tracked(bot, () => bot.goto("http://new.test/bot-page"));
  assert.equal(dropped.headers()["x-plausible-dropped"], "1", "the bot's view is dropped");
  await bot.context().close();

  await caughtUp();
  assert.deepEqual(await breakdown("new.test", "page"), { "/pricing": 1, "/app/settings": 1, "/": 1 });
  // The UTM source names the source of the link's view; the SPA view keeps the page's referrer.
  assert.deepEqual(await breakdown("new.test", "source"), { newsletter: 1, "news.test": 1, "(direct)": 1 });
  assert.deepEqual(await breakdown("new.test", "referrer"), { "news.test": 2, "(direct)": 1 });
  assert.deepEqual(await breakdown("new.test", "utm_campaign"), { launch: 1, "(none)": 2 });
  assert.deepEqual(await breakdown("new.test", "utm_medium"), { email: 1, "(none)": 2 });
  assert.deepEqual(await breakdown("old.test", "page"), { "/docs": 1, "/docs/intro": 1 });
  assert.deepEqual(await breakdown("hash.test", "page"), { "/app#/settings": 1, "/app#/billing": 1 });
  const hashView = await api(`/v1/views?url=${encodeURIComponent("http://hash.test/app#/billing")}&hash=1`);
  assert.equal(hashView.views, 1, "a hash route is a page of its own");
  // The dashboard's page of a hash route: its uniques and sources are the route's, not the
  // page's without its fragment (which has no views).
  const dash = await context();
  const route = "http://hash.test/app#/billing";
  await dash.goto(`${base}/?view=page&site=hash.test&range=today&tz=UTC&url=${encodeURIComponent(route)}`);
  await dash.waitForFunction(() => document.querySelector("main")?.dataset.rendered === location.search);
  await dash.waitForSelector("[data-kpi] .value");
  const kpi = await dash.$$eval("[data-kpi]", (els) =>
    Object.fromEntries(els.map((e) => [e.getAttribute("data-kpi"), e.querySelector(".value").getAttribute("data-value")])),
  );
  assert.equal(kpi.views, "1", `views of ${route} on the dashboard`);
  assert.equal(kpi.uniques, "1", `uniques of ${route} on the dashboard`);
  const routeSources = await dash.$$eval('table[data-breakdown="source"] tbody tr[data-item]', (rows) => rows.map((r) => r.getAttribute("data-item")));
  assert.deepEqual(routeSources, ["(direct)"], `sources of ${route} on the dashboard`);
  await dash.context().close();
  const botView = await api(`/v1/views?url=${encodeURIComponent("http://new.test/bot-page")}`);
  assert.equal(botView.views, 0, "bots are not counted");

  // The same through Plausible's Stats API: one browser is one visitor.
  const stats = await api("/api/v2/query", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ site_id: "new.test", metrics: ["pageviews", "visitors"], date_range: "day", dimensions: ["event:page"] }),
  });
  const rows = Object.fromEntries(stats.results.map((r) => [r.dimensions[0], r.metrics]));
  assert.deepEqual(rows, { "/pricing": [1, 1], "/app/settings": [1, 1], "/": [1, 1] }, JSON.stringify(stats));
  const visitors = await api("/api/v2/query", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ site_id: "new.test", metrics: ["visitors", "pageviews"], date_range: "day" }),
  });
  assert.deepEqual(visitors.results[0].metrics, [1, 3], JSON.stringify(visitors));
  console.log(JSON.stringify({ ok: true }));
} catch (e) {
  console.error(e);
  process.exitCode = 1;
} finally {
  await browser.close();
}
