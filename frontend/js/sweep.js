// #/sweep : the list of sweeps and comparison groups, newest first.
// #/sweep/ID?err=final|median5|best : a batch-size sweep. Final validation error against
// total batch size on a log2 axis with the baseline's error as a band (Figure 1 of Goyal
// et al.), and seed 004's table: per batch size, iterations and time to the target
// accuracy, loss oscillation, throughput and final error.

import { api, ApiError } from './api.js';
import { escapeHtml, h, replace, setText } from './escape.js';
import { duration, formatKn, num, pct, shortTime, TERMINAL } from './format.js';
import {
  announceDrawn,
  axis,
  BASELINE_COLOR,
  baseLayout,
  colorAt,
  loadPlotly,
  log2Ticks,
  PLOT_CONFIG,
  purge,
  withAlpha,
} from './plots.js';
import { href, replaceQuery } from './router.js';
import { meanStd } from './smoothing.js';

const LIVE_MS = 3000;
const ERR_FIELDS = {
  final: ['final_val_err', 'final validation error (%)'],
  median5: ['median_last5_val_err', 'median of last 5 validation errors (%)'],
  best: ['best_val_err', 'best validation error (%)'],
};

const BAND_COLOR = '#2a7ab0';
const KNEE_COLOR = '#c0392b';

/**
 * The advice of GET /api/sweeps/ID drawn over Figure 1, on an overlaid y axis 'y2' spanning
 * the plot's height (0..1): the baseline's B_simple as a band (q25..q75) with a line at
 * its median, and the measured knee as a dashed vertical line. Traces, so they sit on the
 * log x axis in data units and widen its range. Empty without advice.
 */
export function adviceTraces(advice) {
  const out = [];
  const cb = advice?.critical_batch;
  if (cb && cb.median > 0) {
    const [lo, hi] = [Math.max(cb.q25, 1e-9), Math.max(cb.q75, cb.q25, 1e-9)];
    out.push({
      type: 'scatter', mode: 'lines', xaxis: 'x', yaxis: 'y2', x: [lo, hi, hi, lo, lo], y: [0, 0, 1, 1, 0],
      fill: 'toself', fillcolor: withAlpha(BAND_COLOR, 0.15), line: { width: 0 },
      name: 'predicted critical batch (noise scale)', hoverinfo: 'skip', meta: { role: 'critical-band' },
    });
    const label = `B_simple ≈ ${num(cb.median, 3)}`;
    out.push({
      type: 'scatter', mode: 'lines+text', xaxis: 'x', yaxis: 'y2', x: [cb.median, cb.median], y: [0, 1],
      text: ['', label], textposition: 'bottom right', textfont: { color: BAND_COLOR, size: 11 },
      line: { color: BAND_COLOR, width: 1.5 }, name: escapeHtml(`${label} (median; band q25–q75 = ${num(cb.q25, 3)}–${num(cb.q75, 3)})`),
      hovertemplate: `B_simple median ${num(cb.median, 4)}, q25 ${num(cb.q25, 4)}, q75 ${num(cb.q75, 4)} (${cb.points} points)<extra></extra>`,
      meta: { role: 'critical-median' },
    });
  }
  const knee = advice?.knee;
  if (knee && knee.batch_size != null) {
    const label = `measured knee: kn = ${formatKn(knee.batch_size)}`;
    out.push({
      type: 'scatter', mode: 'lines+text', xaxis: 'x', yaxis: 'y2', x: [knee.batch_size, knee.batch_size], y: [0, 1],
      text: ['', label], textposition: 'bottom left', textfont: { color: KNEE_COLOR, size: 11 },
      line: { color: KNEE_COLOR, width: 1.5, dash: 'dash' }, name: escapeHtml(label),
      hovertemplate: `${escapeHtml(label)}: the smallest kn whose final error exceeds ${pct(knee.threshold)}<extra></extra>`,
      meta: { role: 'knee' },
    });
  }
  return out;
}

/** What the advice says or lacks, one short sentence each (shown under the figure). */
export function adviceNotes(advice) {
  const cb = advice?.critical_batch;
  const knee = advice?.knee;
  const notes = [];
  if (cb) {
    notes.push(`Predicted critical batch (the baseline's noise scale B_simple over the last half of training): median ${num(cb.median, 3)}, q25–q75 ${num(cb.q25, 3)}–${num(cb.q75, 3)} (${cb.points} points, run${cb.run_ids.length > 1 ? 's' : ''} ${cb.run_ids.join(', ')}).`);
  } else {
    notes.push('No predicted critical batch: the baseline has no noise-scale points yet (noise_every = 0, or not measured yet).');
  }
  if (!knee) {
    notes.push('No measured knee yet: it needs the baseline and the larger batch sizes to finish.');
  } else if (knee.batch_size == null) {
    notes.push(`No knee: no finished batch size's final error exceeds the baseline's ${pct(knee.baseline_mean)} by more than ${pct(knee.threshold - knee.baseline_mean)} (${knee.rule}).`);
  } else {
    const ratio = cb ? ` The prediction is ${num(cb.median / knee.batch_size, 2)}× the measured knee.` : '';
    notes.push(`Measured knee: kn = ${formatKn(knee.batch_size)}, the smallest batch size past the baseline's ${pct(knee.baseline_mean)} ± ${pct(knee.baseline_std)} (${knee.rule}).${ratio}`);
  }
  return notes;
}

/** An auto sweep's state (GET /api/sweeps/ID's sweep.auto_state), or '' for other sweeps. */
export function autoStateText(sweep) {
  const st = sweep?.auto_state;
  if (!st) return '';
  const head = {
    waiting: 'Auto sweep: waiting for the baseline’s noise scale.',
    ladder_queued: 'Auto sweep: the batch sizes around the baseline’s noise scale are queued.',
    no_ladder: 'Auto sweep: could not place the batch sizes.',
  }[st] || `Auto sweep: ${st}.`;
  return sweep.auto_message ? `${head} ${sweep.auto_message}` : head;
}

/** Rows grouped by total batch (baseline rows apart), sorted by k·n. */
export function byBatch(rows) {
  const map = new Map();
  for (const row of rows) {
    const key = `${row.is_baseline ? 'b' : 'r'}${row.total_batch}`;
    if (!map.has(key)) map.set(key, { kn: row.total_batch, baseline: Boolean(row.is_baseline), rows: [] });
    map.get(key).rows.push(row);
  }
  return [...map.values()].sort((a, b) => a.kn - b.kn || b.baseline - a.baseline);
}

/** #/sweep: every group, linked to its sweep page, its curves and its parallel coordinates. */
async function mountList(root) {
  const body = h('tbody');
  const empty = h('p', { class: 'empty', hidden: true }, 'No sweeps yet. ', h('a', { href: '#/new' }, 'Start one'), ' (New run, then “sweep”).');
  replace(
    root,
    h(
      'section',
      { class: 'view sweeps-view' },
      h('div', { class: 'toolbar' }, h('h1', null, 'Sweeps and groups')),
      h(
        'div',
        { class: 'table-wrap' },
        h(
          'table',
          { class: 'grid sweeps' },
          h('thead', null, h('tr', null, ['id', 'name', 'kind', 'batch sizes', 'seeds', 'created', ''].map((t) => h('th', null, t)))),
          body,
        ),
      ),
      empty,
    ),
  );
  const groups = await api.sweeps({ kind: 'all' });
  empty.hidden = groups.length > 0;
  replace(
    body,
    groups.map((g) =>
      h(
        'tr',
        { dataset: { groupId: String(g.id) } },
        h('td', { class: 'num' }, String(g.id)),
        h('td', null, h('a', { href: `#/sweep/${g.id}` }, g.name || `${g.kind} ${g.id}`)),
        h('td', null, g.kind),
        h('td', null, (g.batch_sizes || []).map(formatKn).join(', ')),
        h('td', null, (g.seeds || []).join(', ')),
        h('td', { title: g.created_at || '' }, shortTime(g.created_at)),
        h(
          'td',
          null,
          h('a', { href: href('compare', { group: g.id }) }, 'curves'),
          ' · ',
          h('a', { href: href('parallel', { group: g.id }) }, 'parallel coordinates'),
        ),
      ),
    ),
  );
  announceDrawn({ view: 'sweeps', rows: groups.length });
  return () => {};
}

export async function mount(root, route) {
  if (route.id == null) return mountList(root);
  const id = route.id;
  let errKey = ERR_FIELDS[route.query.get('err')] ? route.query.get('err') : 'final';
  let stopped = false;
  let timer = null;
  let last = null;

  const title = h('h1', null, `sweep ${id}`);
  const info = h('p', { class: 'muted' });
  const progress = h('span', { class: 'muted small' });
  const errSel = h(
    'select',
    { name: 'err', title: 'which validation error', onchange: () => {
      errKey = errSel.value;
      replaceQuery({ err: errKey === 'final' ? '' : errKey });
      if (last) draw(last);
    } },
    Object.entries(ERR_FIELDS).map(([k, [, label]]) => h('option', { value: k }, label.replace(' (%)', ''))),
  );
  errSel.value = errKey;
  const compareLink = h('a', { class: 'button', href: href('compare', { group: id }) }, 'Compare curves');
  const parallelLink = h('a', { class: 'button', href: href('parallel', { group: id }), title: 'spec fields against final error' }, 'Parallel coordinates');
  const chart = h('div', { class: 'chart sweep-chart', id: 'sweep-chart' });
  const autoLine = h('p', { class: 'auto-state', hidden: true });
  const adviceBox = h('div', { class: 'advice-note muted small' });
  const table = h('div', { class: 'table-wrap' });
  const note = h('p', { class: 'muted small' });

  replace(
    root,
    h(
      'section',
      { class: 'view sweep-view' },
      h('div', { class: 'toolbar' }, title, progress, h('span', { class: 'spacer' }), errSel, compareLink, parallelLink),
      info,
      autoLine,
      h('h2', null, 'Error against minibatch size'),
      chart,
      adviceBox,
      h('h2', null, 'Per batch size'),
      note,
      table,
    ),
  );

  function render(res) {
    const sweep = res.sweep || {};
    const spec = sweep.spec || {};
    setText(title, sweep.name ? `${sweep.name}` : `sweep ${id}`);
    title.title = `sweep ${id}`;
    const runs = res.runs || [];
    const done = runs.filter((r) => TERMINAL.has(r.status)).length;
    const running = runs.filter((r) => r.status === 'running').length;
    setText(progress, `${done}/${runs.length} finished${running ? `, ${running} running` : ''}`);
    const parts = [
      spec.model && `${spec.model} on ${spec.dataset}`,
      spec.epochs && `${spec.epochs} epochs`,
      spec.base_lr != null && `η=${num(spec.base_lr)} per ${spec.ref_batch}, ${spec.scaling} scaling`,
      spec.warmup && (spec.warmup === 'none' ? 'no warmup' : `${spec.warmup} warmup ${num(spec.warmup_epochs)} epochs`),
      spec.norm && `norm ${spec.norm}`,
      sweep.seeds && `seeds ${sweep.seeds.join(', ')}`,
    ].filter(Boolean);
    setText(info, parts.join(' · '));
    const auto = autoStateText(sweep);
    autoLine.hidden = !auto;
    autoLine.dataset.state = sweep.auto_state || '';
    setText(autoLine, auto);
    // Comparison groups are served here too: they predict no knee.
    const notes = sweep.kind === 'compare' && !res.advice ? [] : adviceNotes(res.advice);
    replace(adviceBox, notes.map((t) => h('p', null, t)));
    const target = spec.target_accuracy;
    setText(
      note,
      target != null
        ? `Target: ${pct(target, 1)} validation accuracy (error ${pct(1 - target, 1)}). Means over seeds; ± is the standard deviation.`
        : 'No target_accuracy in this sweep’s spec: time and iterations to target stay empty. Means over seeds; ± is the standard deviation.',
    );
    renderTable(res);
  }

  function cell(values, fmt, reachedOf) {
    const ms = meanStd(values);
    if (!ms.n) return reachedOf ? h('td', { class: 'num muted' }, reachedOf) : h('td', { class: 'num muted' }, '–');
    const text = `${fmt(ms.mean)}${ms.n > 1 && ms.std > 0 ? ` ± ${fmt(ms.std)}` : ''}`;
    return h('td', { class: 'num' }, text, reachedOf && ms.n < values.length ? h('small', { class: 'muted' }, ` (${ms.n}/${values.length})`) : '');
  }

  function renderTable(res) {
    const rows = res.summary || [];
    const groups = byBatch(rows);
    const runsById = new Map((res.runs || []).map((r) => [r.id, r]));
    const baselineIds = rows.filter((r) => r.is_baseline).map((r) => r.run_id);
    const head = ['k·n', 'k × n', 'peak LR', 'runs', 'iters to target', 'epochs to target', 'time to target', 'loss oscillation', 'samples/s', 'wall time', 'final val err', 'median last 5', 'best'];
    const body = groups.map((g) => {
      const first = g.rows[0];
      const statuses = [...new Set(g.rows.map((r) => r.status))];
      const allDone = g.rows.every((r) => TERMINAL.has(r.status));
      const notReached = allDone ? 'not reached' : '…';
      const ids = [...new Set([...g.rows.map((r) => r.run_id), ...baselineIds])].sort((a, b) => a - b);
      const link = href('compare', { runs: ids, baseline: baselineIds[0] ?? '' });
      return h(
        'tr',
        { class: g.baseline ? 'baseline' : '', dataset: { kn: String(g.kn) } },
        h('td', { class: 'num' }, h('a', { href: link, title: 'compare with the baseline' }, formatKn(g.kn)), g.baseline ? h('span', { class: 'tag' }, 'baseline') : ''),
        h('td', null, `${first.workers} × ${first.batch_per_worker}`),
        h('td', { class: 'num' }, num(first.peak_lr)),
        h(
          'td',
          null,
          g.rows.map((r, i) => [i ? ' ' : '', h('a', { href: `#/run/${r.run_id}`, class: `badge s-${r.status}`, title: `${runsById.get(r.run_id)?.name || ''} seed ${r.seed}: ${r.status}` }, String(r.run_id))]),
          statuses.length === 1 && statuses[0] !== 'succeeded' ? h('small', { class: 'muted' }, ` ${statuses[0]}`) : '',
        ),
        cell(g.rows.map((r) => r.iters_to_target), (v) => num(v, 4), notReached),
        cell(g.rows.map((r) => r.epochs_to_target), (v) => num(v, 3), notReached),
        cell(g.rows.map((r) => r.time_to_target_s), (v) => duration(v), notReached),
        cell(g.rows.map((r) => r.loss_oscillation), (v) => num(v, 3)),
        cell(g.rows.map((r) => r.samples_per_s), (v) => num(v, 4)),
        cell(g.rows.map((r) => r.wall_time_s), (v) => duration(v)),
        cell(g.rows.map((r) => r.final_val_err), (v) => pct(v)),
        cell(g.rows.map((r) => r.median_last5_val_err), (v) => pct(v)),
        cell(g.rows.map((r) => r.best_val_err), (v) => pct(v)),
      );
    });
    replace(
      table,
      h(
        'table',
        { class: 'grid sweep-table' },
        h('thead', null, h('tr', null, head.map((t, i) => h('th', { class: i === 1 || i === 3 ? '' : 'num' }, t)))),
        h('tbody', null, body),
      ),
    );
  }

  async function draw(res) {
    const Plotly = await loadPlotly();
    if (stopped) return;
    const [field, label] = ERR_FIELDS[errKey];
    const rows = res.summary || [];
    const main = rows.filter((r) => !r.is_baseline);
    const base = rows.filter((r) => r.is_baseline);
    const traces = [];
    const marks = adviceTraces(res.advice);
    const kns = [...rows.map((r) => r.total_batch), ...marks.flatMap((t) => t.x)].filter((v) => v > 0);
    const ticks = log2Ticks(kns);
    const lo = ticks.tickvals.length ? ticks.tickvals[0] / 1.4 : 1;
    const hi = ticks.tickvals.length ? ticks.tickvals[ticks.tickvals.length - 1] * 1.4 : 2;
    const baseStats = meanStd(base.map((r) => r[field]));
    if (baseStats.n) {
      const m = 100 * baseStats.mean;
      const sd = 100 * baseStats.std;
      const bkn = base[0].total_batch;
      const spread = sd > 0 ? ` ± ${sd.toFixed(2)}` : '';
      const bandLabel = `baseline kn=${formatKn(bkn)}: ${m.toFixed(2)}%${spread}${baseStats.n > 1 ? ` (${baseStats.n} seeds)` : ''}`;
      traces.push({
        type: 'scatter', mode: 'lines', x: [lo, hi], y: [m - sd, m - sd],
        line: { width: 0 }, hoverinfo: 'skip', showlegend: false, meta: { role: 'band-lo' },
      });
      traces.push({
        type: 'scatter', mode: 'lines', x: [lo, hi], y: [m + sd, m + sd], fill: 'tonexty',
        fillcolor: withAlpha(BASELINE_COLOR, 0.1), line: { width: 0 }, hoverinfo: 'skip',
        showlegend: false, meta: { role: 'band-hi' },
      });
      traces.push({
        type: 'scatter', mode: 'lines', x: [lo, hi], y: [m, m], name: escapeHtml(bandLabel),
        line: { color: BASELINE_COLOR, width: 1.2, dash: 'dash' }, hoverinfo: 'skip', meta: { role: 'baseline' },
      });
    }
    // Each seed as a small point, the mean per batch size as the curve.
    const seedsX = [];
    const seedsY = [];
    const seedsText = [];
    for (const r of main) {
      if (r[field] == null) continue;
      seedsX.push(r.total_batch);
      seedsY.push(100 * r[field]);
      seedsText.push(`run ${r.run_id}, seed ${r.seed}`);
    }
    const meanX = [];
    const meanY = [];
    const meanErr = [];
    for (const g of byBatch(main)) {
      const ms = meanStd(g.rows.map((r) => r[field]));
      if (!ms.n) continue;
      meanX.push(g.kn);
      meanY.push(100 * ms.mean);
      meanErr.push(100 * ms.std);
    }
    const color = colorAt(0);
    traces.push({
      type: 'scatter', mode: 'markers', x: seedsX, y: seedsY, text: seedsText, name: 'each run',
      marker: { size: 6, color: withAlpha(color, 0.45), line: { width: 0 } },
      hovertemplate: 'kn=%{x}: %{y:.2f}% (%{text})<extra></extra>', meta: { role: 'seeds' },
    });
    traces.push({
      type: 'scatter', mode: 'lines+markers', x: meanX, y: meanY, name: 'mean over seeds',
      error_y: { type: 'data', array: meanErr, visible: meanErr.some((e) => e > 0), color, thickness: 1.2, width: 4 },
      line: { color, width: 2 }, marker: { size: 8, color },
      hovertemplate: 'kn=%{x}: %{y:.2f}%<extra>mean</extra>', meta: { role: 'mean' },
    });
    traces.push(...marks);
    const layout = baseLayout({
      height: 380,
      hovermode: 'closest',
      margin: { l: 64, r: 16, t: 8, b: 48 },
      legend: { orientation: 'v', x: 0.01, y: 0.99, bgcolor: 'rgba(255,255,255,0.85)', bordercolor: '#dde', borderwidth: 1 },
      xaxis: axis({ type: 'log', title: { text: 'mini-batch size k·n' }, tickvals: ticks.tickvals, ticktext: ticks.ticktext, range: [Math.log10(lo), Math.log10(hi)] }),
      yaxis: axis({ title: { text: label } }),
      uirevision: errKey,
    });
    // The advice's vertical marks: an invisible axis over the whole plot height.
    if (marks.length) layout.yaxis2 = { overlaying: 'y', range: [0, 1], visible: false, fixedrange: true };
    await Plotly.react(chart, traces, layout, PLOT_CONFIG);
    announceDrawn({ view: 'sweep', traces: traces.length, points: seedsX.length });
  }

  async function refresh() {
    if (stopped) return;
    try {
      const res = await api.sweep(id);
      if (stopped) return;
      last = res;
      render(res);
      await draw(res);
      if (!(res.runs || []).every((r) => TERMINAL.has(r.status))) {
        timer = setTimeout(refresh, LIVE_MS);
      }
    } catch (err) {
      if (stopped) return;
      if (err instanceof ApiError && err.status === 404) {
        replace(root, h('p', { class: 'error' }, `Sweep ${id} not found.`), h('a', { href: '#/runs' }, 'All runs'));
        return;
      }
      setText(note, `Could not load the sweep: ${err.message || err}`);
      timer = setTimeout(refresh, LIVE_MS * 2);
    }
  }

  const first = refresh();
  loadPlotly().catch(() => {}); // compiles while the sweep is read
  await first;
  return () => {
    stopped = true;
    clearTimeout(timer);
    purge(chart);
  };
}
