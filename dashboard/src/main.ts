// tally's dashboard: a site's traffic, one page's batch/speed seam, and the Lambda pipeline's
// state, every number read from the public HTTP API of the tally that serves this page.
//
// State lives in the URL (?view=site&site=example.com&range=7d&tz=Europe/Berlin), so a view is
// shareable and the back button works. No request leaves this origin.
import uPlot from "uplot";
import "uplot/dist/uPlot.min.css";
import "./style.css";

type View = "site" | "page" | "ops";
interface State {
  view: View;
  site: string;
  url: string;
  range: string; // today | 7d | 30d | month | custom
  from: string; // custom: YYYY-MM-DD, inclusive
  to: string; // custom: YYYY-MM-DD, inclusive
  tz: string;
}

const RANGES: [string, string][] = [
  ["today", "Today"],
  ["7d", "Last 7 days"],
  ["30d", "Last 30 days"],
  ["month", "This month"],
  ["custom", "Custom"],
];
const REFRESH_MS = 5000;
const browserZone = Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC";
const nf = new Intl.NumberFormat("en-US");

// ----- state in the URL ------------------------------------------------------------------------

function readState(): State {
  const p = new URLSearchParams(location.search);
  const view = p.get("view");
  return {
    view: view === "page" || view === "ops" ? view : "site",
    site: p.get("site") ?? "",
    url: p.get("url") ?? "",
    range: RANGES.some(([r]) => r === p.get("range")) ? (p.get("range") as string) : "7d",
    from: p.get("from") ?? "",
    to: p.get("to") ?? "",
    tz: p.get("tz") || browserZone,
  };
}

function href(s: State): string {
  const p = new URLSearchParams();
  p.set("view", s.view);
  if (s.view !== "ops") {
    if (s.site) p.set("site", s.site);
    if (s.view === "page" && s.url) p.set("url", s.url);
    p.set("range", s.range);
    if (s.range === "custom") {
      p.set("from", s.from);
      p.set("to", s.to);
    }
    if (s.tz !== browserZone) p.set("tz", s.tz);
  }
  return "?" + p.toString();
}

function go(change: Partial<State>, replace = false): void {
  const next = { ...readState(), ...change };
  const url = href(next);
  // The same state again (a change event repeated) is not a new history entry.
  if (replace || url === location.search) history.replaceState(null, "", url);
  else history.pushState(null, "", url);
  render();
}

addEventListener("popstate", () => render());
document.addEventListener("click", (e) => {
  // Same-page links (the header's) navigate without a reload.
  const a = (e.target as Element).closest("a[href^='?']");
  if (!a || e.metaKey || e.ctrlKey || e.shiftKey) return;
  e.preventDefault();
  history.pushState(null, "", a.getAttribute("href")!);
  render();
});

// ----- DOM helpers (text only: URLs and referrers come from the public) ----------------------

type Child = Node | string | number | null | undefined | false;
function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attrs: Record<string, string | number | boolean | ((e: Event) => void) | undefined> = {},
  ...children: Child[]
): HTMLElementTagNameMap[K] {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === false) continue;
    if (typeof v === "function") el.addEventListener(k.slice(2), v);
    else if (v === true) el.setAttribute(k, "");
    else el.setAttribute(k, String(v));
  }
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

function num(n: number | null | undefined): string {
  return n === null || n === undefined ? "—" : nf.format(n);
}

function say(message: string, ok = false): void {
  const s = document.getElementById("status")!;
  s.className = ok ? "status ok" : "status";
  s.textContent = message;
}

// ----- the API ---------------------------------------------------------------------------------

class Unauthorized extends Error {}
const READ_TOKEN = "tally.read_token";
const ADMIN_TOKEN = "tally.admin_token";

async function api(path: string, init: RequestInit = {}, admin = false): Promise<any> {
  const token = admin
    ? sessionStorage.getItem(ADMIN_TOKEN)
    : sessionStorage.getItem(READ_TOKEN) ?? sessionStorage.getItem(ADMIN_TOKEN);
  const headers: Record<string, string> = { Accept: "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  const r = await fetch(path, { ...init, headers });
  if (r.status === 401) throw new Unauthorized(admin ? ADMIN_TOKEN : READ_TOKEN);
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(body.error ?? `${path} answered ${r.status}.`);
  return body;
}

/** A form asking for the token the API wants; it is kept for this tab only (sessionStorage). */
function tokenForm(key: string, then: () => void): HTMLElement {
  const admin = key === ADMIN_TOKEN;
  const input = h("input", { type: "password", id: "token", autocomplete: "off", required: true });
  const form = h(
    "form",
    { class: "panel", "aria-labelledby": "token-title" },
    h("h2", { id: "token-title" }, admin ? "Admin token needed" : "Read token needed"),
    h(
      "p",
      { class: "muted" },
      admin
        ? "This action needs tally's auth.admin_token. It is kept for this tab only."
        : "This tally needs its auth.read_token to show numbers. It is kept for this tab only.",
    ),
    h("label", { for: "token" }, "Token"),
    " ",
    input,
    " ",
    h("button", { type: "submit", class: "primary" }, "Use token"),
  );
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem(key, input.value);
    then();
  });
  setTimeout(() => input.focus());
  return form;
}

// ----- ranges ----------------------------------------------------------------------------------

/** Today's date in `tz`, as YYYY-MM-DD. */
function today(tz: string): string {
  return new Intl.DateTimeFormat("en-CA", { timeZone: tz, year: "numeric", month: "2-digit", day: "2-digit" }).format(
    new Date(),
  );
}

function addDays(ymd: string, n: number): string {
  const d = new Date(ymd + "T00:00:00Z");
  d.setUTCDate(d.getUTCDate() + n);
  return d.toISOString().slice(0, 10);
}

function daysBetween(a: string, b: string): number {
  return Math.round((Date.parse(b + "T00:00:00Z") - Date.parse(a + "T00:00:00Z")) / 86_400_000);
}

interface Range {
  from: string; // local date, inclusive
  to: string; // local date, exclusive
  granularity: "hour" | "day" | "month";
}

function rangeOf(s: State): Range {
  const t = today(s.tz);
  let from = t;
  let to = addDays(t, 1);
  switch (s.range) {
    case "7d":
      from = addDays(t, -6);
      break;
    case "30d":
      from = addDays(t, -29);
      break;
    case "month":
      from = t.slice(0, 8) + "01";
      to = addDays(from, 32).slice(0, 8) + "01";
      break;
    case "custom":
      if (/^\d{4}-\d{2}-\d{2}$/.test(s.from) && /^\d{4}-\d{2}-\d{2}$/.test(s.to) && s.from <= s.to) {
        from = s.from;
        to = addDays(s.to, 1);
      }
      break;
  }
  const days = daysBetween(from, to);
  return { from, to, granularity: days <= 2 ? "hour" : days <= 92 ? "day" : "month" };
}

/** The query string of a range: local midnights read in `tz` by the API. */
function rangeQuery(s: State, r: Range): string {
  return `from=${r.from}T00:00:00&to=${r.to}T00:00:00&tz=${encodeURIComponent(s.tz)}`;
}

/** Every bucket of the range, as [key, label]: items of the API's series are matched by key. */
function buckets(r: Range, fromIso: string, toIso: string, tz: string): [string, string][] {
  const out: [string, string][] = [];
  if (r.granularity === "day") {
    for (let d = r.from; d < r.to; d = addDays(d, 1)) out.push([d, d.slice(5)]);
  } else if (r.granularity === "month") {
    for (let d = r.from.slice(0, 8) + "01"; d < r.to; d = addDays(d, 32).slice(0, 8) + "01") {
      out.push([d.slice(0, 7), d.slice(0, 7)]);
    }
  } else {
    const fmt = new Intl.DateTimeFormat("en-GB", { timeZone: tz, hour: "2-digit", minute: "2-digit", day: "2-digit" });
    for (let t = Date.parse(fromIso); t < Date.parse(toIso); t += 3_600_000) {
      out.push([String(t), fmt.format(new Date(t))]);
    }
  }
  return out;
}

function bucketKey(start: string, g: Range["granularity"]): string {
  return g === "day" ? start.slice(0, 10) : g === "month" ? start.slice(0, 7) : String(Date.parse(start));
}

// ----- chart -----------------------------------------------------------------------------------

let charts: uPlot[] = [];
let timers: number[] = [];

function chart(
  host: HTMLElement,
  labels: string[],
  series: { label: string; color: string; values: (number | null)[]; bars?: boolean; shown?: (number | null)[] }[],
): void {
  const width = Math.max(280, host.clientWidth - 4);
  const bars = uPlot.paths.bars!({ size: [0.7, 40] });
  const u = new uPlot(
    {
      width,
      height: 240,
      // Bars sit on whole positions: half a bucket of room either side.
      scales: { x: { time: false, range: (_u, min, max) => (series.some((s) => s.bars) ? [min - 0.5, max + 0.5] : [min, max]) } },
      legend: { live: true },
      cursor: { drag: { x: false, y: false } },
      series: [
        { label: "Bucket", value: (_u, v) => (v == null ? "—" : labels[v] ?? "") },
        ...series.map((s) => ({
          label: s.label,
          stroke: s.color,
          width: 2,
          fill: s.bars ? s.color : undefined,
          paths: s.bars ? bars : undefined,
          points: { show: labels.length <= 45 },
          value: (_u: uPlot, v: number | null, _si: number, i: number | null) => num(s.shown && i != null ? s.shown[i] : v),
        })),
      ],
      axes: [
        {
          stroke: getComputedStyle(document.body).color,
          values: (_u, splits) => splits.map((i) => labels[i] ?? ""),
          grid: { show: false },
        },
        { stroke: getComputedStyle(document.body).color, values: (_u, splits) => splits.map((v) => nf.format(v)) },
      ],
    },
    [labels.map((_, i) => i), ...series.map((s) => s.values)] as uPlot.AlignedData,
    host,
  );
  charts.push(u);
}

const css = (name: string) => getComputedStyle(document.documentElement).getPropertyValue(name).trim();

addEventListener("resize", () => {
  for (const u of charts) {
    const w = Math.max(280, (u.root.parentElement?.clientWidth ?? 300) - 4);
    u.setSize({ width: w, height: 240 });
  }
});

// ----- pieces ----------------------------------------------------------------------------------

function kpi(name: string, label: string, value: number | null, note?: string): HTMLElement {
  return h(
    "div",
    { class: "kpi", "data-kpi": name },
    h("div", { class: "label" }, label),
    h("div", { class: "value", "data-value": value ?? "" }, num(value)),
    note ? h("div", { class: "note" }, note) : null,
  );
}

function uniquesNote(body: any): string {
  return `± ${(body.relative_error * 100).toFixed(1)}% (sketch error)`;
}

interface Item {
  value: string;
  views: number;
  uniques: number;
}

/** A breakdown's panel; `items` null: still loading. */
function breakdownTable(by: string, title: string, items: Item[] | null, open?: (value: string) => void): HTMLElement {
  if (items === null) {
    return h(
      "div",
      { class: "panel", "aria-busy": "true" },
      h("table", { "data-breakdown": by }, h("caption", {}, title), h("tbody", {}, h("tr", {}, h("td", { class: "muted" }, "Loading…")))),
    );
  }
  const max = Math.max(1, ...items.map((i) => i.views));
  return h(
    "div",
    { class: "panel" },
    h(
      "table",
      { "data-breakdown": by, "data-loaded": "" },
      h("caption", {}, title),
      h(
        "thead",
        {},
        h("tr", {}, h("th", { scope: "col" }, by === "url" ? "Page" : "Value"), h("th", { scope: "col" }, "Views"), h("th", { scope: "col" }, "Visitors")),
      ),
      h(
        "tbody",
        {},
        ...(items.length === 0
          ? [h("tr", {}, h("td", { colspan: 3, class: "muted" }, "No views in this range."))]
          : items.map((i) => {
              const shown = by === "url" ? pathOf(i.value) : i.value;
              return h(
                "tr",
                { "data-item": i.value },
                h(
                  "td",
                  {},
                  open ? h("button", { class: "link", type: "button", title: i.value, onclick: () => open(i.value) }, shown) : shown,
                  h("div", { class: "bar", "aria-hidden": "true" }, h("span", { style: `width:${(100 * i.views) / max}%` })),
                ),
                h("td", { "data-views": i.views }, num(i.views)),
                h("td", { "data-uniques": i.uniques ?? "" }, num(i.uniques)),
              );
            })),
      ),
    ),
  );
}

function breakdownError(title: string, error: string): HTMLElement {
  return h("div", { class: "panel" }, h("h2", {}, title), h("p", { class: "muted" }, error));
}

function pathOf(url: string): string {
  try {
    const u = new URL(url);
    return u.pathname + u.search + u.hash;
  } catch {
    return url;
  }
}

function provenance(batch: any, speedAvailable: boolean): string {
  const b = batch ? `batch view ${batch.version} through seq ${nf.format(batch.cutoff_seq)}, computed ${age(batch.computed_at)} ago` : "no batch view yet";
  return `${b}; speed layer ${speedAvailable ? "live" : "unavailable (batch only)"}.`;
}

function age(iso: string): string {
  const s = Math.max(0, Math.round((Date.now() - Date.parse(iso)) / 1000));
  if (s < 120) return `${s} s`;
  if (s < 7200) return `${Math.round(s / 60)} min`;
  if (s < 172800) return `${Math.round(s / 3600)} h`;
  return `${Math.round(s / 86400)} days`;
}

function controls(s: State, sites: string[]): HTMLElement {
  const r = rangeOf(s);
  const siteSel = h(
    "select",
    { id: "site", onchange: (e) => go({ site: (e.target as HTMLSelectElement).value, view: "site" }) },
    ...sites.map((host) => h("option", { value: host, selected: host === s.site }, host)),
  );
  const rangeSel = h(
    "select",
    {
      id: "range",
      onchange: (e) => {
        const range = (e.target as HTMLSelectElement).value;
        go(range === "custom" ? { range, from: r.from, to: addDays(r.to, -1) } : { range });
      },
    },
    ...RANGES.map(([v, l]) => h("option", { value: v, selected: v === s.range }, l)),
  );
  const zones: string[] = (Intl as any).supportedValuesOf?.("timeZone") ?? [];
  const tz = h("input", { id: "tz", list: "zones", value: s.tz, spellcheck: "false", autocomplete: "off" });
  tz.addEventListener("change", () => {
    if (tz.value.trim()) go({ tz: tz.value.trim() });
  });
  const out = h(
    "div",
    { class: "controls" },
    h("label", { for: "site" }, "Site", siteSel),
    h("label", { for: "range" }, "Range", rangeSel),
  );
  if (s.range === "custom") {
    const from = h("input", { id: "from", type: "date", value: r.from });
    const to = h("input", { id: "to", type: "date", value: addDays(r.to, -1) });
    const apply = () => {
      if (from.value && to.value) go({ from: from.value, to: to.value });
    };
    from.addEventListener("change", apply);
    to.addEventListener("change", apply);
    out.append(h("label", { for: "from" }, "From", from), h("label", { for: "to" }, "To", to));
  }
  out.append(
    h("label", { for: "tz" }, "Time zone", tz),
    h("datalist", { id: "zones" }, ...zones.map((z) => h("option", { value: z }))),
  );
  return out;
}

// ----- views -----------------------------------------------------------------------------------

let generation = 0;

async function render(clearStatus = true): Promise<void> {
  const gen = ++generation;
  for (const t of timers) clearInterval(t);
  timers = [];
  for (const u of charts) u.destroy();
  charts = [];
  const s = readState();
  const search = location.search;
  for (const a of document.querySelectorAll("[data-nav]")) {
    const cur = a.getAttribute("data-nav") === (s.view === "page" ? "site" : s.view);
    if (cur) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  const main = document.getElementById("main")!;
  const live = () => gen === generation;
  try {
    const content = s.view === "ops" ? await opsView(live) : await siteOrPageView(s, live);
    if (!live()) return;
    main.replaceChildren(...content.nodes);
    // Which state the view shows (tests wait for it to equal the URL's).
    main.dataset.rendered = search;
    content.after?.();
    document.title = content.title;
    // When the view's numbers are on screen: the browser test reads it (Performance API).
    if (content.nodes.length > 0) performance.mark("tally:rendered");
    if (clearStatus) say("");
  } catch (e) {
    if (!live()) return;
    if (e instanceof Unauthorized) {
      main.replaceChildren(tokenForm(e.message, () => render()));
      document.title = "tally — token needed";
    } else {
      main.replaceChildren(h("p", { class: "muted" }, "Nothing to show."));
      say(e instanceof Error ? e.message : String(e));
    }
  }
}

interface Content {
  title: string;
  nodes: Node[];
  after?: () => void;
}

async function siteOrPageView(s: State, live: () => boolean): Promise<Content> {
  // The site list (every host, all time; names only — the uniques of a thousand sites would be
  // most of the server's work): with a site in the URL the view does not wait for it, and the
  // picker is filled when it arrives.
  const listed: Promise<string[] | Error> = api("/v1/sites?limit=1000&uniques=false").then(
    (b) => b.items.map((i: any) => i.host as string),
    (e: unknown) => (e instanceof Error ? e : new Error(String(e))),
  );
  if (!s.site) {
    const sites = await listed;
    if (sites instanceof Error) throw sites;
    if (sites.length > 0) {
      go({ site: sites[0] }, true);
      return { title: "tally", nodes: [] };
    }
    return {
      title: "tally — no data yet",
      nodes: [
        h("h1", {}, "No views yet"),
        h("p", {}, "Send page views to POST /v1/events or /api/event (Plausible's trackers), then come back."),
      ],
    };
  }
  const content = s.view === "page" && s.url ? await pageView(s, [s.site], live) : await siteView(s, [s.site], live);
  const after = content.after;
  content.after = () => {
    after?.();
    listed.then((sites) => {
      const select = document.getElementById("site");
      if (!live() || sites instanceof Error || !select) return;
      const all = sites.includes(s.site) ? sites : [s.site, ...sites];
      select.replaceChildren(...all.map((host) => h("option", { value: host, selected: host === s.site }, host)));
    });
  };
  return content;
}

/** The site view's breakdown panels: dimension, title, whether a row opens its page. */
const BREAKDOWNS: [string, string, boolean][] = [
  ["url", "Top pages", true],
  ["source", "Sources", false],
  ["referrer", "Referrers", false],
  ["utm_source", "UTM sources", false],
  ["utm_medium", "UTM media", false],
  ["utm_campaign", "UTM campaigns", false],
];

async function siteView(s: State, sites: string[], live: () => boolean): Promise<Content> {
  const r = rangeOf(s);
  const q = rangeQuery(s, r);
  const host = encodeURIComponent(s.site);
  const open = (url: string) => go({ view: "page", url });
  // The totals first: on a large site the breakdowns cost seconds of server CPU, and asked at
  // the same time they would delay the totals. Each breakdown panel fills when its answer arrives.
  const [site, realtime] = await Promise.all([
    api(`/v1/site?host=${host}&granularity=${r.granularity}&${q}`),
    api(`/v1/realtime?host=${host}`),
  ]);
  const panels = BREAKDOWNS.map(([by, title, opens]) => ({
    by,
    title,
    opener: opens ? open : undefined,
    panel: breakdownTable(by, title, null),
  }));
  const keys = buckets(r, site.from, site.to, s.tz);
  const byKey = new Map<string, any>((site.series ?? []).map((b: any) => [bucketKey(b.start, r.granularity), b]));
  const chartHost = h("div", { class: "chart", "data-chart": "site" });
  const realtimeBox = h("div", { class: "kpis", "data-realtime": "" });
  const fillRealtime = (rt: any) =>
    realtimeBox.replaceChildren(
      kpi("realtime-visitors", "Visitors now (last 5 min)", rt.visitors),
      kpi("realtime-views", "Views, last 5 min", rt.views),
    );
  fillRealtime(realtime);
  return {
    title: `tally — ${s.site}`,
    nodes: [
      controls(s, sites),
      h("h1", {}, s.site),
      h(
        "div",
        { class: "kpis" },
        kpi("views", "Views", site.views),
        kpi("uniques", "Unique visitors", site.uniques, uniquesNote(site)),
      ),
      realtimeBox,
      h(
        "section",
        { class: "panel", "aria-labelledby": "chart-title" },
        h("h2", { id: "chart-title" }, `Views and unique visitors per ${r.granularity}`),
        chartHost,
      ),
      h("div", { class: "grid" }, ...panels.map((p) => p.panel)),
      h("p", { class: "muted", "data-provenance": "" }, provenance(site.batch, site.speed_available)),
    ],
    after: () => {
      const answers = panels.map((p) =>
        api(`/v1/breakdown?host=${host}&by=${p.by}&limit=10&${q}`).then(
          (b) => {
            if (live()) p.panel.replaceWith(breakdownTable(p.by, p.title, b.items as Item[], p.opener));
          },
          (e: unknown) => {
            if (live()) p.panel.replaceWith(breakdownError(p.title, e instanceof Error ? e.message : String(e)));
          },
        ),
      );
      Promise.all(answers).then(() => live() && performance.mark("tally:complete"));
      chart(
        chartHost,
        keys.map((k) => k[1]),
        [
          { label: "Views", color: css("--views"), values: keys.map(([k]) => byKey.get(k)?.views ?? 0) },
          { label: "Unique visitors", color: css("--uniques"), values: keys.map(([k]) => byKey.get(k)?.uniques ?? null) },
        ],
      );
      timers.push(
        window.setInterval(async () => {
          try {
            const rt = await api(`/v1/realtime?host=${host}`);
            if (live()) fillRealtime(rt);
          } catch {
            // The next tick tries again; a lasting failure shows on the next render.
          }
        }, REFRESH_MS),
      );
    },
  };
}

async function pageView(s: State, sites: string[], _live: () => boolean): Promise<Content> {
  const r = rangeOf(s);
  const q = rangeQuery(s, r);
  const url = encodeURIComponent(s.url);
  const hash = s.url.includes("#") ? "&hash=1" : "";
  // A hash-routed page keeps its fragment in every request, or each would answer for the
  // page without it.
  const breakdown = (by: string) =>
    api(`/v1/breakdown?host=${encodeURIComponent(s.site)}&by=${by}&limit=10&url=${url}${hash}&${q}`);
  // The page's uniques as its site's breakdown gives them (0 when the page has no views).
  const [views, own, sources] = await Promise.all([
    api(`/v1/views?url=${url}${hash}&granularity=${r.granularity}&${q}`),
    breakdown("url"),
    breakdown("source"),
  ]);
  const uniques = { uniques: own.items[0]?.uniques ?? 0, relative_error: own.relative_error };
  const keys = buckets(r, views.from, views.to, s.tz);
  const byKey = new Map<string, any>((views.series ?? []).map((b: any) => [bucketKey(b.start, r.granularity), b]));
  const chartHost = h("div", { class: "chart", "data-chart": "page" });
  const total = Math.max(1, views.views);
  return {
    title: `tally — ${s.url}`,
    nodes: [
      controls(s, sites),
      h("p", {}, h("a", { href: href({ ...s, view: "site", url: "" }) }, `← ${s.site}`)),
      h("h1", {}, s.url),
      h(
        "div",
        { class: "kpis" },
        kpi("views", "Views", views.views),
        kpi("batch-views", "From the batch view", views.batch_views),
        kpi("speed-views", "From the speed layer", views.speed_views),
        kpi("uniques", "Unique visitors", uniques.uniques, uniquesNote(uniques)),
      ),
      h(
        "div",
        { class: "split", role: "img", "aria-label": `${views.batch_views} views from the batch view, ${views.speed_views} from the speed layer` },
        h("span", { class: "b", style: `width:${(100 * views.batch_views) / total}%` }),
        h("span", { class: "s", style: `width:${(100 * views.speed_views) / total}%` }),
      ),
      h(
        "section",
        { class: "panel", "aria-labelledby": "chart-title" },
        h("h2", { id: "chart-title" }, `Views per ${r.granularity}: batch view and speed layer`),
        chartHost,
      ),
      h(
        "div",
        { class: "grid" },
        breakdownTable("source", "Sources of this page", sources.items),
        h(
          "div",
          { class: "panel" },
          h("h2", {}, "Where these numbers come from"),
          h(
            "dl",
            { class: "facts" },
            h("dt", {}, "Batch view"),
            h("dd", { "data-fact": "version" }, views.batch ? views.batch.version : "none yet"),
            h("dt", {}, "Covers events through seq"),
            h("dd", { "data-fact": "cutoff" }, views.batch ? nf.format(views.batch.cutoff_seq) : "—"),
            h("dt", {}, "Computed"),
            h("dd", {}, views.batch ? `${views.batch.computed_at} (${age(views.batch.computed_at)} ago)` : "—"),
            h("dt", {}, "Speed layer"),
            h("dd", {}, views.speed_available ? "counts every event after the cutoff" : "unavailable: batch only"),
          ),
        ),
      ),
    ],
    after: () =>
      chart(
        chartHost,
        keys.map((k) => k[1]),
        // Stacked: the whole bar (batch + speed) in the speed colour, the batch part drawn over it.
        [
          {
            label: "Speed layer",
            color: css("--speed"),
            values: keys.map(([k]) => byKey.get(k)?.views ?? 0),
            shown: keys.map(([k]) => byKey.get(k)?.speed_views ?? 0),
            bars: true,
          },
          { label: "Batch view", color: css("--views"), values: keys.map(([k]) => byKey.get(k)?.batch_views ?? 0), bars: true },
        ],
      ),
  };
}

async function opsView(live: () => boolean): Promise<Content> {
  const [batch, status] = await Promise.all([api("/v1/admin/batch", {}, true), api("/v1/admin/status", {}, true)]);
  const cur = batch.current;
  const lag = status.acked_seq - status.speed_applied_seq;
  const running = batch.running
    ? h(
        "div",
        { "data-running": batch.running.run_id },
        h("p", {}, `Run ${batch.running.run_id} started ${age(batch.running.started_at)} ago: ${num(batch.running.progress.files_done)} of ${num(batch.running.progress.files_total)} files, ${num(batch.running.progress.events_done)} events.`),
        h("progress", { max: Math.max(1, batch.running.progress.files_total), value: batch.running.progress.files_done, "aria-label": "Batch run progress" }),
      )
    : h("p", { class: "muted" }, "No run is going.");
  const action = (what: "run" | "discard") => async () => {
    const question =
      what === "run"
        ? "Start a batch run now?"
        : `Discard batch view ${cur?.version}? Queries fall back to the previous good view plus the speed layer until the rerun publishes a new one.`;
    if (!confirm(question)) return;
    const path = what === "run" ? "/v1/admin/batch" : "/v1/admin/batch/discard";
    try {
      await api(path, { method: "POST" }, true);
      say(what === "run" ? "Batch run started." : `View ${cur?.version} discarded; rerunning.`, true);
      follow(cur?.version ?? null);
    } catch (e) {
      if (e instanceof Unauthorized) {
        document.getElementById("main")!.replaceChildren(tokenForm(ADMIN_TOKEN, () => render()));
      } else say(e instanceof Error ? e.message : String(e));
    }
  };
  const nodes = [
    h("h1", {}, "Operations"),
    h(
      "div",
      { class: "kpis" },
      kpi("acked", "Acknowledged events (seq)", status.acked_seq),
      kpi("lag", "Speed layer lag (events)", lag, lag === 0 ? "every acknowledged event is visible" : "applying"),
      kpi("sealed", "Sealed into the master dataset", status.sealed_seq),
      kpi("master-files", "Master files", status.master_files),
    ),
    h(
      "div",
      { class: "grid" },
      h(
        "section",
        { class: "panel", "aria-labelledby": "serving-title" },
        h("h2", { id: "serving-title" }, "Serving batch view"),
        cur
          ? h(
              "dl",
              { class: "facts", "data-serving": cur.version },
              h("dt", {}, "Version"),
              h("dd", { "data-fact": "version" }, cur.version),
              h("dt", {}, "Cutoff seq"),
              h("dd", { "data-fact": "cutoff" }, num(cur.cutoff_seq)),
              h("dt", {}, "Computed"),
              h("dd", {}, `${cur.computed_at} (${age(cur.computed_at)} ago)`),
              h("dt", {}, "Events"),
              h("dd", {}, num(cur.events)),
              h("dt", {}, "URLs"),
              h("dd", {}, num(cur.urls)),
            )
          : h("p", { "data-serving": "" }, "No batch view serves: queries come from the speed layer alone."),
        h(
          "div",
          { class: "actions" },
          h("button", { type: "button", class: "primary", id: "run-batch", disabled: !!batch.running, onclick: action("run") }, "Run batch now"),
          h("button", { type: "button", class: "danger", id: "discard", disabled: !cur, onclick: action("discard") }, "Discard this view"),
        ),
      ),
      h(
        "section",
        { class: "panel", "aria-labelledby": "run-title" },
        h("h2", { id: "run-title" }, "Batch runs"),
        running,
        h("dl", { class: "facts" }, h("dt", {}, "Schedule"), h("dd", {}, batch.schedule ?? "—"), h("dt", {}, "Next run"), h("dd", {}, batch.next_run ?? "—")),
      ),
      h(
        "section",
        { class: "panel", "aria-labelledby": "speed-title" },
        h("h2", { id: "speed-title" }, "Speed layer"),
        h(
          "dl",
          { class: "facts" },
          h("dt", {}, "Applied through seq"),
          h("dd", {}, num(status.speed_applied_seq)),
          h("dt", {}, "Redis"),
          h("dd", { "data-fact": "redis" }, status.redis),
          h("dt", {}, "Redis written through seq"),
          h("dd", {}, num(status.redis_applied_seq)),
          h("dt", {}, "Reads available"),
          h("dd", {}, status.speed_available ? "yes" : "no"),
          h("dt", {}, "WAL bytes"),
          h("dd", {}, num(status.wal_bytes)),
        ),
        h(
          "table",
          {},
          h("caption", {}, "Epochs"),
          h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Starts at seq"), h("th", { scope: "col" }, "Applied seq"), h("th", { scope: "col" }, "URLs"))),
          h("tbody", {}, ...(status.speed_epochs ?? []).map((e: any) => h("tr", {}, h("td", {}, num(e.start_seq)), h("td", {}, num(e.applied_seq)), h("td", {}, num(e.urls))))),
        ),
      ),
    ),
    h(
      "section",
      { class: "panel scroll", "aria-labelledby": "history-title", tabindex: 0 },
      h(
        "table",
        { "data-history": "" },
        h("caption", { id: "history-title" }, "Run history"),
        h(
          "thead",
          {},
          h("tr", {}, ...["Run", "Started", "Took", "Status", "Version", "Error"].map((c) => h("th", { scope: "col" }, c))),
        ),
        h(
          "tbody",
          {},
          ...(batch.history ?? []).map((r: any) =>
            h(
              "tr",
              { "data-run": r.run_id },
              h("td", {}, r.run_id),
              h("td", {}, r.started_at),
              h("td", {}, r.finished_at ? `${((Date.parse(r.finished_at) - Date.parse(r.started_at)) / 1000).toFixed(1)} s` : "—"),
              h("td", { "data-status": r.status }, r.status),
              h("td", {}, r.version ?? "—"),
              h("td", {}, r.error ?? ""),
            ),
          ),
        ),
      ),
    ),
  ];
  return {
    title: "tally — operations",
    nodes,
    after: () => {
      // While a run goes, follow it.
      if (batch.running) follow(cur?.version ?? null);
      else timers.push(window.setInterval(() => live() && render(false), 4 * REFRESH_MS));
    },
  };
}

/** Re-renders the operations view every second until a view other than `was` serves (or
 * the user leaves the view); one follower at a time. */
let following: number | null = null;
function follow(was: string | null): void {
  if (following !== null) return;
  const stop = () => {
    if (following !== null) clearInterval(following);
    following = null;
  };
  following = window.setInterval(async () => {
    if (readState().view !== "ops") return stop();
    try {
      const b = await api("/v1/admin/batch", {}, true);
      if (!b.running && b.current && b.current.version !== was) {
        stop();
        say(`Batch view ${b.current.version} serves.`, true);
      }
      await render(false);
    } catch {
      // Keep following; the view says what failed on its next render.
    }
  }, 1000);
}

render();
