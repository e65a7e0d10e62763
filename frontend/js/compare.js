// #/compare?runs=1,2&baseline=1&x=epoch&key=train_err&logy=0&smooth=0.6&band=minmax
//          &group=ID&xr=LO,HI
// Curves of several runs over a baseline drawn in black, like Figures 2-4 of Goyal et al.
// (training error % against epochs). Runs that differ only in seed are drawn as their mean
// with a min-max (or ±1 std) band. The LR of each configuration sits below on the same x
// axis. Zooming re-reads the visible range at full resolution (x_min/x_max per run).

import { api } from './api.js';
import { escapeHtml, h, replace, setText } from './escape.js';
import { derivedOf, paperLabel, pct, TERMINAL } from './format.js';
import {
  announceDrawn,
  axis,
  BASELINE_COLOR,
  baseLayout,
  colorAt,
  loadPlotly,
  PLOT_CONFIG,
  purge,
  withAlpha,
} from './plots.js';
import { href, replaceQuery } from './router.js';
import { aggregate, debiasedEma, meanStd } from './smoothing.js';

const MAX_POINTS = 1500;
const LIVE_MS = 5000;
const ZOOM_DEBOUNCE_MS = 250;

export const METRICS = {
  train_err: { label: 'training error (%)', scale: 100 },
  val_err: { label: 'validation error (%)', scale: 100, markers: true },
  loss: { label: 'training loss' },
  val_loss: { label: 'validation loss', markers: true },
  train_err_epoch: { label: 'training error per epoch (%)', scale: 100, markers: true },
  grad_norm: { label: 'gradient norm' },
  lr: { label: 'learning rate' },
  step_time: { label: 'time per iteration (s)' },
};
const X_AXES = {
  epoch: 'epoch',
  step: 'iteration',
  samples: 'samples seen',
  wall_time: 'wall time (s)',
};
// Spec fields that never tell two configurations apart in a legend.
const LEGEND_SKIP = new Set([
  'seed', 'workers', 'batch_per_worker', 'nproc', 'micro_batch', 'warmup', 'device',
  'checkpoint', 'data_root', 'eval_every', 'base_lr', 'ref_batch',
]);

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

/** The paper's legend ("kn=8k, η=3.2, gradual") plus whatever else differs, and errors. */
function labelGroups(groups) {
  const keys = new Set();
  for (const g of groups) for (const k of Object.keys(g.spec)) keys.add(k);
  const differing = [...keys].filter(
    (k) => !LEGEND_SKIP.has(k) && new Set(groups.map((g) => JSON.stringify(g.spec[k]))).size > 1,
  );
  for (const g of groups) {
    const extra = differing.map((k) => `${k}=${Array.isArray(g.spec[k]) ? g.spec[k].join('/') : g.spec[k]}`);
    g.config = [paperLabel(g.runs[0]), ...extra].join(', ');
    const errs = meanStd(g.runs.map((r) => r.summary?.final_val_err));
    let label = g.config;
    if (errs.n) label += `: ${(100 * errs.mean).toFixed(2)}%${errs.std > 0 ? `±${(100 * errs.std).toFixed(2)}` : ''}`;
    if (g.runs.length > 1) label += ` (${countLabel(g.runs)})`;
    if (g.isBaseline) label += ' · baseline';
    g.label = label;
    g.err = errs;
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

/** x values of a series on the chosen axis (samples: (step + 1) · kn). */
function xValues(series, xMode, run) {
  if (xMode === 'samples') {
    const kn = derivedOf(run).kn;
    return series.step.map((s) => (s + 1) * kn);
  }
  if (xMode === 'step') return series.step;
  return series[xMode];
}

/** Plotly traces for the groups: raw curves faint, smoothed on top, bands, LR below. */
export function buildTraces(groups, data, st) {
  const metric = METRICS[st.key];
  const scale = metric.scale || 1;
  const smoothOn = st.smooth > 0 && !metric.markers;
  const traces = [];
  const curveOf = (run, key, factor) => {
    const s = data[String(run.id)]?.[key];
    if (!s || !s.value.length) return null;
    return { x: xValues(s, st.x, run), y: factor === 1 ? s.value : s.value.map((v) => (v == null ? null : v * factor)), run };
  };
  for (const g of groups) {
    const name = escapeHtml(g.label);
    const legendgroup = g.key;
    const curves = g.runs.map((r) => curveOf(r, st.key, scale)).filter(Boolean);
    const width = g.isBaseline ? 2 : 1.6;
    const mode = metric.markers ? 'lines+markers' : 'lines';
    const marker = metric.markers ? { size: 4, color: g.color } : undefined;
    const common = { type: 'scatter', legendgroup, meta: { group: g.key, baseline: g.isBaseline } };
    let first = true;
    const line = (x, y, extra) => {
      const trace = {
        ...common,
        mode,
        x,
        y,
        name,
        showlegend: first,
        line: { color: g.color, width },
        hovertemplate: `%{y:.4g}<extra>${name}</extra>`,
        ...extra,
      };
      if (marker) trace.marker = marker;
      traces.push(trace);
      first = false;
    };
    const faint = (x, y) =>
      traces.push({
        ...common,
        mode: 'lines',
        x,
        y,
        showlegend: false,
        hoverinfo: 'skip',
        line: { color: withAlpha(g.color, 0.22), width: 1 },
        meta: { ...common.meta, raw: true },
      });
    if (curves.length === 0) {
      // Keep the configuration in the legend even before it has points.
      line([], []);
      continue;
    }
    if (curves.length > 1 && st.band !== 'off') {
      const smoothed = curves.map((c) => ({ x: c.x, y: smoothOn ? debiasedEma(c.y, st.smooth) : c.y }));
      const agg = aggregate(smoothed, st.band);
      traces.push({
        ...common,
        mode: 'lines',
        x: agg.x,
        y: agg.lo,
        showlegend: false,
        hoverinfo: 'skip',
        line: { width: 0, color: g.color },
        meta: { ...common.meta, band: 'lo' },
      });
      traces.push({
        ...common,
        mode: 'lines',
        x: agg.x,
        y: agg.hi,
        fill: 'tonexty',
        fillcolor: withAlpha(g.color, 0.18),
        showlegend: false,
        hoverinfo: 'skip',
        line: { width: 0, color: g.color },
        meta: { ...common.meta, band: st.band },
      });
      if (smoothOn) {
        const rawMean = aggregate(curves, st.band);
        faint(rawMean.x, rawMean.mean);
      }
      line(agg.x, agg.mean, { meta: { ...common.meta, mean: true, runs: curves.map((c) => c.run.id) } });
    } else {
      for (const c of curves) {
        if (smoothOn) faint(c.x, c.y);
        line(c.x, smoothOn ? debiasedEma(c.y, st.smooth) : c.y, {
          meta: { ...common.meta, run: c.run.id },
        });
      }
    }
    // LR below: the schedule is the same for every seed, so one curve per configuration.
    const lr = curveOf(g.runs[0], 'lr', 1);
    if (lr && st.key !== 'lr') {
      traces.push({
        ...common,
        mode: 'lines',
        x: lr.x,
        y: lr.y,
        yaxis: 'y2',
        showlegend: false,
        line: { color: g.color, width: 1.2 },
        hovertemplate: `LR %{y:.4g}<extra>${name}</extra>`,
        meta: { ...common.meta, lr: true },
      });
    }
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
  const message = h('p', { class: 'empty', hidden: true });

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
      ),
      message,
      chart,
      table,
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
    if (st.group) {
      runs = await api.runs({ group: st.group });
      runs.sort((a, b) => a.id - b.id);
      st.runs = runs.map((r) => r.id);
      if (!st.baseline) st.baseline = runs.find((r) => r.is_baseline)?.id ?? null;
    } else {
      const known = new Map(allRuns.map((r) => [r.id, r]));
      const missing = st.runs.filter((id) => !known.has(id));
      const extra = await Promise.all(missing.map((id) => api.run(id).catch(() => null)));
      for (const r of extra) if (r) known.set(r.id, r);
      runs = st.runs.map((id) => known.get(id)).filter(Boolean);
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
      const parts = await Promise.all(
        runs.map((r) => {
          // A margin on each side keeps lines whole while the user pans a little.
          const pad = 0.25 * (st.xr[1] - st.xr[0]);
          let [lo, hi] = [st.xr[0] - pad, st.xr[1] + pad];
          if (st.x === 'samples') {
            const kn = derivedOf(r).kn;
            [lo, hi] = [Math.floor(lo / kn) - 1, Math.ceil(hi / kn)];
          }
          const params = { keys, x: apiX, max_points: MAX_POINTS, x_min: Math.max(0, lo), x_max: hi };
          return api.runMetrics(r.id, params);
        }),
      );
      out = Object.fromEntries(parts.map((p, i) => [String(ids[i]), p.series]));
    } else {
      out = (await api.metrics({ runs: ids, keys, x: apiX, max_points: MAX_POINTS })).runs;
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
      setText(message, 'Pick runs to compare: tick them in the Runs table, or open a group above.');
      message.hidden = false;
      chart.hidden = true;
      replace(table);
      return;
    }
    message.hidden = true;
    chart.hidden = false;
    Plotly = Plotly || (await loadPlotly());
    if (stopped) return;
    const t0 = performance.now();
    const traces = buildTraces(groups, data, st);
    const metric = METRICS[st.key];
    const hasLr = traces.some((t) => t.yaxis === 'y2');
    const layout = baseLayout({
      hovermode: 'closest',
      height: 560,
      margin: { l: 64, r: 16, t: 8, b: 44 },
      // Above the plot, out of the curves' way (Plotly grows the top margin to fit it).
      legend: { orientation: 'h', x: 0, xanchor: 'left', y: 1.01, yanchor: 'bottom', font: { size: 12 } },
      xaxis: axis({ title: { text: X_AXES[st.x] }, anchor: hasLr ? 'y2' : 'y', range: st.xr || undefined, autorange: st.xr ? false : true }),
      yaxis: axis({ title: { text: metric.label }, type: st.logy ? 'log' : 'linear', domain: hasLr ? [0.3, 1] : [0, 1], exponentformat: 'power' }),
      yaxis2: axis({ title: { text: 'LR' }, domain: [0, 0.22], rangemode: 'tozero' }),
      uirevision: `${st.x}|${st.key}|${st.logy}|${runs.map((r) => r.id).join(',')}`,
    });
    if (!hasLr) delete layout.yaxis2;
    await Plotly.react(chart, traces, layout, PLOT_CONFIG);
    if (!chartReady) {
      chartReady = true;
      chart.on('plotly_relayout', onRelayout);
    }
    renderTable();
    announceDrawn({ view: 'compare', traces: traces.length, runs: runs.length, ms: performance.now() - t0 });
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
        loadPlotly().catch(() => {});
        await resolveRuns();
        groups = groupRuns(runs, st.baseline);
        syncControls();
        fillPicker();
      }
      setText(status, 'loading…');
      let fresh = early ? await early : await fetchData();
      // Ids in the URL that are not runs (deleted) were read for nothing: read again.
      if (fresh && early && runs.length !== st.runs.length) fresh = await fetchData();
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
  const gl = await api.sweeps().catch(() => []); // the group menu: after the first draw
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
  };
}
