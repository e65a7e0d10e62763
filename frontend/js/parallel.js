// #/parallel?runs=1,2,3 (or ?group=ID&err=final|median5|best): parallel coordinates of a
// selection of runs or a sweep. One axis per spec field whose value differs among the
// runs (plus total batch and peak LR when they differ), the validation error last; one
// line per run, coloured by that error.

import { api } from './api.js';
import { h, replace, setText } from './escape.js';
import { derivedOf } from './format.js';
import { announceDrawn, baseLayout, loadPlotly, PLOT_CONFIG, purge } from './plots.js';
import { href, replaceQuery } from './router.js';

const ERR_FIELDS = {
  final: ['final_val_err', 'final val err (%)'],
  median5: ['median_last5_val_err', 'median last 5 val err (%)'],
  best: ['best_val_err', 'best val err (%)'],
};
// Fields that say where or how often, not what was trained.
const SKIP = new Set(['data_root', 'checkpoint', 'device', 'eval_every', 'name']);

const text = (v) => (v == null ? 'none' : Array.isArray(v) ? v.join('/') : String(v));

// Range and tick labels: three significant digits, no trailing zeros (0.1, 0.0125, 2048).
const NUMBER_FORMAT = '.3~g';
const round3 = (v) => Number(v.toPrecision(3));

/**
 * One parcoords dimension of `values`: numbers as they are, or on a log2 scale with a tick
 * at each value when `log` (batch sizes and LRs double along a sweep; parcoords has no log
 * axis), anything else as categories.
 */
export function dimension(label, values, { log = false } = {}) {
  if (values.every((v) => typeof v === 'number' && Number.isFinite(v))) {
    if (log && values.every((v) => v > 0)) {
      const ticks = [...new Set(values)].sort((a, b) => a - b);
      return {
        label,
        values: values.map(Math.log2),
        tickvals: ticks.map(Math.log2),
        ticktext: ticks.map((v) => String(Number.isInteger(v) ? v : round3(v))),
        meta: { log2: true },
      };
    }
    return { label, values, tickformat: NUMBER_FORMAT };
  }
  const cats = [...new Set(values.map(text))].sort();
  return { label, values: values.map((v) => cats.indexOf(text(v))), tickvals: cats.map((_, i) => i), ticktext: cats };
}

/** The dimensions of `runs`: differing spec fields, k·n and peak LR if they differ, error. */
export function dimensionsOf(runs, errField, errLabel) {
  const derived = runs.map(derivedOf);
  const dims = [];
  const differs = (values) => new Set(values.map((v) => JSON.stringify(v ?? null))).size > 1;
  const kns = derived.map((d) => d.kn);
  if (differs(kns)) dims.push(dimension('k·n', kns, { log: true }));
  const keys = [...new Set(runs.flatMap((r) => Object.keys(r.spec || {})))].filter((k) => !SKIP.has(k)).sort();
  for (const k of keys) {
    const values = runs.map((r) => r.spec?.[k] ?? null);
    if (differs(values)) dims.push(dimension(k, values));
  }
  const peaks = derived.map((d) => d.peak);
  if (differs(peaks) && peaks.every(Number.isFinite)) dims.push(dimension('peak LR', peaks, { log: true }));
  dims.push({ label: errLabel, values: runs.map((r) => 100 * r.summary[errField]), tickformat: NUMBER_FORMAT });
  return dims;
}

export async function mount(root, route) {
  const ids = (route.query.get('runs') || '').split(',').map(Number).filter((n) => Number.isInteger(n) && n > 0);
  const group = route.query.get('group') || '';
  let errKey = ERR_FIELDS[route.query.get('err')] ? route.query.get('err') : 'final';
  let runs = [];
  let stopped = false;

  const title = h('h1', null, 'Parallel coordinates');
  const errSel = h(
    'select',
    { name: 'err', title: 'which validation error', onchange: () => {
      errKey = errSel.value;
      replaceQuery({ runs: group ? '' : ids, group, err: errKey === 'final' ? '' : errKey });
      draw();
    } },
    Object.entries(ERR_FIELDS).map(([k, [, label]]) => h('option', { value: k }, label.replace(' (%)', ''))),
  );
  errSel.value = errKey;
  const curvesLink = h('a', { class: 'button', href: group ? href('compare', { group }) : href('compare', { runs: ids }) }, 'Compare curves');
  const note = h('p', { class: 'muted small' });
  const message = h('div', { class: 'empty', hidden: true });
  const chart = h('div', { class: 'chart parallel-chart', id: 'parallel-chart' });
  replace(
    root,
    h(
      'section',
      { class: 'view parallel-view' },
      h('div', { class: 'toolbar' }, title, h('span', { class: 'spacer' }), errSel, curvesLink),
      note,
      message,
      chart,
    ),
  );

  function empty(...children) {
    replace(message, ...children);
    message.hidden = false;
    chart.hidden = true;
    announceDrawn({ view: 'parallel', lines: 0, dims: [] });
  }

  async function draw() {
    const [field, label] = ERR_FIELDS[errKey];
    const done = runs.filter((r) => Number.isFinite(r.summary?.[field]));
    const left = runs.length - done.length;
    setText(note, `${done.length} run${done.length === 1 ? '' : 's'}${left ? `; ${left} without a ${label.replace(' (%)', '')} yet left out` : ''}. Drag along an axis to filter.`);
    if (done.length < 2) {
      empty(
        h('strong', null, 'Not enough finished runs to compare.'),
        h('br'),
        'Select two or more runs in the ',
        h('a', { href: '#/runs' }, 'Runs table'),
        ' and press “Parallel coordinates”, or open a sweep from the ',
        h('a', { href: '#/sweep' }, 'Sweeps'),
        ' list.',
      );
      return;
    }
    message.hidden = true;
    chart.hidden = false;
    const Plotly = await loadPlotly();
    if (stopped) return;
    const dims = dimensionsOf(done, field, label);
    const errs = dims.at(-1).values;
    const trace = {
      type: 'parcoords',
      dimensions: dims,
      // Low error dark, high error pale: the best runs stand out on the white page.
      line: { color: errs, colorscale: 'Viridis', showscale: true, colorbar: { title: { text: 'err %' } } },
      meta: { runs: done.map((r) => r.id) },
    };
    const layout = baseLayout({ margin: { l: 70, r: 70, t: 48, b: 24 }, showlegend: false });
    await Plotly.react(chart, [trace], layout, PLOT_CONFIG);
    announceDrawn({ view: 'parallel', lines: done.length, dims: dims.map((d) => d.label) });
  }

  try {
    loadPlotly().catch(() => {});
    if (group) {
      const res = await api.sweep(group);
      runs = res.runs || [];
      setText(title, `Parallel coordinates: ${res.sweep?.name || `group ${group}`}`);
    } else {
      const found = await Promise.all(ids.map((id) => api.run(id).catch(() => null)));
      runs = found.filter(Boolean);
      const missing = ids.filter((id) => !runs.some((r) => r.id === id));
      if (missing.length) setText(title, `Parallel coordinates (runs ${missing.join(', ')} not found)`);
    }
    if (stopped) return () => {};
    await draw();
  } catch (err) {
    empty(h('span', { class: 'error' }, `Could not load the runs: ${err.message || err}`));
  }
  return () => {
    stopped = true;
    purge(chart);
  };
}
