// #/compare?runs=1,2&baseline=1&x=epoch&key=train_err&logy=0&smooth=0.6&band=minmax
//          &group=ID&xr=LO,HI
// Curves of several runs over a baseline drawn in black, like Figures 2-4 of Goyal et al.
// (training error % against epochs). Runs that differ only in seed are drawn as their mean
// with a min-max (or ±1 std) band. The LR of each configuration sits below on the same x
// axis. Zooming re-reads the visible range at full resolution (x_min/x_max per run).

import { api } from './api.js';
import { escapeHtml, h, replace, setText } from './escape.js';
import { derivedOf, formatKn, num, paperLabel, pct, TERMINAL } from './format.js';
import { announceDrawn, axis, BASELINE_COLOR, colorAt, FIGURE, loadPlotly, PLOT_CONFIG, purge, themed, withAlpha } from './plots.js';
import { compareHealth } from './health.js';
import { href, replaceQuery } from './router.js';
import { aggregate, debiasedEma, meanStd } from './smoothing.js';

const MAX_POINTS = FIGURE.read.max_points;
const LIVE_MS = 5000;
const ZOOM_DEBOUNCE_MS = 250;

const METRICS = FIGURE.metrics;
const X_AXES = FIGURE.x_titles;

/** Parse the view state from the hash query (defaults: the paper's Figure 2 view). */
export function readState(query) {
  const ids = (query.get('runs') || '')
    .split(',')
    .map((s) => parseInt(s, 10))
    .filter((n) => Number.isInteger(n) && n > 0);
  const xr = (query.get('xr') || '').split(',').map(Number);
  const smooth = Number(query.get('smooth') ?? 0.6);
  return {
    runs: [...new Set(ids)],
    group: query.get('group') || '',
    baseline: parseInt(query.get('baseline') || '', 10) || null,
    x: X_AXES[query.get('x')] ? query.get('x') : 'epoch',
    key: METRICS[query.get('key')] ? query.get('key') : 'train_err',
    logy: query.get('logy') === '1',
    smooth: Number.isFinite(smooth) ? Math.min(0.99, Math.max(0, smooth)) : 0.6,
    band: ['minmax', 'std', 'off'].includes(query.get('band')) ? query.get('band') : 'minmax',
    xr: xr.length === 2 && xr.every(Number.isFinite) && xr[0] < xr[1] ? xr : null,
  };
}

function writeState(st) {
  replaceQuery({
    runs: st.group ? '' : st.runs,
    group: st.group,
    baseline: st.baseline ?? '',
    x: st.x,
    key: st.key,
    logy: st.logy ? '1' : '0',
    smooth: String(st.smooth),
    band: st.band === 'minmax' ? '' : st.band,
    xr: st.xr ? st.xr.map((v) => Number(v.toPrecision(6))) : '',
  });
}

/** Configurations: runs whose specs are equal apart from the seed form one curve. */
export function groupRuns(runs, baselineId) {
  const byKey = new Map();
  for (const run of runs) {
    const { seed, ...rest } = run.spec || {};
    const key = JSON.stringify(Object.keys(rest).sort().map((k) => [k, rest[k]]));
    if (!byKey.has(key)) byKey.set(key, { key, runs: [], spec: run.spec || {} });
    byKey.get(key).runs.push(run);
  }
  const groups = [...byKey.values()];
  for (const g of groups) {
    g.isBaseline = g.runs.some((r) => r.id === baselineId);
    g.kn = derivedOf(g.runs[0]).kn;
  }
  // Baseline first (legend and bottom of the drawing order), then by kn.
  groups.sort((a, b) => b.isBaseline - a.isBaseline || a.kn - b.kn || a.runs[0].id - b.runs[0].id);
  let c = 0;
  for (const g of groups) g.color = g.isBaseline ? BASELINE_COLOR : colorAt(c++);
  labelGroups(groups);
  return groups;
}

/**
 * The paper's words ("kn=8k, η=3.2, gradual warmup"), then each other field whose value
 * differs among the configurations where it has an effect (figure_spec.json legend_*),
 * then the final validation error.
 */
function labelGroups(groups) {
  const { legend_words: words, legend_only_with: onlyWith, legend_skip: skip } = FIGURE;
  const applies = (spec, k) => spec[k] != null && (!onlyWith[k] || onlyWith[k][1].includes(spec[onlyWith[k][0]]));
  const keys = new Set(groups.flatMap((g) => Object.keys(g.spec)).filter((k) => !skip.includes(k)));
  const differing = [...keys].filter(
    (k) => new Set(groups.filter((g) => applies(g.spec, k)).map((g) => JSON.stringify(g.spec[k]))).size > 1,
  );
  const text = (v) => (Array.isArray(v) ? v.join('/') : String(v));
  const wordsFor = (k, v) =>
    typeof words[k] === 'string' ? words[k].replace('{}', text(v)) : (words[k]?.[v] ?? `${k}=${text(v)}`);
  for (const g of groups) {
    const { kn, peak } = derivedOf(g.runs[0]);
    const warm = g.spec.warmup ? [words.warmup[g.spec.warmup] ?? g.spec.warmup] : [];
    const extra = differing.filter((k) => applies(g.spec, k)).map((k) => wordsFor(k, g.spec[k]));
    g.config = [`kn=${formatKn(kn)}`, `η=${num(peak)}`, ...warm, ...extra].join(', ');
    g.err = meanStd(g.runs.map((r) => r.summary?.final_val_err));
    g.label = g.config;
    if (g.err.n) g.label += `: ${(100 * g.err.mean).toFixed(2)}%${g.err.std > 0 ? `±${(100 * g.err.std).toFixed(2)}` : ''}`;
    if (g.runs.length > 1) g.label += ` (${countLabel(g.runs)})`;
    if (g.isBaseline) g.label += ' · baseline';
  }
  // Identical labels (same config, e.g. two baselines of one spec) get their run names.
  const seen = new Map();
  for (const g of groups) seen.set(g.label, (seen.get(g.label) || 0) + 1);
  for (const g of groups) {
    if (seen.get(g.label) > 1) g.label += ` [${g.runs.map((r) => r.name || r.id).join(', ')}]`;
  }
}

/** "3 seeds", or "3 runs" when some share a seed (repeats). */
function countLabel(runs) {
  const seeds = new Set(runs.map((r) => r.spec?.seed));
  return `${runs.length} ${seeds.size === runs.length ? 'seeds' : 'runs'}`;
}

/** x values of a series on the chosen axis (samples: (step + 1) · samples per step). */
function xValues(series, xMode, run) {
  if (xMode === 'samples') {
    const kn = derivedOf(run).perStep;
    return series.step.map((s) => (s + 1) * kn);
  }
  if (xMode === 'step') return series.step;
  return series[xMode];
}

/** One of figure_spec.json's trace templates with "$color", "$name", ... filled in. */
function fromTemplate(kind, values, data) {
  const fill = (v) => {
    if (v && typeof v === 'object') return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, fill(x)]));
    if (typeof v === 'string' && v[0] === '$' && v.slice(1) in values) return values[v.slice(1)];
    return typeof v === 'string' ? v.replace(/\$(\w+)/g, (m, k) => (k in values ? String(values[k]) : m)) : v;
  };
  return { ...fill(FIGURE.traces[kind]), ...data };
}

/** Plotly traces for the groups: raw curves faint, smoothed on top, bands, LR below. */
export function buildTraces(groups, data, st) {
  const metric = METRICS[st.key];
  const smooth = st.smooth > 0 && !metric.markers ? st.smooth : 0;
  const traces = [];
  const curveOf = (run, key, factor) => {
    const s = data[String(run.id)]?.[key];
    if (!s || !s.value.length) return null;
    return { x: xValues(s, st.x, run), y: factor === 1 ? s.value : s.value.map((v) => (v == null ? null : v * factor)), run };
  };
  for (const g of groups) {
    const width = g.isBaseline ? FIGURE.baseline.width : FIGURE.line_width;
    const values = { color: g.color, width, name: escapeHtml(g.label), faint: withAlpha(g.color, FIGURE.raw_alpha), fill: withAlpha(g.color, FIGURE.band_alpha) };
    let shown = false;
    const add = (kind, x, y, meta) => {
      const trace = fromTemplate(kind, values, { legendgroup: g.key, x, y, meta: { group: g.key, baseline: g.isBaseline, ...meta } });
      if (kind === 'curve') {
        Object.assign(trace, { name: values.name, showlegend: !shown }, metric.markers ? fromTemplate('markers', values) : {});
        shown = true;
      }
      traces.push(trace);
    };
    const curves = g.runs.map((r) => curveOf(r, st.key, metric.scale || 1)).filter(Boolean);
    if (curves.length === 0) {
      add('curve', [], []); // the configuration stays in the legend before it has points
      continue;
    }
    if (curves.length > 1 && st.band !== 'off') {
      const agg = aggregate(curves.map((c) => ({ x: c.x, y: debiasedEma(c.y, smooth) })), st.band);
      add('band_lo', agg.x, agg.lo, { band: 'lo' });
      add('band_hi', agg.x, agg.hi, { band: st.band });
      if (smooth) {
        const raw = aggregate(curves, st.band);
        add('raw', raw.x, raw.mean, { raw: true });
      }
      add('curve', agg.x, agg.mean, { mean: true, runs: curves.map((c) => c.run.id) });
    } else {
      for (const c of curves) {
        if (smooth) add('raw', c.x, c.y, { raw: true });
        add('curve', c.x, debiasedEma(c.y, smooth), { run: c.run.id });
      }
    }
    // LR below: the schedule is the same for every seed, so one curve per configuration.
    const lr = st.key !== 'lr' && curveOf(g.runs[0], 'lr', 1);
    if (lr) add('lr', lr.x, lr.y, { lr: true });
  }
  return traces;
}

export async function mount(root, route) {
  const st = readState(route.query);
  let runs = []; // Run objects being compared
  let allRuns = []; // for the picker
  let groups = [];
  let data = {};
  let stopped = false;
  let liveTimer = null;
  let zoomTimer = null;
  let fetchSeq = 0;
  let missing = []; // ids in the URL that are no run (the API's `missing`)
  let Plotly = null;
  let chartReady = false;

  // ---------- controls ----------
  const pickerList = h('div', { class: 'picker-list' });
  const pickerSearch = h('input', { type: 'search', placeholder: 'filter runs', oninput: fillPicker });
  const groupSel = h('select', { name: 'group', onchange: onGroup });
  const pickerSummary = h('summary', null, 'runs');
  const picker = h(
    'details',
    { class: 'picker' },
    pickerSummary,
    h('div', { class: 'picker-body' }, h('label', null, 'open a group ', groupSel), pickerSearch, pickerList),
  );
  const baselineSel = h('select', { name: 'baseline', title: 'baseline (drawn in black)', onchange: () => {
    st.baseline = parseInt(baselineSel.value, 10) || null;
    regroup();
  } });
  const xSel = h(
    'select',
    { name: 'x', title: 'x axis', onchange: () => {
      st.x = xSel.value;
      st.xr = null;
      reload();
    } },
    Object.entries(X_AXES).map(([v, t]) => h('option', { value: v }, `x: ${t}`)),
  );
  const keySel = h(
    'select',
    { name: 'key', title: 'metric', onchange: () => {
      st.key = keySel.value;
      reload();
    } },
    Object.entries(METRICS).map(([v, m]) => h('option', { value: v }, m.label)),
  );
  const logBox = h('input', { type: 'checkbox', name: 'logy', onchange: () => {
    st.logy = logBox.checked;
    redraw();
  } });
  const smoothVal = h('output', { class: 'smooth-val' });
  const smoothRange = h('input', {
    type: 'range', name: 'smooth', min: '0', max: '0.99', step: '0.01',
    oninput: () => {
      st.smooth = Number(smoothRange.value);
      setText(smoothVal, st.smooth.toFixed(2));
      scheduleRedraw();
    },
  });
  const bandSel = h(
    'select',
    { name: 'band', title: 'runs differing only in seed', onchange: () => {
      st.band = bandSel.value;
      redraw();
    } },
    h('option', { value: 'minmax' }, 'seeds: mean, min–max'),
    h('option', { value: 'std' }, 'seeds: mean ± std'),
    h('option', { value: 'off' }, 'seeds: each run'),
  );
  const status = h('span', { class: 'muted small' });
  const chart = h('div', { class: 'chart compare-chart', id: 'compare-chart' });
  const table = h('div', { class: 'table-wrap' });
  const healthView = compareHealth(); // layer-health small multiples (health.js)
  const message = h('div', { class: 'empty', hidden: true });
  const notice = h('p', { class: 'notice', hidden: true });
  // The comparison's points at full resolution (GET /api/metrics.csv|parquet?runs=...).
  const csvLink = h('a', { class: 'button', download: '', title: 'every point of the compared runs, as CSV' }, 'CSV');
  const parquetLink = h('a', { class: 'button', download: '', title: 'every point of the compared runs, as Parquet' }, 'Parquet');
  const parallelLink = h('a', { class: 'button', title: 'spec fields that differ against final error' }, 'Parallel coordinates');
  const exports = h('span', { class: 'exports' }, h('span', { class: 'muted small' }, 'download'), csvLink, parquetLink);

  replace(
    root,
    h(
      'section',
      { class: 'view compare-view' },
      h(
        'div',
        { class: 'toolbar wrap' },
        h('h1', null, 'Compare'),
        picker,
        h('label', null, 'baseline ', baselineSel),
        xSel,
        keySel,
        h('label', null, logBox, ' log y'),
        h('label', { class: 'smooth', title: 'debiased EMA (TensorBoard); raw curve faint beneath' }, 'smoothing ', smoothRange, smoothVal),
        bandSel,
        h('span', { class: 'spacer' }),
        status,
        exports,
        parallelLink,
      ),
      notice,
      message,
      chart,
      table,
      healthView.el,
    ),
  );

  function syncControls() {
    xSel.value = st.x;
    keySel.value = st.key;
    logBox.checked = st.logy;
    smoothRange.value = String(st.smooth);
    setText(smoothVal, st.smooth.toFixed(2));
    bandSel.value = st.band;
    replace(
      baselineSel,
      h('option', { value: '' }, 'none'),
      runs.map((r) => h('option', { value: String(r.id) }, `${r.id}: ${r.name || paperLabel(r)}`)),
    );
    baselineSel.value = st.baseline ? String(st.baseline) : '';
    setText(pickerSummary, `${runs.length} run${runs.length === 1 ? '' : 's'} ▾`);
    const ids = runs.map((r) => r.id);
    exports.hidden = !runs.length;
    parallelLink.hidden = runs.length < 2;
    csvLink.href = api.metricsExportUrl(ids, 'csv');
    parquetLink.href = api.metricsExportUrl(ids, 'parquet');
    parallelLink.href = href('parallel', { runs: ids });
  }

  /** Ids of the link that are no run: said, not dropped silently. */
  function showMissing() {
    notice.hidden = !missing.length;
    const many = missing.length > 1;
    setText(notice, `Run${many ? 's' : ''} ${missing.join(', ')} ${many ? 'do' : 'does'} not exist (deleted?) and ${many ? 'are' : 'is'} left out.`);
  }

  // ---------- picker ----------
  function fillPicker() {
    const q = pickerSearch.value.trim().toLowerCase();
    const chosen = new Set(runs.map((r) => r.id));
    const list = allRuns.filter((r) => !q || `${r.id} ${r.name || ''} ${paperLabel(r)}`.toLowerCase().includes(q));
    replace(
      pickerList,
      list.slice(0, 300).map((r) => {
        const box = h('input', { type: 'checkbox', checked: chosen.has(r.id), onchange: () => {
          const ids = new Set(runs.map((x) => x.id));
          if (box.checked) ids.add(r.id);
          else ids.delete(r.id);
          st.group = '';
          st.runs = [...ids].sort((a, b) => a - b);
          if (st.baseline && !ids.has(st.baseline)) st.baseline = null;
          reload(true);
        } });
        return h(
          'label',
          { class: 'pick' },
          box,
          ` ${r.id} `,
          h('span', { class: 'name' }, r.name || ''),
          h('span', { class: 'muted' }, ` ${paperLabel(r)} · ${r.status}`),
        );
      }),
    );
  }

  async function onGroup() {
    if (!groupSel.value) return;
    st.group = groupSel.value;
    st.baseline = null;
    st.xr = null;
    await reload(true);
  }

  // ---------- data ----------
  async function resolveRuns() {
    allRuns = await api.runs({});
    missing = [];
    if (st.group) {
      runs = await api.runs({ group: st.group });
      runs.sort((a, b) => a.id - b.id);
      st.runs = runs.map((r) => r.id);
      if (!st.baseline) st.baseline = runs.find((r) => r.is_baseline)?.id ?? null;
    } else {
      const known = new Map(allRuns.map((r) => [r.id, r]));
      const unknown = st.runs.filter((id) => !known.has(id));
      const extra = await Promise.all(unknown.map((id) => api.run(id).catch(() => null)));
      for (const r of extra) if (r) known.set(r.id, r);
      runs = st.runs.map((id) => known.get(id)).filter(Boolean);
      missing = st.runs.filter((id) => !known.has(id));
    }
    if (st.baseline && !runs.some((r) => r.id === st.baseline)) st.baseline = null;
  }

  /** Read the curves of every run for the current metric (+ LR), in the zoomed range. */
  async function fetchData(ids = runs.map((r) => r.id)) {
    const mine = ++fetchSeq;
    const keys = st.key === 'lr' ? ['lr'] : [st.key, 'lr'];
    if (!ids.length) return null;
    const apiX = st.x === 'samples' ? 'step' : st.x;
    let out;
    if (st.xr) {
      // A zoomed range: one read per run (/api/runs/ID/metrics takes x_min/x_max), each
      // at full resolution inside the range. Samples map to a different step range per run.
      // The ids, not `runs`: a link with a range reads its curves before the run list
      // arrives (runs is still empty then, which once read nothing and drew bare axes).
      const byId = new Map(runs.map((r) => [r.id, r]));
      const parts = await Promise.all(
        ids.map((id) => {
          // A margin on each side keeps lines whole while the user pans a little.
          const pad = 0.25 * (st.xr[1] - st.xr[0]);
          let [lo, hi] = [st.xr[0] - pad, st.xr[1] + pad];
          if (st.x === 'samples') {
            const kn = byId.has(id) ? derivedOf(byId.get(id)).perStep : 1;
            [lo, hi] = [Math.floor(lo / kn) - 1, Math.ceil(hi / kn)];
          }
          const params = { keys, x: apiX, max_points: MAX_POINTS, x_min: Math.max(0, lo), x_max: hi };
          // An id that is no run (deleted) reads as no curves; resolveRuns reports it.
          return api.runMetrics(id, params).catch((err) => {
            if (err.status === 404) return { series: {} };
            throw err;
          });
        }),
      );
      out = Object.fromEntries(parts.map((p, i) => [String(ids[i]), p.series]));
    } else {
      // Only what the plot draws (figure_spec.json `read`, as the notebook reads): the x
      // column and the value, 6 significant digits (hover shows 4), and the LR panel's
      // corners (its lines are never smoothed nor marked). A sixth of the full answer's
      // JSON to write, gzip, send and parse.
      const { digits, drop_flat: flat } = FIGURE.read;
      const compact = { columns: [apiX, 'value'], digits, drop_flat: flat.filter((k) => k !== st.key) };
      out = (await api.metrics({ runs: ids, keys, x: apiX, max_points: MAX_POINTS, ...compact })).runs;
    }
    return mine === fetchSeq ? out : null;
  }

  // ---------- drawing ----------
  function regroup() {
    groups = groupRuns(runs, st.baseline);
    writeState(st);
    syncControls();
    redraw();
  }

  let redrawQueued = false;
  function scheduleRedraw() {
    writeState(st);
    if (redrawQueued) return;
    redrawQueued = true;
    requestAnimationFrame(() => {
      redrawQueued = false;
      redraw();
    });
  }

  async function redraw() {
    if (stopped) return;
    writeState(st);
    if (!runs.length) {
      replace(
        message,
        h('strong', null, 'No runs to compare yet.'),
        h('br'),
        'Tick runs in the ',
        h('a', { href: '#/runs' }, 'Runs table'),
        ' and press Compare, or pick runs or a group in the “runs” menu above.',
      );
      message.hidden = false;
      announceDrawn({ view: 'compare', traces: 0, runs: 0, empty: true });
      chart.hidden = true;
      replace(table);
      healthView.update([], [], st.x);
      return;
    }
    message.hidden = true;
    chart.hidden = false;
    Plotly = Plotly || (await loadPlotly('basic'));
    if (stopped) return;
    const t0 = performance.now();
    const traces = buildTraces(groups, data, st);
    const metric = METRICS[st.key];
    const hasLr = traces.some((t) => t.yaxis === 'y2');
    const lr = FIGURE.lr_panel;
    const layout = {
      ...FIGURE.layout,
      xaxis: axis({ title: { text: X_AXES[st.x] }, anchor: hasLr ? 'y2' : 'y', range: st.xr || undefined, autorange: !st.xr }),
      yaxis: axis({ title: { text: metric.label }, exponentformat: 'power', domain: hasLr ? lr.curves_domain : [0, 1], type: st.logy ? 'log' : 'linear' }),
      uirevision: `${st.x}|${st.key}|${st.logy}|${runs.map((r) => r.id).join(',')}`,
    };
    if (hasLr) layout.yaxis2 = axis({ title: { text: lr.title }, domain: lr.domain, rangemode: 'tozero' });
    const tBuilt = performance.now();
    await Plotly.react(chart, traces, themed(layout), PLOT_CONFIG);
    if (!chartReady) {
      chartReady = true;
      chart.on('plotly_relayout', onRelayout);
    }
    renderTable();
    healthView.update(runs, groups, st.x);
    // ms: traces built and drawn; build_ms of it the traces (bench/browser_perf.py).
    announceDrawn({ view: 'compare', traces: traces.length, runs: runs.length, ms: performance.now() - t0, build_ms: tBuilt - t0 });
  }

  function renderTable() {
    const rows = groups.map((g) =>
      h(
        'tr',
        { class: g.isBaseline ? 'baseline' : '' },
        h('td', null, h('span', { class: 'swatch', style: { background: g.color } })),
        h('td', null, g.config, g.runs.length > 1 ? ` (${countLabel(g.runs)})` : '', g.isBaseline ? h('span', { class: 'tag' }, 'baseline') : ''),
        h('td', null, g.runs.map((r, i) => [i ? ', ' : '', h('a', { href: `#/run/${r.id}`, title: r.name || '' }, String(r.id))])),
        h('td', { class: 'num' }, g.err.n ? `${pct(g.err.mean)}${g.err.std > 0 ? ` ± ${(100 * g.err.std).toFixed(2)}` : ''}` : '–'),
        h('td', null, [...new Set(g.runs.map((r) => r.status))].join(', ')),
      ),
    );
    replace(
      table,
      h(
        'table',
        { class: 'grid compact' },
        h('thead', null, h('tr', null, h('th'), h('th', null, 'configuration'), h('th', null, 'runs'), h('th', { class: 'num' }, 'final val err'), h('th', null, 'status'))),
        h('tbody', null, rows),
      ),
    );
  }

  async function reload(resolve = false) {
    if (stopped) return;
    writeState(st);
    try {
      let early = null;
      if (resolve) {
        // The ids are in the URL: read the curves while the run list is read, and let
        // Plotly compile while both are on the way.
        if (!st.group && st.runs.length && !(st.xr && st.x === 'samples')) {
          early = fetchData(st.runs);
        }
        loadPlotly('basic').catch(() => {});
        await resolveRuns();
        groups = groupRuns(runs, st.baseline);
        syncControls();
        fillPicker();
      }
      showMissing();
      if (!runs.length) {
        // Nothing to read: say how to pick runs instead of "loading…" for ever.
        setText(status, '');
        await redraw();
        return;
      }
      setText(status, 'loading…');
      const fresh = early ? await early : await fetchData();
      if (stopped || fresh === null) return;
      data = fresh;
      setText(status, '');
      await redraw();
    } catch (err) {
      if (!stopped) setText(status, `error: ${err.message || err}`);
    }
  }

  /** Zoom and pan: remember the range (URL) and re-read it at full resolution. */
  function onRelayout(ev) {
    let next;
    if (ev['xaxis.autorange']) next = null;
    else if ('xaxis.range[0]' in ev) next = [ev['xaxis.range[0]'], ev['xaxis.range[1]']];
    else if (Array.isArray(ev['xaxis.range'])) next = ev['xaxis.range'];
    else return;
    if (next && st.xr && next[0] === st.xr[0] && next[1] === st.xr[1]) return;
    st.xr = next;
    writeState(st);
    clearTimeout(zoomTimer);
    zoomTimer = setTimeout(() => reload(false), ZOOM_DEBOUNCE_MS);
  }

  /** While any compared run is still going, re-read its curves every few seconds. */
  function live() {
    liveTimer = setTimeout(async () => {
      if (stopped) return;
      if (!document.hidden && runs.some((r) => !TERMINAL.has(r.status))) {
        try {
          const fresh = await api.runs({});
          const byId = new Map(fresh.map((r) => [r.id, r]));
          runs = runs.map((r) => byId.get(r.id) || r);
          groups = groupRuns(runs, st.baseline);
          await reload(false);
        } catch {
          /* try again next tick */
        }
      }
      live();
    }, LIVE_MS);
  }

  // The run picker closes when the user clicks elsewhere, as a menu does.
  const closePicker = (ev) => {
    if (picker.open && !picker.contains(ev.target)) picker.open = false;
  };
  document.addEventListener('click', closePicker);

  // ---------- start ----------
  syncControls();
  await reload(true);
  // The group menu (sweeps and comparison groups): after the first draw.
  const gl = await api.sweeps({ kind: 'all' }).catch(() => []);
  replace(
    groupSel,
    h('option', { value: '' }, '—'),
    gl.map((g) => h('option', { value: String(g.id) }, `${g.kind} ${g.id}: ${g.name || ''}`)),
  );
  groupSel.value = st.group;
  live();

  return () => {
    stopped = true;
    document.removeEventListener('click', closePicker);
    clearTimeout(liveTimer);
    clearTimeout(zoomTimer);
    purge(chart);
    healthView.destroy();
  };
}
