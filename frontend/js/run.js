// #/run/ID?x=step|epoch : one run, live. The history comes from /api/runs/ID/metrics;
// new points arrive over SSE (/api/runs/ID/stream, events `points` and `status`) and are
// appended with Plotly.extendTraces, at most once per animation frame.

import { api, ApiError } from './api.js';
import { h, replace, setText } from './escape.js';
import { derivedOf, duration, formatKn, num, pct, shortTime, TERMINAL, where } from './format.js';
import {
  announceDrawn,
  axis,
  BASELINE_COLOR,
  baseLayout,
  colorAt,
  loadPlotly,
  PLOT_CONFIG,
  purge,
} from './plots.js';
import { go, href, replaceQuery } from './router.js';

const HISTORY_POINTS = 2000;
// Past this many points per trace the history is re-read downsampled (memory, redraw cost).
const REDOWNSAMPLE_AT = 12000;
const STATUS_FALLBACK_MS = 5000;

const PANELS = [
  {
    id: 'loss',
    title: 'loss',
    traces: [
      { key: 'loss', name: 'training loss', color: colorAt(0) },
      { key: 'val_loss', name: 'validation loss', color: BASELINE_COLOR, markers: true },
    ],
  },
  {
    id: 'err',
    title: 'error (%)',
    scale: 100,
    traces: [
      { key: 'train_err', name: 'training error', color: colorAt(1) },
      { key: 'val_err', name: 'validation error', color: BASELINE_COLOR, markers: true },
    ],
  },
  {
    id: 'lr',
    title: 'learning rate',
    tozero: true,
    traces: [{ key: 'lr', name: 'learning rate', color: colorAt(3) }],
  },
  {
    id: 'grad',
    title: 'gradient norm',
    tozero: true,
    traces: [{ key: 'grad_norm', name: 'gradient norm', color: colorAt(4) }],
  },
];
const KEYS = PANELS.flatMap((p) => p.traces.map((t) => t.key));
// The trainer's other keys (docs/design.md): streamed by the server, not plotted here.
const OTHER_KEYS = ['samples', 'step_time', 'epoch_time', 'data_time', 'compute_time',
  'train_loss_epoch', 'train_err_epoch'];
const WHERE = {}; // key -> [panel index, trace index]
PANELS.forEach((p, pi) => p.traces.forEach((t, ti) => (WHERE[t.key] = [pi, ti])));

export async function mount(root, route) {
  const id = route.id;
  const xMode = route.query.get('x') === 'epoch' ? 'epoch' : 'step';
  let run = null;
  let es = null;
  let stopped = false;
  let drawn = false;
  let lastStatusAt = 0;
  let fallbackTimer = null;
  let rafPending = false;
  const buffered = []; // SSE points received while the history is being (re)drawn
  const pending = []; // points waiting for the next animation frame
  const lastStep = Object.fromEntries(KEYS.map((k) => [k, -1]));
  const counts = Object.fromEntries(KEYS.map((k) => [k, 0]));
  let Plotly = null;

  // ---------- skeleton ----------
  const title = h('h1', null, `run ${id}`);
  const badge = h('span', { class: 'badge' });
  const cancelBtn = h('button', { class: 'danger', hidden: true, onclick: onCancel }, 'Cancel');
  const compareLink = h('a', { class: 'button', hidden: true }, 'Compare with baseline');
  const cloneLink = h('a', { class: 'button', href: href('new', { from: id }) }, 'Clone');
  const deleteBtn = h('button', { class: 'link danger', onclick: onDelete }, 'delete');
  const xSel = h(
    'select',
    { name: 'x', title: 'x axis', onchange: () => {
      replaceQuery({ x: xSel.value === 'step' ? '' : xSel.value });
      // The x arrays differ in kind: re-mount the view on the new axis.
      window.dispatchEvent(new HashChangeEvent('hashchange'));
    } },
    h('option', { value: 'step' }, 'x: iteration'),
    h('option', { value: 'epoch' }, 'x: epoch'),
  );
  xSel.value = xMode;
  const bar = h('span', { class: 'fill' });
  const barText = h('span', { class: 'bar-text' });
  const facts = h('dl', { class: 'facts' });
  const summary = h('dl', { class: 'facts summary' });
  const errorBox = h('pre', { class: 'error-box', hidden: true });
  const note = h('p', { class: 'muted small' });
  const specBox = h('details', { class: 'spec' }, h('summary', null, 'Full spec'));
  const charts = PANELS.map((p) => h('div', { class: 'chart', id: `chart-${p.id}`, dataset: { panel: p.id } }));

  replace(
    root,
    h(
      'section',
      { class: 'view run-view' },
      h(
        'div',
        { class: 'toolbar' },
        title,
        badge,
        h('span', { class: 'progress live-progress' }, h('span', { class: 'bar' }, bar), barText),
        h('span', { class: 'spacer' }),
        xSel,
        compareLink,
        cloneLink,
        cancelBtn,
        deleteBtn,
      ),
      facts,
      errorBox,
      summary,
      h('div', { class: 'charts' }, charts.map((c, i) => h('div', { class: 'panel' }, h('h3', null, PANELS[i].title), c))),
      note,
      specBox,
    ),
  );

  // ---------- header ----------
  function renderRun(r) {
    run = r;
    const spec = r.spec || {};
    const { kn, peak, ipe, total } = derivedOf(r);
    setText(title, r.name || `run ${r.id}`);
    title.title = `run ${r.id}`;
    setText(badge, r.status);
    badge.className = `badge s-${r.status}`;
    const progress = Math.max(0, Math.min(1, r.progress ?? (r.status === 'succeeded' ? 1 : 0)));
    bar.style.width = `${(100 * progress).toFixed(1)}%`;
    let ptext = `${Math.round(100 * progress)}%`;
    if (r.status === 'running' && r.eta_s != null) ptext += ` · ETA ${duration(r.eta_s)}`;
    setText(barText, ptext);
    cancelBtn.hidden = TERMINAL.has(r.status);
    if (r.baseline_id != null && r.baseline_id !== r.id) {
      compareLink.hidden = false;
      compareLink.href = href('compare', { runs: [r.baseline_id, r.id].sort((a, b) => a - b), baseline: r.baseline_id });
    }
    const items = [
      ['k × n', `${spec.workers} × ${spec.batch_per_worker} = ${formatKn(kn)}`],
      ['peak LR', `${num(peak, 4)} (${spec.scaling} from ${num(spec.base_lr)} per ${spec.ref_batch})`],
      ['warmup', spec.warmup === 'none' ? 'none' : `${spec.warmup}, ${num(spec.warmup_epochs)} epochs`],
      ['norm', spec.norm],
      ['model', `${spec.model} on ${spec.dataset}${spec.dataset_size ? ` (${spec.dataset_size})` : ''}`],
      ['epochs', `${spec.epochs}${ipe ? ` × ${ipe} it = ${total} it` : ''}`],
      ['optimizer', `${spec.optimizer}, m=${num(spec.momentum)}, wd=${num(spec.weight_decay)}`],
      ['where', [where(r), r.worker].filter(Boolean).join(' · ') || '–'],
      ['created', shortTime(r.created_at)],
      ['started', shortTime(r.started_at) || '–'],
      ['finished', shortTime(r.finished_at) || '–'],
    ];
    if (r.group_id != null) items.push(['group', h('a', { href: `#/sweep/${r.group_id}` }, `group ${r.group_id}`)]);
    if (r.baseline_id != null) items.push(['baseline', h('a', { href: `#/run/${r.baseline_id}` }, `run ${r.baseline_id}`)]);
    if (r.is_baseline) items.push(['role', 'baseline']);
    replace(facts, items.map(([k, v]) => h('div', null, h('dt', null, k), h('dd', null, v))));

    const s = r.summary || {};
    const sitems = [
      ['final val err', pct(s.final_val_err)],
      ['best val err', pct(s.best_val_err)],
      ['median last 5', pct(s.median_last5_val_err)],
      ['to target', s.iters_to_target != null ? `${s.iters_to_target} it · ${duration(s.time_to_target_s)}` : '–'],
      ['loss oscillation', num(s.loss_oscillation)],
      ['samples/s', num(s.samples_per_s, 4)],
      ['wall time', duration(s.wall_time_s)],
    ].filter(([, v]) => v !== '–');
    summary.hidden = sitems.length === 0;
    replace(summary, sitems.map(([k, v]) => h('div', null, h('dt', null, k), h('dd', null, v))));

    const problems = [];
    if (r.diverged_step != null) problems.push(`Diverged at iteration ${r.diverged_step}.`);
    if (r.error) problems.push(r.error);
    errorBox.hidden = problems.length === 0;
    setText(errorBox, problems.join('\n'));
    replace(
      specBox,
      h('summary', null, 'Full spec'),
      h('pre', null, JSON.stringify(spec, null, 2)),
    );
    if (drawn) markDivergence();
  }

  // ---------- plots ----------
  function xOf(point) {
    return xMode === 'epoch' ? point.epoch : point.step;
  }

  function traceFor(t, panel, series) {
    const scale = panel.scale || 1;
    const xs = series ? (xMode === 'epoch' ? series.epoch : series.step) : [];
    const trace = {
      type: 'scatter',
      mode: t.markers ? 'lines+markers' : 'lines',
      name: t.name,
      x: xs.slice(),
      y: series ? series.value.map((v) => (v == null ? null : v * scale)) : [],
      line: { color: t.color, width: t.markers ? 1.5 : 1.2 },
      hovertemplate: `%{y:.4g}<extra>${t.name}</extra>`,
    };
    if (t.markers) trace.marker = { size: 5, color: t.color };
    return trace;
  }

  function layoutFor(panel) {
    return baseLayout({
      margin: { l: 52, r: 12, t: panel.traces.length > 1 ? 26 : 10, b: 36 },
      showlegend: panel.traces.length > 1,
      legend: { orientation: 'h', x: 0, y: 1, yanchor: 'bottom', font: { size: 11 } },
      xaxis: axis({ title: { text: xMode === 'epoch' ? 'epoch' : 'iteration' } }),
      yaxis: axis({
        exponentformat: 'power',
        rangemode: panel.tozero ? 'tozero' : 'normal',
      }),
      uirevision: 'keep',
      ...divergenceMarks(),
    });
  }

  async function drawHistory(data) {
    Plotly = await loadPlotly();
    if (stopped) return;
    const series = data.series || {};
    for (const k of KEYS) {
      const s = series[k];
      const n = s ? s.step.length : 0;
      lastStep[k] = n ? s.step[n - 1] : -1;
      counts[k] = n;
    }
    await Promise.all(
      PANELS.map((p, i) =>
        Plotly.react(charts[i], p.traces.map((t) => traceFor(t, p, series[t.key])), layoutFor(p), PLOT_CONFIG),
      ),
    );
    drawn = true;
    marked = run?.diverged_step != null;
    const total = KEYS.reduce((a, k) => a + counts[k], 0);
    setText(note, total ? '' : 'No points yet: the curves appear as the run logs them.');
    announceDrawn({ view: 'run', runId: Number(id), lastStep: { ...lastStep } });
  }

  /** A dashed red line where the run diverged (shapes and annotations of a layout). */
  function divergenceMarks() {
    if (!run || run.diverged_step == null) return { shapes: [], annotations: [] };
    const ipe = derivedOf(run).ipe;
    const x = xMode === 'epoch' && ipe ? run.diverged_step / ipe : run.diverged_step;
    return {
      shapes: [{ type: 'line', xref: 'x', yref: 'paper', x0: x, x1: x, y0: 0, y1: 1,
        line: { color: '#c0392b', width: 1.5, dash: 'dash' } }],
      annotations: [{ xref: 'x', yref: 'paper', x, y: 1, text: 'diverged', showarrow: false,
        xanchor: 'right', font: { color: '#c0392b', size: 11 } }],
    };
  }

  let marked = false;
  /** Mark a divergence reported while the page is open (live status event). */
  function markDivergence() {
    if (!drawn || marked || !run || run.diverged_step == null) return;
    marked = true;
    const marks = divergenceMarks();
    charts.forEach((c) => Plotly.relayout(c, marks));
  }

  /** Queue SSE points; flush them into the plots on the next animation frame. */
  function onPoints(points) {
    if (!drawn) {
      buffered.push(...points);
      return;
    }
    pending.push(...points);
    if (!rafPending) {
      rafPending = true;
      requestAnimationFrame(flush);
    }
  }

  async function flush() {
    rafPending = false;
    if (stopped || pending.length === 0) return;
    const points = pending.splice(0);
    const per = PANELS.map((p) => p.traces.map(() => ({ x: [], y: [] })));
    let added = 0;
    for (const pt of points) {
      const where_ = WHERE[pt.key];
      if (!where_ || pt.step <= lastStep[pt.key]) continue; // unknown key or already drawn
      lastStep[pt.key] = pt.step;
      counts[pt.key]++;
      const [pi, ti] = where_;
      per[pi][ti].x.push(xOf(pt));
      per[pi][ti].y.push(pt.value == null ? null : pt.value * (PANELS[pi].scale || 1));
      added++;
    }
    if (!added) return;
    const jobs = [];
    per.forEach((traces, pi) => {
      const idx = [];
      const update = { x: [], y: [] };
      traces.forEach((t, ti) => {
        if (!t.x.length) return;
        idx.push(ti);
        update.x.push(t.x);
        update.y.push(t.y);
      });
      if (idx.length) jobs.push(Plotly.extendTraces(charts[pi], update, idx));
    });
    await Promise.all(jobs);
    if (note.textContent) setText(note, '');
    announceDrawn({ view: 'run', runId: Number(id), lastStep: { ...lastStep } });
    if (Math.max(...Object.values(counts)) > REDOWNSAMPLE_AT) reloadHistory();
  }

  let reloading = false;
  async function reloadHistory() {
    if (reloading) return;
    reloading = true;
    try {
      drawn = false; // new SSE points buffer while the downsampled history is read
      const data = await api.runMetrics(id, { keys: KEYS, x: xMode, max_points: HISTORY_POINTS });
      if (stopped) return;
      await drawHistory(data);
      const late = buffered.splice(0);
      onPoints(late);
    } finally {
      reloading = false;
    }
  }

  // ---------- live ----------
  function openStream() {
    // Cursors for the plotted keys, and for the trainer's other keys (not drawn here) the
    // newest step seen, so a long run's stream does not start by replaying them.
    const newest = Math.max(...Object.values(lastStep));
    const cursors = KEYS.filter((k) => lastStep[k] >= 0).map((k) => `${k}:${lastStep[k]}`);
    if (newest >= 0) cursors.push(...OTHER_KEYS.map((k) => `${k}:${newest}`));
    const since = cursors.join(',');
    es = new EventSource(`${api.streamUrl(id)}${since ? `?since=${encodeURIComponent(since)}` : ''}`);
    es.addEventListener('points', (ev) => {
      try {
        onPoints(JSON.parse(ev.data).points || []);
      } catch (err) {
        console.error('bad points event', err);
      }
    });
    es.addEventListener('status', (ev) => {
      lastStatusAt = Date.now();
      try {
        renderRun(JSON.parse(ev.data));
      } catch (err) {
        console.error('bad status event', err);
      }
      if (TERMINAL.has(run.status)) closeSoon();
    });
    es.addEventListener('gone', () => {
      es.close();
      alertError(`Run ${id} was deleted.`);
    });
    es.onerror = () => {
      // The server ends the stream when the run is over; EventSource would reconnect.
      if (run && TERMINAL.has(run.status)) es.close();
    };
  }

  let closeTimer = null;
  function closeSoon() {
    // Let the last points (sent just before the final status) arrive, then stop.
    clearTimeout(closeTimer);
    closeTimer = setTimeout(() => es && es.close(), 1500);
  }

  /** When status events stop (old server, proxy), refresh the header by polling. */
  function fallback() {
    fallbackTimer = setTimeout(async () => {
      if (stopped) return;
      if (!document.hidden && Date.now() - lastStatusAt > STATUS_FALLBACK_MS && run && !TERMINAL.has(run.status)) {
        try {
          renderRun(await api.run(id));
        } catch {
          /* keep the last view */
        }
      }
      fallback();
    }, STATUS_FALLBACK_MS);
  }

  async function onCancel() {
    cancelBtn.disabled = true;
    try {
      renderRun(await api.cancelRun(id));
    } catch (err) {
      alertError(err);
    } finally {
      cancelBtn.disabled = false;
    }
  }

  async function onDelete() {
    if (!window.confirm(`Delete run ${id} and all its metrics?`)) return;
    try {
      await api.deleteRun(id);
      go('runs');
    } catch (err) {
      alertError(err);
    }
  }

  function alertError(err) {
    errorBox.hidden = false;
    setText(errorBox, String(err.message || err));
  }

  // ---------- start ----------
  // Run and history in parallel; Plotly compiles while they are on the way.
  const history = api.runMetrics(id, { keys: KEYS, x: xMode, max_points: HISTORY_POINTS });
  history.catch(() => {}); // handled below; a 404 is reported through api.run
  loadPlotly().catch(() => {});
  try {
    renderRun(await api.run(id));
  } catch (err) {
    if (err instanceof ApiError && err.status === 404) {
      replace(root, h('p', { class: 'error' }, `Run ${id} not found.`), h('a', { href: '#/runs' }, 'All runs'));
      return () => {};
    }
    throw err;
  }
  fallback();
  try {
    const data = await history;
    if (!stopped) await drawHistory(data);
  } catch (err) {
    if (!stopped) setText(note, `Could not load metrics: ${err.message || err}`);
  }
  // The stream resumes after the last step the history holds, per key: points logged
  // since the history was read arrive first, nothing is sent twice.
  if (!stopped && !TERMINAL.has(run.status)) openStream();

  return () => {
    stopped = true;
    if (es) es.close();
    clearTimeout(fallbackTimer);
    clearTimeout(closeTimer);
    charts.forEach(purge);
  };
}
