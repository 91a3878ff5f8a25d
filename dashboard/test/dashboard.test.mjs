// The dashboard in headless Chromium against a real tally with data (started and seeded by
// tests/tests/dashboard.rs, which passes its address):
//
//   TALLY_URL=http://127.0.0.1:PORT CHROMIUM=/usr/bin/chromium SCREENSHOTS=dir node test/dashboard.test.mjs
//
// Every number read from the page is compared with what the API answers for the same site,
// range and zone; changing site, range and zone and the back button update them; the discard
// flow runs end to end, and on a tally with tokens (TALLY_AUTH_URL, READ_TOKEN, ADMIN_TOKEN) the
// browser's login prompt opens the page and the page asks for the admin token before *Run batch
// now*; no console error, no request to another origin; axe-core finds no
// serious accessibility violation; the first view's transfer stays under 100 KB. Screenshots of
// each view at desktop width and at 375 px are written to SCREENSHOTS. Exit status 1 on failure.
import assert from "node:assert/strict";
import { mkdirSync, readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { join } from "node:path";
import { chromium } from "playwright-core";

const base = process.env.TALLY_URL;
const shots = process.env.SCREENSHOTS;
assert.ok(base, "TALLY_URL names the tally to test");
const origin = new URL(base).origin;
const require = createRequire(import.meta.url);
const axeSource = readFileSync(require.resolve("axe-core/axe.min.js"), "utf8");
if (shots) mkdirSync(shots, { recursive: true });

async function api(path, init) {
  const r = await fetch(base + path, init);
  const body = await r.json();
  assert.ok(r.ok, `${path}: ${r.status} ${JSON.stringify(body)}`);
  return body;
}

function utcToday() {
  return new Date().toISOString().slice(0, 10);
}
function addDays(ymd, n) {
  const d = new Date(ymd + "T00:00:00Z");
  d.setUTCDate(d.getUTCDate() + n);
  return d.toISOString().slice(0, 10);
}
function localToday(tz) {
  return new Intl.DateTimeFormat("en-CA", { timeZone: tz, year: "numeric", month: "2-digit", day: "2-digit" }).format(new Date());
}
const q = (from, to, tz) => `from=${from}T00:00:00&to=${to}T00:00:00&tz=${encodeURIComponent(tz)}`;

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const problems = [];
let current = null; // the page under test, for the failure report
const measured = {};

async function newPage(width, height, timezoneId = "UTC") {
  const context = await browser.newContext({ viewport: { width, height }, timezoneId, locale: "en-US" });
  const page = await context.newPage();
  current = page;
  page.on("console", (m) => m.type() === "error" && problems.push(`console error: ${m.text()}`));
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  page.on("request", (r) => {
    const u = r.url();
    if (!u.startsWith("data:") && new URL(u).origin !== origin) problems.push(`request to another origin: ${u}`);
  });
  page.on("dialog", (d) => d.accept());
  return page;
}

/** Waits until the view has rendered (its KPIs carry values) and returns them. */
async function kpis(page) {
  await page.waitForSelector("[data-kpi] .value");
  return page.$$eval("[data-kpi]", (els) =>
    Object.fromEntries(els.map((e) => [e.getAttribute("data-kpi"), e.querySelector(".value").getAttribute("data-value")])),
  );
}

const n = (v) => (v === null || v === undefined ? "" : String(v));

async function table(page, by) {
  return page.$$eval(`table[data-breakdown="${by}"] tbody tr[data-item]`, (rows) =>
    rows.map((r) => [r.getAttribute("data-item"), r.querySelector("[data-views]").getAttribute("data-views"), r.querySelector("[data-uniques]").getAttribute("data-uniques")]),
  );
}

/** The site view shows what /v1/site and /v1/breakdown answer for `host`, `from`..`to` (local
 * dates, `to` exclusive) in `tz`. */
async function checkSite(page, host, from, to, tz) {
  await page.waitForFunction(
    ([h, z]) =>
      document.querySelector("main").dataset.rendered === location.search &&
      document.querySelector("h1")?.textContent === h &&
      document.querySelector("#tz")?.value === z,
    [host, tz],
  );
  // The breakdown panels fill after the totals.
  await page.waitForFunction(() => document.querySelectorAll("main table[data-breakdown][data-loaded]").length === 6);
  const got = await kpis(page);
  const site = await api(`/v1/site?host=${host}&${q(from, to, tz)}`);
  assert.equal(got.views, n(site.views), `views of ${host} ${from}..${to} ${tz}`);
  assert.equal(got.uniques, n(site.uniques), `uniques of ${host} ${from}..${to} ${tz}`);
  // Every zone has uniques, also where local midnights are not UTC midnights (Asia/Kolkata).
  assert.ok(site.uniques > 0, `uniques of ${host} ${from}..${to} ${tz}: ${site.uniques}`);
  assert.ok(site.views > 0, `the data has views in ${from}..${to}`);
  for (const by of ["url", "source", "referrer", "utm_source", "utm_medium", "utm_campaign"]) {
    const b = await api(`/v1/breakdown?host=${host}&by=${by}&limit=10&${q(from, to, tz)}`);
    const want = b.items.map((i) => [i.value, n(i.views), n(i.uniques)]);
    assert.deepEqual(await table(page, by), want, `breakdown by ${by} of ${host} ${from}..${to} ${tz}`);
  }
  assert.ok(await page.$("[data-chart=site] canvas"), "the chart is drawn");
  const rt = await api(`/v1/realtime?host=${host}`);
  const shown = await kpis(page);
  assert.ok(Number(shown["realtime-views"]) <= rt.views && rt.views > 0, `realtime views ${shown["realtime-views"]} vs ${rt.views}`);
}

async function axe(page, what) {
  // Evaluated over the DevTools protocol, so the page's CSP (script-src 'self') does not block it.
  await page.evaluate(axeSource + ";0");
  const result = await page.evaluate(() => window.axe.run(document, { resultTypes: ["violations"] }));
  const bad = result.violations.filter((v) => v.impact === "serious" || v.impact === "critical");
  assert.deepEqual(
    bad.map((v) => `${v.id}: ${v.help} (${v.nodes.map((x) => x.target.join(" ")).join(", ")})`),
    [],
    `accessibility of ${what}`,
  );
}

async function shot(page, name) {
  if (shots) await page.screenshot({ path: join(shots, `${name}.png`), fullPage: true });
}

try {
  const today = utcToday();
  const from = addDays(today, -6);
  const to = addDays(today, 1);

  // ----- site view: numbers, chart, first-view cost ----------------------------------------
  const page = await newPage(1280, 900);
  await page.goto(`${base}/?view=site&site=a.test&range=custom&from=${from}&to=${today}`);
  await checkSite(page, "a.test", from, to, "UTC");
  // From navigation start to the first view's numbers on screen (the page marks it).
  measured.interactive_ms = await page.evaluate(() => Math.round(performance.getEntriesByName("tally:rendered")[0].startTime));
  measured.complete_ms = await page.evaluate(() => Math.round(performance.getEntriesByName("tally:complete")[0].startTime));
  measured.first_view_bytes = await page.evaluate(() =>
    performance
      .getEntriesByType("navigation")
      .concat(performance.getEntriesByType("resource").filter((r) => !r.name.includes("/v1/")))
      .reduce((s, e) => s + e.transferSize, 0),
  );
  assert.ok(measured.first_view_bytes > 0 && measured.first_view_bytes <= 100_000, `first view transfers ${measured.first_view_bytes} bytes`);
  await axe(page, "the site view");
  await shot(page, "site-desktop");

  // Another zone: the numbers follow, and the URL holds it.
  await page.fill("#tz", "Asia/Kolkata");
  await page.dispatchEvent("#tz", "change");
  await checkSite(page, "a.test", from, to, "Asia/Kolkata");
  assert.match(page.url(), /tz=Asia%2FKolkata/);

  // Another range from the picker.
  await page.selectOption("#range", "7d");
  await page.waitForURL(/range=7d/);
  const kt = localToday("Asia/Kolkata");
  await checkSite(page, "a.test", addDays(kt, -6), addDays(kt, 1), "Asia/Kolkata");

  // Back: the previous range and zone again.
  await page.goBack();
  await page.waitForURL(/range=custom/);
  await checkSite(page, "a.test", from, to, "Asia/Kolkata");
  await page.goBack();
  await checkSite(page, "a.test", from, to, "UTC");

  // Another site.
  await page.selectOption("#site", "b.test");
  await page.waitForURL(/site=b.test/);
  const r7 = [addDays(today, -6), addDays(today, 1)];
  await checkSite(page, "b.test", r7[0], r7[1], "UTC");

  // ----- page view: click a page of a.test -------------------------------------------------
  await page.selectOption("#site", "a.test");
  await page.waitForURL(/site=a.test/);
  await checkSite(page, "a.test", r7[0], r7[1], "UTC");
  const first = await page.$eval('table[data-breakdown="url"] tbody tr[data-item]', (r) => r.getAttribute("data-item"));
  await page.click('table[data-breakdown="url"] tbody tr[data-item] button');
  await page.waitForURL(/view=page/);
  await page.waitForFunction(
    (u) => document.querySelector("main").dataset.rendered === location.search && document.querySelector("h1")?.textContent === u,
    first,
  );
  const pk = await kpis(page);
  const v = await api(`/v1/views?url=${encodeURIComponent(first)}&${q(r7[0], r7[1], "UTC")}`);
  assert.equal(pk.views, n(v.views), "page views");
  assert.equal(pk["batch-views"], n(v.batch_views), "page batch views");
  assert.equal(pk["speed-views"], n(v.speed_views), "page speed views");
  assert.ok(v.batch_views > 0 && v.speed_views > 0, "the data has both layers");
  const own = await api(`/v1/breakdown?host=a.test&by=url&limit=1&url=${encodeURIComponent(first)}&${q(r7[0], r7[1], "UTC")}`);
  assert.equal(pk.uniques, n(own.items[0].uniques), "page uniques");
  assert.equal(own.items[0].views, v.views, "the page's views as its site's breakdown counts them");
  assert.ok(await page.$("[data-chart=page] canvas"), "the page chart is drawn");
  await axe(page, "the page view");
  await shot(page, "page-desktop");

  // ----- operations view: discard the serving view, watch the rerun serve a new one --------
  await page.click('a[data-nav="ops"]');
  await page.waitForSelector("[data-serving]");
  const before = await api("/v1/admin/batch");
  assert.ok(before.current, "a batch view serves");
  assert.equal(await page.getAttribute("[data-serving]", "data-serving"), before.current.version);
  await axe(page, "the operations view");
  await shot(page, "ops-desktop");
  await page.click("#discard");
  await page.waitForFunction(
    (old) => {
      const s = document.querySelector("[data-serving]")?.getAttribute("data-serving");
      return s && s !== old && !document.querySelector("[data-running]");
    },
    before.current.version,
    { timeout: 60_000 },
  );
  const after = await api("/v1/admin/batch");
  assert.notEqual(after.current.version, before.current.version, "a new view serves");
  assert.equal(await page.getAttribute("[data-serving]", "data-serving"), after.current.version);
  assert.ok(
    after.history.some((h) => h.version === before.current.version && h.status === "discarded"),
    `the history shows the discarded view: ${JSON.stringify(after.history)}`,
  );
  await page.waitForSelector(`[data-run] [data-status="discarded"]`);
  await page.context().close();

  // ----- 375 px: every view usable without sideways scrolling --------------------------------
  const phone = await newPage(375, 800, "Europe/Berlin");
  for (const [name, path] of [
    ["site", `/?view=site&site=a.test&range=7d`],
    ["page", `/?view=page&site=a.test&range=7d&url=${encodeURIComponent(first)}`],
    ["ops", `/?view=ops`],
  ]) {
    await phone.goto(base + path);
    await phone.waitForSelector(name === "ops" ? "[data-serving]" : "[data-kpi] .value");
    if (name === "site") {
      await phone.waitForFunction(() => document.querySelectorAll("main table[data-breakdown][data-loaded]").length === 6);
      // The browser's zone is the default.
      assert.equal(await phone.$eval("#tz", (e) => e.value), "Europe/Berlin");
    }
    const overflow = await phone.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    assert.ok(overflow <= 1, `the ${name} view fits 375 px (${overflow} px too wide)`);
    await shot(phone, `${name}-375`);
  }
  await phone.context().close();

  // ----- tokens: a tally with auth.read_token and auth.admin_token ---------------------------
  const authed = process.env.TALLY_AUTH_URL;
  if (authed) {
    // Without it: a 401 whose challenge makes a browser show its login prompt.
    const denied = await fetch(`${authed}/`);
    assert.equal(denied.status, 401, "the dashboard needs the read token");
    assert.match(denied.headers.get("www-authenticate") ?? "", /^Basic /);
    // The browser's login prompt, answered with the read token (any user name).
    const context = await browser.newContext({ httpCredentials: { username: "me", password: process.env.READ_TOKEN } });
    const ops = await context.newPage();
    ops.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
    ops.on("dialog", (d) => d.accept());
    await ops.goto(`${authed}/?view=ops`);
    // The admin endpoints want the admin token: the page asks for it.
    await ops.waitForSelector("#token");
    assert.match(await ops.textContent("h2#token-title"), /Admin token/);
    await ops.fill("#token", process.env.ADMIN_TOKEN);
    await ops.press("#token", "Enter");
    await ops.waitForSelector("[data-serving]");
    const was = (await (await fetch(`${authed}/v1/admin/batch`, { headers: { Authorization: `Bearer ${process.env.ADMIN_TOKEN}` } })).json()).current?.version ?? "";
    await ops.click("#run-batch");
    await ops.waitForFunction(
      (old) => {
        const s = document.querySelector("[data-serving]")?.getAttribute("data-serving");
        return s && s !== old && !document.querySelector("[data-running]");
      },
      was,
      { timeout: 60_000 },
    );
    // Kept for the tab only.
    assert.equal(await ops.evaluate(() => sessionStorage.getItem("tally.admin_token")), process.env.ADMIN_TOKEN);
    assert.equal(await ops.evaluate(() => localStorage.length), 0);
    await context.close();
  }

  assert.deepEqual(problems, [], "no console errors, no request to another origin");
  console.log(JSON.stringify({ ok: true, ...measured }));
} catch (e) {
  console.error(e);
  if (current) {
    console.error(`--- the page at ${current.url()} ---`);
    console.error(await current.evaluate(() => document.body.innerText).catch((x) => String(x)));
  }
  if (problems.length) console.error(problems.join("\n"));
  process.exitCode = 1;
} finally {
  await browser.close();
}
