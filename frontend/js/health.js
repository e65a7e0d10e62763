// Layer health (issue 13): a layers x time heatmap of one statistic of the trainer's
// `health/<layer>/<stat>` keys (trainer/health.py), used by the run page (one run, its x
// range linked with the loss curve) and the compare page (one small multiple per run, a
// shared colour scale). Pure functions turn keys and series into a grid; the drawing is
// plain Plotly.

import { api } from './api.js';
import { escapeHtml, h, replace, setText } from './escape.js';
import { derivedOf, TERMINAL } from './format.js';
import { announceDrawn, axis, baseLayout, FIGURE, loadPlotly, PLOT_CONFIG, purge } from './plots.js';

export const HEALTH_PREFIX = 'health/';
// The API's MAX_KEYS (server/routes_runs.py): larger models are read in batches.
export const MAX_KEYS = 32;
// Columns drawn per heatmap: more points than this are averaged into equal-width bins.
export const MAX_COLS = 400;
const LIVE_HEALTH_MS = 15000;

// `log`: the colour scale is log10 of the value (norms span decades; dead is a fraction).
export const STATS = {
  dead: { label: 'dead units (fraction)', log: false, colorscale: 'Reds' },
  w_norm: { label: 'weight norm ‖W‖', log: true, colorscale: 'Viridis' },
  g_norm: { label: 'gradient norm ‖∇W‖', log: true, colorscale: 'Viridis' },
  update_ratio: { label: 'update ratio ‖ΔW‖ / ‖W‖', log: true, colorscale: 'Viridis' },
};

// Classifier heads: `fc`, `head`, `classifier` at the top level come after every other
// layer (they are the last module of the torchvision and batchlab models).
const HEAD = /^(fc|head|classifier|linear|out)$/;

/** Natural order of two names: digit runs compare as numbers ("conv2" < "conv10"). */
function naturalCompare(a, b) {
  const ta = a.split(/(\d+)/);
  const tb = b.split(/(\d+)/);
  for (let i = 0; i < Math.min(ta.length, tb.length); i++) {
    if (ta[i] === tb[i]) continue;
    const na = /^\d+$/.test(ta[i]);
    const nb = /^\d+$/.test(tb[i]);
    if (na && nb) return Number(ta[i]) - Number(tb[i]);
    return ta[i] < tb[i] ? -1 : 1;
  }
  return ta.length - tb.length;
}

/**
 * Layers in model order. The keys do not carry `named_modules()` order, so it is
 * reconstructed: natural order of the dotted names (conv1, layer1.0.conv1, layer1.0.conv2,
 * ..., layer2.0.conv1, layers.10.conv1), the classifier head last.
 */
export function layerOrder(layers) {
  return [...new Set(layers)].sort((a, b) => (HEAD.test(a) - HEAD.test(b)) || naturalCompare(a, b));
}

/** `health/<layer>/<stat>` keys -> {layers (model order), byStat: {stat: [layers]}}. */
export function parseHealthKeys(keys) {
  const byStat = Object.fromEntries(Object.keys(STATS).map((s) => [s, []]));
  for (const key of keys) {
    if (!key.startsWith(HEALTH_PREFIX)) continue;
    const rest = key.slice(HEALTH_PREFIX.length);
    const cut = rest.lastIndexOf('/');
    if (cut <= 0) continue;
    const stat = rest.slice(cut + 1);
    if (stat in byStat) byStat[stat].push(rest.slice(0, cut));
  }
  for (const s of Object.keys(byStat)) byStat[s] = layerOrder(byStat[s]);
  const layers = layerOrder(Object.values(byStat).flat());
  return { layers, byStat };
}

export function healthKey(layer, stat) {
  return `${HEALTH_PREFIX}${layer}/${stat}`;
}

/** Split keys into requests of at most MAX_KEYS. */
export function batches(keys, size = MAX_KEYS) {
  const out = [];
  for (let i = 0; i < keys.length; i += size) out.push(keys.slice(i, i + size));
  return out;
}

/** One run's series of `stat` for `layers` ({layer: Series}), in batches of MAX_KEYS. */
export async function readRunStat(runId, layers, stat, params, opts) {
  const keys = layers.map((l) => healthKey(l, stat));
  const parts = await Promise.all(batches(keys).map((ks) => api.runMetrics(runId, { ...params, keys: ks }, opts)));
  const series = Object.assign({}, ...parts.map((p) => p.series || {}));
  return Object.fromEntries(layers.map((l) => [l, series[healthKey(l, stat)]]).filter(([, s]) => s));
}

/** Several runs' series of `stat` ({runId: {layer: Series}}), one batch read per 32 keys. */
export async function readRunsStat(runIds, layers, stat, params, opts) {
  const keys = layers.map((l) => healthKey(l, stat));
  const parts = await Promise.all(batches(keys).map((ks) => api.metrics({ ...params, runs: runIds, keys: ks }, opts)));
  const out = {};
  for (const id of runIds) {
    const series = Object.assign({}, ...parts.map((p) => p.runs?.[String(id)] || {}));
    out[id] = Object.fromEntries(layers.map((l) => [l, series[healthKey(l, stat)]]).filter(([, s]) => s));
  }
  return out;
}

/**
 * The heatmap's grid: one row per layer that has points (model order), one column per
 * distinct x (or MAX_COLS equal-width bins, each the mean of its points, when there are
 * more). rows: [{layer, x: [...], v: [...]}]. z[row][col] is null where a layer has no point.
 */
export function heatmapGrid(rows, maxCols = MAX_COLS) {
  const filled = rows.filter((r) => r.x.length);
  const xs = [...new Set(filled.flatMap((r) => r.x.filter(Number.isFinite)))].sort((a, b) => a - b);
  if (!xs.length) return { x: [], y: [], z: [] };
  let colOf;
  let x;
  if (xs.length <= maxCols) {
    const index = new Map(xs.map((v, i) => [v, i]));
    colOf = (v) => index.get(v);
    x = xs;
  } else {
    const lo = xs[0];
    const width = (xs[xs.length - 1] - lo) / maxCols;
    colOf = (v) => Math.min(maxCols - 1, Math.floor((v - lo) / width));
    x = Array.from({ length: maxCols }, (_, i) => lo + (i + 0.5) * width);
  }
  const z = filled.map((r) => {
    const sum = new Array(x.length).fill(0);
    const n = new Array(x.length).fill(0);
    r.x.forEach((xv, i) => {
      const v = r.v[i];
      if (!Number.isFinite(xv) || v == null || !Number.isFinite(v)) return;
      const c = colOf(xv);
      sum[c] += v;
      n[c] += 1;
    });
    return sum.map((s, i) => (n[i] ? s / n[i] : null));
  });
  return { x, y: filled.map((r) => r.layer), z };
}

/** Rows for heatmapGrid from {layer: Series}, x on the page's axis (xOf(series)). */
export function rowsOf(seriesByLayer, layers, xOf) {
  return layers.filter((l) => seriesByLayer[l]).map((l) => ({ layer: l, x: xOf(seriesByLayer[l]), v: seriesByLayer[l].value }));
}

/** z as coloured: log10 for the log statistics (non-positive values left out). */
export function colourValues(z, stat) {
  if (!STATS[stat].log) return z;
  return z.map((row) => row.map((v) => (v != null && v > 0 ? Math.log10(v) : null)));
}

/** [zmin, zmax] over several coloured grids (a shared colour scale). */
export function zRange(grids, stat) {
  if (!STATS[stat].log) return [0, 1];
  let lo = Infinity;
  let hi = -Infinity;
  for (const g of grids) {
    for (const row of g) {
      for (const v of row) {
        if (v == null) continue;
        if (v < lo) lo = v;
        if (v > hi) hi = v;
      }
    }
  }
  if (!Number.isFinite(lo)) return [0, 1];
  return lo === hi ? [lo - 0.5, hi + 0.5] : [lo, hi];
}

function logTicks([lo, hi]) {
  const tickvals = [];
  for (let e = Math.ceil(lo); e <= Math.floor(hi); e++) tickvals.push(e);
  if (tickvals.length < 2) tickvals.splice(0, tickvals.length, lo, hi);
  return { tickvals, ticktext: tickvals.map((e) => Number((10 ** e).toPrecision(2)).toExponential(0).replace('e+', 'e')) };
}

/**
 * The Plotly heatmap trace of a grid: z coloured (log10 for norms), the raw values in
 * customdata for the hover, meta {stat, layers, raw} for readers (tests, other views).
 */
export function heatmapTrace(grid, stat, { range, showscale = true, xTitle = 'x' } = {}) {
  const def = STATS[stat];
  const z = colourValues(grid.z, stat);
  const [zmin, zmax] = range || zRange([z], stat);
  const colorbar = { title: { text: def.log ? `${def.label}, log` : def.label, side: 'right' }, thickness: 12, len: 0.9 };
  if (def.log) Object.assign(colorbar, logTicks([zmin, zmax]));
  const fmt = stat === 'dead' ? '%{customdata:.0%}' : '%{customdata:.3g}';
  return {
    type: 'heatmap',
    x: grid.x,
    y: grid.y.map(escapeHtml),
    z,
    customdata: grid.z,
    zmin,
    zmax,
    zauto: false,
    colorscale: def.colorscale,
    reversescale: false,
    showscale,
    colorbar,
    hoverongaps: false,
    hovertemplate: `%{y}<br>${escapeHtml(xTitle)} %{x:.4g}<br>${escapeHtml(def.label)}: ${fmt}<extra></extra>`,
    meta: { stat, layers: grid.y, raw: grid.z },
  };
}

/** The heatmap's layout: layers top to bottom in model order, x on the page's axis. */
export function heatmapLayout({ xTitle, title = null, height = null, rows = 1, xRange = null }) {
  const layout = baseLayout({
    // 22 px a row, down to 12 for deep models (a ResNet-50 has 54 layers).
    height: height || Math.max(160, 60 + Math.max(12, Math.min(22, 600 / rows)) * rows),
    margin: { l: 110, r: 12, t: title ? 28 : 8, b: 36 },
    hovermode: 'closest',
    showlegend: false,
    xaxis: axis({ title: { text: xTitle }, range: xRange || undefined, autorange: !xRange }),
    yaxis: axis({ type: 'category', autorange: 'reversed', automargin: true, showgrid: false }),
    uirevision: 'keep',
  });
  if (title) layout.title = { text: escapeHtml(title), font: { size: 12 }, x: 0, xanchor: 'left', y: 0.98, yanchor: 'top' };
  return layout;
}

/**
 * Keep two plots' x ranges together (zooming one zooms the other). Returns an unlink
 * function. The relayout of the follower emits its own event: `busy` stops the echo.
 */
export function linkX(Plotly, a, b) {
  let busy = false;
  const follow = (dst) => (ev) => {
    if (busy || !ev) return;
    let update = null;
    if (ev['xaxis.autorange']) update = { 'xaxis.autorange': true };
    else if ('xaxis.range[0]' in ev) update = { 'xaxis.range': [ev['xaxis.range[0]'], ev['xaxis.range[1]']] };
    else if (Array.isArray(ev['xaxis.range'])) update = { 'xaxis.range': ev['xaxis.range'].slice() };
    if (!update) return;
    busy = true;
    Promise.resolve(Plotly.relayout(dst, update)).finally(() => {
      busy = false;
    });
  };
  const fa = follow(b);
  const fb = follow(a);
  a.on('plotly_relayout', fa);
  b.on('plotly_relayout', fb);
  return () => {
    a.removeListener?.('plotly_relayout', fa);
    b.removeListener?.('plotly_relayout', fb);
  };
}

/**
 * The compare page's figure: one heatmap per compared run (small multiples, titled with
 * its legend label, one colour scale shared by all), only when some run has health keys.
 * `update(runs, groups, x)` is cheap to call on every redraw: it reads again only when
 * the runs, their labels, the x axis or the statistic changed.
 */
export function compareHealth() {
  const sel = h('select', { name: 'health_stat', title: 'layer statistic', onchange: () => {
    stat = sel.value;
    if (last) update(...last);
  } }, Object.entries(STATS).map(([v, d]) => h('option', { value: v }, d.label)));
  const note = h('span', { class: 'muted small' });
  const grid = h('div', { class: 'health-multiples' });
  const el = h('section', { class: 'compare-health', hidden: true },
    h('h2', null, 'Layer health'), h('div', { class: 'health-controls' }, sel, ' ', note), grid);
  const keysOf = new Map(); // run id -> its health keys (kept once the run is over)
  let stat = 'dead';
  let shown = null;
  let last = null;
  let seq = 0;
  let charts = [];

  async function update(runs, groups, x) {
    last = [runs, groups, x];
    const labelOf = new Map();
    for (const g of groups) {
      for (const r of g.runs) labelOf.set(r.id, g.runs.length > 1 ? `${g.label} · run ${r.id}` : g.label);
    }
    const ordered = groups.flatMap((g) => g.runs).filter((r) => runs.includes(r));
    // While a run trains, its heatmaps are re-read with the page's live reloads, at most
    // every LIVE_HEALTH_MS.
    const tick = ordered.some((r) => !TERMINAL.has(r.status)) ? Math.floor(Date.now() / LIVE_HEALTH_MS) : 0;
    const state = JSON.stringify([ordered.map((r) => [r.id, r.status, labelOf.get(r.id)]), x, stat, tick]);
    if (state === shown) return;
    shown = state;
    const mine = ++seq;
    const found = new Map(ordered.filter((r) => keysOf.has(r.id)).map((r) => [r.id, keysOf.get(r.id)]));
    await Promise.all(ordered.filter((r) => !found.has(r.id)).map(async (r) => {
      const got = await api.runKeys(r.id, HEALTH_PREFIX).catch(() => ({ keys: [] }));
      found.set(r.id, got.keys);
      if (TERMINAL.has(r.status)) keysOf.set(r.id, got.keys); // a live run may add layers
    }));
    if (mine !== seq) return;
    const keys = (r) => found.get(r.id) || [];
    const withHealth = ordered.filter((r) => keys(r).length);
    if (!withHealth.length) {
      clear();
      el.hidden = true;
      announceDrawn({ view: 'compare-health', runs: 0, stat });
      return;
    }
    el.hidden = false;
    const parsed = new Map(withHealth.map((r) => [r.id, parseHealthKeys(keys(r))]));
    const layers = layerOrder(withHealth.flatMap((r) => parsed.get(r.id).byStat[stat]));
    const ids = withHealth.map((r) => r.id);
    const params = { x: x === 'samples' ? 'step' : x, max_points: 1000 };
    const parts = await Promise.all(batches(ids, 64).map((chunk) => readRunsStat(chunk, layers, stat, params)));
    if (mine !== seq) return;
    const data = Object.assign({}, ...parts);
    const xOf = (r) => (s) => {
      if (x === 'samples') {
        const kn = derivedOf(r).kn;
        return s.step.map((st) => (st + 1) * kn);
      }
      return s[x];
    };
    const grids = withHealth.map((r) => heatmapGrid(rowsOf(data[r.id] || {}, parsed.get(r.id).byStat[stat], xOf(r))));
    const range = zRange(grids.map((g) => colourValues(g.z, stat)), stat);
    const Plotly = await loadPlotly();
    if (mine !== seq) return;
    clear();
    const xTitle = FIGURE.x_titles[x];
    const missing = withHealth.filter((r, i) => !grids[i].y.length).map((r) => r.id);
    setText(note, missing.length ? `no ${STATS[stat].label} in run${missing.length > 1 ? 's' : ''} ${missing.join(', ')}` : '');
    charts = withHealth.map((r) => h('div', { class: 'chart health-chart', dataset: { runId: String(r.id) } }));
    replace(grid, withHealth.map((r, i) => h('div', { class: 'health-multiple', dataset: { runId: String(r.id) } }, charts[i])));
    await Promise.all(withHealth.map((r, i) => {
      const layout = heatmapLayout({ xTitle, title: labelOf.get(r.id) || `run ${r.id}`, rows: Math.max(1, grids[i].y.length) });
      const trace = heatmapTrace(grids[i], stat, { range, showscale: i === withHealth.length - 1, xTitle });
      return Plotly.react(charts[i], grids[i].y.length ? [trace] : [], layout, PLOT_CONFIG);
    }));
    announceDrawn({ view: 'compare-health', runs: withHealth.length, stat });
  }

  function clear() {
    charts.forEach(purge);
    charts = [];
    replace(grid);
  }

  return {
    el,
    update: (runs, groups, x) => update(runs, groups, x).catch((err) => {
      shown = null; // the next redraw tries again
      setText(note, `could not load layer health: ${err.message || err}`);
    }),
    destroy: () => {
      seq++;
      clear();
    },
  };
}
